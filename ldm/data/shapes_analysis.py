"""Read back what a shape image shows, with simple image analysis: background colour from the
border, foreground colour from the pixels that differ from it, and the shape from two
measures of its mask (fill of the bounding box, and solidity = area / convex-hull area)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image

from ldm.data.shapes import COLORS

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


def convex_hull_area(points: np.ndarray) -> float:
    """Area of the convex hull of 2-D points (Andrew's monotone chain, then the shoelace formula)."""
    pts = sorted(set(map(tuple, points.tolist())))
    if len(pts) < 3:
        return 0.0

    def half(sequence):
        hull: list = []
        for p in sequence:
            while len(hull) >= 2 and ((hull[-1][0] - hull[-2][0]) * (p[1] - hull[-2][1])
                                      - (hull[-1][1] - hull[-2][1]) * (p[0] - hull[-2][0])) <= 0:
                hull.pop()
            hull.append(p)
        return hull

    hull = np.array(half(pts)[:-1] + half(pts[::-1])[:-1], dtype=np.float64)
    x, y = hull[:, 0], hull[:, 1]
    return 0.5 * abs(float(np.dot(x, np.roll(y, -1)) - np.dot(y, np.roll(x, -1))))


def classify_mask(mask: np.ndarray) -> str | None:
    """circle, square, triangle or star from a boolean foreground mask."""
    ys, xs = np.nonzero(mask)
    if len(xs) < 12:
        return None
    area = float(len(xs))
    box = float((xs.max() - xs.min() + 1) * (ys.max() - ys.min() + 1))
    corners = np.concatenate([np.stack([xs + dx, ys + dy], 1) for dx in (0, 1) for dy in (0, 1)])
    solidity = area / max(convex_hull_area(corners), 1.0)
    fill = area / box
    if solidity < 0.8:
        return "star"
    if fill > 0.88:
        return "square"
    if fill > 0.66:
        return "circle"
    return "triangle"


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
