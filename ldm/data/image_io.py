"""Reading training images: camera orientation applied, transparency flattened, always RGB."""
from __future__ import annotations

import os

from PIL import Image, ImageOps

from ldm.errors import UserInputError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class UnreadableImageError(UserInputError):
    """An image file that is missing, truncated or not an image."""


def is_image_file(path: str | os.PathLike) -> bool:
    return os.fspath(path).lower().endswith(IMAGE_EXTENSIONS)


def load_rgb_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as RGB, turned upright by its EXIF orientation tag; transparent pixels
    become white (not the undefined colour stored under them)."""
    try:
        with Image.open(path) as image:
            image.load()
            image = ImageOps.exif_transpose(image)
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
        raise UnreadableImageError(f"cannot read image {os.fspath(path)}: {error}") from error
    if image.mode == "RGB":
        return image
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")
