"""Conversions between the model's image tensors and files: decoded samples to pixels, and the init
image of img2img (any format PIL reads) to a tensor. torch is imported only by the functions that
need it, so a bad init image is reported before the model stack loads."""
from __future__ import annotations

import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from ldm.errors import UserInputError

if TYPE_CHECKING:
    import torch

SIXTEEN_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N")


def to_unit_images(x: torch.Tensor) -> np.ndarray:
    """Decoded images [-1, 1] (N, 3, H, W) to floats in [0, 1] (N, H, W, 3), as the original scripts."""
    import torch

    return torch.clamp((x + 1.0) / 2.0, min=0.0, max=1.0).float().cpu().permute(0, 2, 3, 1).numpy()


def to_uint8(image: np.ndarray) -> np.ndarray:
    """Floats in [0, 1] to 8-bit pixels, truncating as the original scripts do (so files match theirs)."""
    return (255.0 * image).astype(np.uint8)


def _flatten(image: Image.Image) -> Image.Image:
    """RGB with alpha composited onto white; grayscale, palette, CMYK and 16-bit images become RGB."""
    if image.mode in SIXTEEN_BIT_MODES:
        pixels = np.asarray(image, dtype=np.float64)
        image = Image.fromarray(np.clip(pixels / (257.0 if pixels.max() > 255 else 1.0), 0, 255).astype(np.uint8))
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(white, rgba).convert("RGB")
    return image.convert("RGB")


def open_image(path: str, what: str = "image") -> Image.Image:
    """The image file as PIL opens it, EXIF orientation applied; `what` names it in the one-line errors."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{what} not found: {file}")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(file) as image:
                image.load()
                return ImageOps.exif_transpose(image)
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise UserInputError(f"cannot read {what} {file}: {error}") from error
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read {what} {file}: it is truncated or corrupt ({error})") from error


def open_init_image(path: str) -> Image.Image:
    """The init image as RGB, with its EXIF orientation applied and transparency flattened onto white."""
    return _flatten(open_image(path, "init image"))


def fit_to_multiple(image: Image.Image, multiple: int) -> tuple[Image.Image, Optional[str]]:
    """Resize to the largest multiple of `multiple` not above each side (Lanczos, as the original); returns
    the image and a note when the size changed."""
    width, height = image.size
    new_width, new_height = width - width % multiple, height - height % multiple
    if new_width == 0 or new_height == 0:
        raise UserInputError(f"init image is {width}x{height}; it must be at least {multiple} pixels on each side")
    if (new_width, new_height) == (width, height):
        return image, None
    resized = image.resize((new_width, new_height), resample=Image.LANCZOS)
    return resized, f"init image {width}x{height} resized to {new_width}x{new_height} (a multiple of {multiple})"


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB image as a tensor in [-1, 1] of shape (1, 3, H, W)."""
    import torch

    pixels = np.asarray(image, dtype=np.float32) / 255.0
    return 2.0 * torch.from_numpy(pixels[None].transpose(0, 3, 1, 2).copy()) - 1.0
