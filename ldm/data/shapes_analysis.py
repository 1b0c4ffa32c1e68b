"""Read back what a shape image shows, with simple image analysis: background colour from the
border, foreground colour from the pixels that differ from it, and the shape from the harmonics of
its outline (a triangle's radius varies three times around it, a square's four, a star's five)."""
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


# Shapes by the harmonic that dominates their outline's radius-versus-angle profile, and the amplitude
# (relative to the mean radius) from which that harmonic counts; below all of them the outline is a circle.
HARMONIC_SHAPES = {3: "triangle", 4: "square", 5: "star"}
HARMONIC_LEVELS = {3: 0.04, 4: 0.03, 5: 0.03}
ANGLE_BINS = 90


def radial_profile(mask: np.ndarray, bins: int = ANGLE_BINS) -> np.ndarray:
    """Distance from the mask's centroid to its outline in `bins` directions (the farthest edge pixel)."""
    ys, xs = np.nonzero(mask)
    cy, cx = ys.mean(), xs.mean()
    padded = np.pad(mask, 1)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    edge_y, edge_x = np.nonzero(mask & ~interior)
    angles = np.arctan2(edge_y - cy, edge_x - cx)
    direction = ((angles + np.pi) / (2 * np.pi) * bins).astype(int) % bins
    profile = np.zeros(bins)
    np.maximum.at(profile, direction, np.hypot(edge_y - cy, edge_x - cx) + 0.5)
    seen = profile > 0
    grid = np.arange(bins)
    return np.interp(grid, grid[seen], profile[seen], period=bins)


def classify_mask(mask: np.ndarray) -> str | None:
    """circle, square, triangle or star from a boolean foreground mask, by the strongest of the 3rd,
    4th and 5th harmonics of its outline (robust to the soft edges of generated images)."""
    if mask.sum() < 12:
        return None
    profile = radial_profile(mask)
    spectrum = np.abs(np.fft.rfft(profile)) / (len(profile) * profile.mean())
    scores = {k: spectrum[k] / level for k, level in HARMONIC_LEVELS.items()}
    strongest = max(scores, key=scores.get)
    return HARMONIC_SHAPES[strongest] if scores[strongest] >= 1.0 else "circle"


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
