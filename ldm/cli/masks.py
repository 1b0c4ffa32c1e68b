"""Masks for inpainting and the canvas of outpainting, as pixels (PIL and numpy only: every check here runs
before the model stack loads).

A mask is white where the image is repainted. It comes from `--mask` (any image; its luminance, binarised at
half), or from the init image's transparency (transparent pixels are repainted). Repainted pixels are
composited back onto the input with a feather that ramps from 0 at the mask's edge to 1 `--mask_blur` pixels
inside it, so every pixel outside the mask keeps the input's value exactly.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image, ImageFilter

from ldm.cli.images import open_image
from ldm.errors import UserInputError

OUTPAINT_MULTIPLE = 8


def open_mask(path: str) -> np.ndarray:
    """The mask file as floats in {0, 1} (1 = repaint): its luminance, with any transparency taken as black."""
    image = open_image(path, "mask")
    if image.mode in ("RGBA", "LA", "PA", "P"):
        rgba = image.convert("RGBA")
        image = Image.alpha_composite(Image.new("RGBA", rgba.size, (0, 0, 0, 255)), rgba)
    return (np.asarray(image.convert("L"), dtype=np.float32) >= 128).astype(np.float32)


def transparency_mask(path: str) -> Optional[np.ndarray]:
    """The init image's transparent pixels as a mask (1 = repaint, alpha below half), or None if it has none."""
    image = open_image(path, "init image")
    if image.mode not in ("RGBA", "LA", "PA", "P") or (image.mode == "P" and "transparency" not in image.info):
        return None
    alpha = np.asarray(image.convert("RGBA"), dtype=np.float32)[..., 3]
    if alpha.min() >= 128:
        return None
    return (alpha < 128).astype(np.float32)


def fit_mask(mask: np.ndarray, size: tuple[int, int]) -> tuple[np.ndarray, Optional[str]]:
    """The mask at the image's size (width, height), resized by nearest neighbour if it differs, with a note."""
    height, width = mask.shape
    if (width, height) == tuple(size):
        return mask, None
    resized = Image.fromarray((mask * 255).astype(np.uint8)).resize(size, resample=Image.NEAREST)
    note = f"mask {width}x{height} resized to the image's {size[0]}x{size[1]}"
    return (np.asarray(resized, dtype=np.float32) >= 128).astype(np.float32), note


def check_something_to_repaint(mask: np.ndarray) -> None:
    if not mask.any():
        raise UserInputError("the mask is all black: there is nothing to repaint; paint the region to repaint "
                             "white (or pass --invert_mask if it is painted black)")


def feather(mask: np.ndarray, pixels: int) -> np.ndarray:
    """Compositing weights: 0 outside the mask, rising linearly over `pixels` pixels inside it to 1 (the mean of
    the mask eroded 0, 1, ..., pixels - 1 times)."""
    if pixels <= 0:
        return mask
    image = Image.fromarray((mask * 255).astype(np.uint8))
    total = np.zeros(mask.shape, dtype=np.float32)
    for _ in range(pixels):
        total += np.asarray(image, dtype=np.float32) / 255.0
        image = image.filter(ImageFilter.MinFilter(3))
    return total / pixels


def parse_outpaint(text: str) -> tuple[int, int, int, int]:
    """'LEFT,TOP,RIGHT,BOTTOM' in pixels: four non-negative multiples of 8, not all zero."""
    parts = text.split(",")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        values = ()
    if len(values) != 4:
        raise UserInputError(f"--outpaint takes LEFT,TOP,RIGHT,BOTTOM in pixels, e.g. 0,0,128,0; got {text!r}")
    if any(v < 0 or v % OUTPAINT_MULTIPLE for v in values):
        raise UserInputError(f"--outpaint values must be non-negative multiples of {OUTPAINT_MULTIPLE} pixels, got "
                             f"{text}")
    if not any(values):
        raise UserInputError("--outpaint 0,0,0,0 grows nothing; give the pixels to add on some side")
    return values


def outpaint_canvas(image: Image.Image, mask: np.ndarray, borders: tuple[int, int, int, int]
                    ) -> tuple[Image.Image, np.ndarray]:
    """The image grown by (left, top, right, bottom) pixels and its mask, which adds the new border to the
    region to repaint. The border starts as the image's edge pixels stretched outwards and blurred (a start
    close in colour to its neighbours, so the sampler continues the image instead of fighting a flat fill)."""
    left, top, right, bottom = borders
    pixels = np.pad(np.asarray(image), ((top, bottom), (left, right), (0, 0)), mode="edge")
    grown = np.pad(mask, ((top, bottom), (left, right)), constant_values=1.0)
    border = np.ones(grown.shape, dtype=bool)
    border[top:top + image.height, left:left + image.width] = False
    radius = max(borders) / 4
    blurred = np.asarray(Image.fromarray(pixels).filter(ImageFilter.GaussianBlur(radius)))
    pixels = np.where(border[..., None], blurred, pixels)
    return Image.fromarray(pixels.astype(np.uint8)), grown


def composite(original: np.ndarray, generated: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """original * (1 - w) + generated * w per pixel (images (N, H, W, 3) or (H, W, 3) in [0, 1])."""
    w = weights[..., None]
    return original * (1.0 - w) + generated * w
