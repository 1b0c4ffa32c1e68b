"""A synthetic captioned data set for the demo model: one shape in one colour on a plain
background of another colour, drawn deterministically from a seed (no downloads).

"a red circle on a blue background" — 4 shapes x 8 colours x 7 background colours, varying
size and position, captioned through a few templates.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw
from torch.utils.data import Dataset

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 190),
    "orange": (245, 140, 30),
    "white": (240, 240, 240),
    "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "star")
TEMPLATES = (
    "a {color} {shape} on a {background} background",
    "a {shape} in {color} on a {background} background",
    "{color} {shape}, {background} background",
    "a picture of a {color} {shape} on {background}",
)
SUPERSAMPLING = 4


@dataclass(frozen=True)
class ShapeSpec:
    """What one image shows: a shape of a colour, centred at (cx, cy) with radius r, on a background."""

    shape: str
    color: str
    background: str
    cx: float
    cy: float
    radius: float

    def caption(self, template: str = TEMPLATES[0]) -> str:
        return template.format(color=self.color, shape=self.shape, background=self.background)


def shape_polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    """Vertices of a square, upright triangle or five-pointed star of circumradius r."""
    if shape == "square":
        half = r / math.sqrt(2)
        return [(cx - half, cy - half), (cx + half, cy - half), (cx + half, cy + half), (cx - half, cy + half)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy - r * math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]
    if shape == "star":
        points = []
        for k in range(10):
            radius = r if k % 2 == 0 else 0.42 * r
            angle = math.pi / 2 + k * math.pi / 5
            points.append((cx + radius * math.cos(angle), cy - radius * math.sin(angle)))
        return points
    raise ValueError(f"unknown shape {shape!r}; choose from {SHAPES}")


def render(spec: ShapeSpec, size: int = 64) -> Image.Image:
    """Draw `spec` as an anti-aliased RGB image of size x size pixels."""
    scale = SUPERSAMPLING * size / 64.0
    canvas = Image.new("RGB", (size * SUPERSAMPLING, size * SUPERSAMPLING), COLORS[spec.background])
    draw = ImageDraw.Draw(canvas)
    cx, cy, r = spec.cx * scale, spec.cy * scale, spec.radius * scale
    if spec.shape == "circle":
        draw.ellipse([cx - r * 0.85, cy - r * 0.85, cx + r * 0.85, cy + r * 0.85], fill=COLORS[spec.color])
    else:
        draw.polygon(shape_polygon(spec.shape, cx, cy, r), fill=COLORS[spec.color])
    return canvas.resize((size, size), Image.Resampling.LANCZOS)


def shape_box_mask(spec: ShapeSpec, size: int, margin: int = 2) -> np.ndarray:
    """A float mask of size x size pixels, 1 on the box that covers `spec`'s shape with `margin` pixels to spare
    (an inpainting mask that hides the whole shape)."""
    scale = size / 64.0
    mask = np.zeros((size, size), dtype=np.float32)
    low = [max(0, math.floor((v - spec.radius) * scale) - margin) for v in (spec.cx, spec.cy)]
    high = [min(size, math.ceil((v + spec.radius) * scale) + margin) for v in (spec.cx, spec.cy)]
    mask[low[1]:high[1], low[0]:high[0]] = 1.0
    return mask


def random_spec(rng: np.random.Generator, shapes: Sequence[str] = SHAPES, colors: Sequence[str] = tuple(COLORS),
                exclude: Iterable[tuple[str, str]] = ()) -> ShapeSpec:
    """A random shape, colour, background (another colour), size and position within a 64-px frame."""
    excluded = {tuple(pair) for pair in exclude}
    while True:
        shape = str(rng.choice(list(shapes)))
        color = str(rng.choice(list(colors)))
        if (color, shape) not in excluded:
            break
    background = str(rng.choice([c for c in COLORS if c != color]))
    radius = float(rng.uniform(16.0, 26.0))
    margin = radius + 2.0
    cx, cy = (float(v) for v in rng.uniform(margin, 64.0 - margin, size=2))
    return ShapeSpec(shape, color, background, cx, cy, radius)


def _template_pattern(template: str) -> re.Pattern:
    fields = {"color": "(?P<color>[a-z]+)", "shape": "(?P<shape>[a-z]+)", "background": "(?P<background>[a-z]+)"}
    return re.compile("^" + re.escape(template).replace(r"\{", "{").replace(r"\}", "}").format(**fields) + "$")


_TEMPLATE_PATTERNS = tuple(_template_pattern(template) for template in TEMPLATES)


def parse_caption(caption: str) -> Optional[tuple[str, str, str]]:
    """(colour, shape, background) of a caption written through one of TEMPLATES, e.g. "a red circle on a blue
    background"; None for any other text or unknown colours and shapes."""
    for pattern in _TEMPLATE_PATTERNS:
        match = pattern.match(caption.strip())
        if match and match["color"] in COLORS and match["background"] in COLORS and match["shape"] in SHAPES:
            return match["color"], match["shape"], match["background"]
    return None


class SyntheticShapes(Dataset):
    """Captioned shape images generated on the fly; item i is the same for the same seed.

    Items are dicts {image_key: HWC float32 in [-1, 1], caption_key: str}. `exclude` lists
    (colour, shape) pairs never shown (held out for textual inversion).
    """

    def __init__(self, size: int = 64, length: int = 100_000, seed: int = 0,
                 exclude: Optional[Sequence[Sequence[str]]] = None, image_key: str = "image",
                 caption_key: str = "caption", templates: Sequence[str] = TEMPLATES):
        self.size = size
        self.length = length
        self.seed = seed
        self.exclude = [tuple(pair) for pair in (exclude or [])]
        self.image_key = image_key
        self.caption_key = caption_key
        self.templates = tuple(templates)

    def __len__(self) -> int:
        return self.length

    def spec(self, index: int) -> tuple[ShapeSpec, str]:
        rng = np.random.default_rng([self.seed, index])
        spec = random_spec(rng, exclude=self.exclude)
        return spec, spec.caption(self.templates[int(rng.integers(len(self.templates)))])

    def __getitem__(self, index: int) -> dict:
        spec, caption = self.spec(index)
        image = np.asarray(render(spec, self.size), dtype=np.float32) / 127.5 - 1.0
        return {self.image_key: image, self.caption_key: caption}
