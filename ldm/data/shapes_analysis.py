"""Read back what a shape image shows, with simple image analysis: background colour from the
border, foreground colour from the pixels that differ from it, and the shape by matching its mask
against the four upright shape templates of the same area and centre."""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from PIL import Image, ImageDraw

from ldm.data.shapes import COLORS, shape_polygon

_PALETTE_NAMES = list(COLORS)
_PALETTE = np.array([COLORS[name] for name in _PALETTE_NAMES], dtype=np.float32)


@dataclass(frozen=True)
class Reading:
    """What the analysis saw; `shape` is None when no foreground was found."""

    color: str
    shape: str | None
    background: str


def nearest_color(rgb: np.ndarray) -> str:
    return _PALETTE_NAMES[int(np.argmin(((_PALETTE - rgb[None]) ** 2).sum(axis=1)))]


# Area of each shape as drawn by `ldm.data.shapes.render`, per squared circumradius.
AREA_PER_SQUARED_RADIUS = {
    "circle": math.pi * 0.85 ** 2,
    "square": 2.0,
    "triangle": 3.0 * math.sqrt(3.0) / 4.0,
    "star": 10 * 0.5 * 0.42 * math.sin(math.pi / 5),
}
TEMPLATE_SUPERSAMPLING = 4


def shape_template(shape: str, cx: float, cy: float, radius: float, height: int, width: int) -> np.ndarray:
    """Boolean mask of `shape` drawn as the generator draws it, centred at pixel (cx, cy)."""
    scale = TEMPLATE_SUPERSAMPLING
    canvas = Image.new("L", (width * scale, height * scale), 0)
    draw = ImageDraw.Draw(canvas)
    x, y, r = (cx + 0.5) * scale, (cy + 0.5) * scale, radius * scale
    if shape == "circle":
        draw.ellipse([x - 0.85 * r, y - 0.85 * r, x + 0.85 * r, y + 0.85 * r], fill=255)
    else:
        draw.polygon(shape_polygon(shape, x, y, r), fill=255)
    return np.asarray(canvas.resize((width, height), Image.Resampling.BOX)) >= 128


def classify_mask(mask: np.ndarray) -> str | None:
    """circle, square, triangle or star: the upright template of the mask's area and centroid that
    overlaps it best (intersection over union). Every shape's centroid is its centre."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    area, cy, cx = float(len(xs)), float(ys.mean()), float(xs.mean())
    overlaps = {}
    for shape, area_factor in AREA_PER_SQUARED_RADIUS.items():
        template = shape_template(shape, cx, cy, math.sqrt(area / area_factor), *mask.shape)
        overlaps[shape] = (template & mask).sum() / max((template | mask).sum(), 1)
    return max(overlaps, key=overlaps.get)


def read_image(image: Image.Image | np.ndarray) -> Reading:
    """Background colour, foreground colour and shape of an RGB image of one shape."""
    pixels = np.asarray(image.convert("RGB") if isinstance(image, Image.Image) else image, dtype=np.float32)
    border = np.concatenate([pixels[:2].reshape(-1, 3), pixels[-2:].reshape(-1, 3),
                             pixels[:, :2].reshape(-1, 3), pixels[:, -2:].reshape(-1, 3)])
    background_rgb = np.median(border, axis=0)
    background = nearest_color(background_rgb)
    distance = np.sqrt(((pixels - _PALETTE[_PALETTE_NAMES.index(background)]) ** 2).sum(axis=2))
    mask = distance > 60.0
    if mask.sum() < 12:
        return Reading(color=background, shape=None, background=background)
    color = nearest_color(np.median(pixels[mask], axis=0))
    own = np.sqrt(((pixels - _PALETTE[_PALETTE_NAMES.index(color)]) ** 2).sum(axis=2))
    shape_mask = mask & (own < distance)
    return Reading(color=color, shape=classify_mask(shape_mask), background=background)
