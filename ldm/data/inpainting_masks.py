"""Random masks for training inpainting models, and a data set wrapper that adds them to any captioned data set.

Stable Diffusion's inpainting checkpoints were fine-tuned on synthetic masks: "we generate synthetic masks and, in
25% mask everything" (RunwayML's sd-v1-5-inpainting model card), following "the mask-generation strategy presented
in LAMA" (Stability's stable-diffusion-2-inpainting model card). LaMa (Suvorov et al. 2022, arXiv:2109.07161; its
`saicinpainting/training/data/masks.py` and `configs/data_gen/random_{medium,thick}_512.yaml`) draws
thick random brush strokes (polylines of up to five segments with random direction, length and brush width) with
weight 1 and random axis-aligned boxes with weight 0.3. The generator of the released checkpoints itself was not
published: this one draws LaMa's "medium" and "thick" 512-pixel settings (sizes scaled to the image), with
directions uniform over the circle, and masks the whole image with probability 1/4.

Masks are float32 arrays, 1 where the image is to be repainted; the masked image is image * (mask < 0.5), as
`LatentInpaintDiffusion` and the original inpainting script make it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from ldm.util import instantiate_from_config

REFERENCE_SIZE = 512  # LaMa's settings below are in pixels of a 512 x 512 image
MIN_SEGMENT_LENGTH = 10.0  # LaMa: length = 10 + randint(max_len)
MIN_BRUSH_WIDTH = 5.0  # LaMa: width = 5 + randint(max_width)
MAX_SEGMENTS = 5  # LaMa: 1 + randint(5) segments per stroke


@dataclass(frozen=True)
class MaskSettings:
    """One of LaMa's random-mask settings (pixels at 512 x 512): `min_strokes`..`max_strokes` strokes whose segments
    are up to `max_len` + 10 long and `max_width` + 5 wide, or `min_boxes`..`max_boxes` boxes of sides
    `min_box`..`max_box` kept `margin` from the border."""

    min_strokes: int
    max_strokes: int
    max_len: float
    max_width: float
    min_boxes: int
    max_boxes: int
    margin: float
    min_box: float
    max_box: float


LAMA_SETTINGS = {
    "medium": MaskSettings(min_strokes=4, max_strokes=10, max_len=200, max_width=100,
                           min_boxes=1, max_boxes=5, margin=0, min_box=30, max_box=150),
    "thick": MaskSettings(min_strokes=1, max_strokes=5, max_len=450, max_width=250,
                          min_boxes=1, max_boxes=4, margin=10, min_box=30, max_box=300),
}


def draw_segment(mask: np.ndarray, start: tuple[float, float], end: tuple[float, float], width: float) -> None:
    """Set to 1 the pixels whose centres lie within width / 2 of the segment start-end (x, y): a brush stroke with
    round ends."""
    height, wide = mask.shape
    radius = max(width / 2.0, 0.5)
    (x0, y0), (x1, y1) = start, end
    left, right = max(int(math.floor(min(x0, x1) - radius)), 0), min(int(math.ceil(max(x0, x1) + radius)), wide - 1)
    top, bottom = max(int(math.floor(min(y0, y1) - radius)), 0), min(int(math.ceil(max(y0, y1) + radius)), height - 1)
    if left > right or top > bottom:
        return
    ys, xs = np.mgrid[top:bottom + 1, left:right + 1].astype(np.float64)
    dx, dy = x1 - x0, y1 - y0
    length_sq = dx * dx + dy * dy
    along = np.zeros_like(xs) if length_sq == 0 else np.clip(((xs - x0) * dx + (ys - y0) * dy) / length_sq, 0.0, 1.0)
    distance_sq = (xs - (x0 + along * dx)) ** 2 + (ys - (y0 + along * dy)) ** 2
    mask[top:bottom + 1, left:right + 1][distance_sq <= radius * radius] = 1.0


def stroke_mask(height: int, width: int, settings: MaskSettings, rng: np.random.Generator,
                scale: float = 1.0) -> np.ndarray:
    """LaMa's irregular mask: random polylines of thick brush strokes, each segment starting where the last ended."""
    mask = np.zeros((height, width), np.float32)
    for _ in range(int(rng.integers(settings.min_strokes, settings.max_strokes + 1))):
        x, y = float(rng.uniform(0, width)), float(rng.uniform(0, height))
        for _ in range(1 + int(rng.integers(MAX_SEGMENTS))):
            angle = float(rng.uniform(0.0, 2.0 * math.pi))
            length = scale * (MIN_SEGMENT_LENGTH + float(rng.uniform(0.0, settings.max_len)))
            brush = max(1.0, scale * (MIN_BRUSH_WIDTH + float(rng.uniform(0.0, settings.max_width))))
            end_x = min(max(x + length * math.cos(angle), 0.0), width - 1.0)
            end_y = min(max(y + length * math.sin(angle), 0.0), height - 1.0)
            draw_segment(mask, (x, y), (end_x, end_y), brush)
            x, y = end_x, end_y
    return mask


def box_mask(height: int, width: int, settings: MaskSettings, rng: np.random.Generator,
             scale: float = 1.0) -> np.ndarray:
    """LaMa's rectangle mask: random axis-aligned boxes inside a margin."""
    mask = np.zeros((height, width), np.float32)
    margin = int(round(settings.margin * scale))
    margin = min(margin, (min(height, width) - 1) // 2)
    largest = max(1, min(int(round(settings.max_box * scale)), height - 2 * margin, width - 2 * margin))
    smallest = max(1, min(int(round(settings.min_box * scale)), largest))
    for _ in range(int(rng.integers(settings.min_boxes, settings.max_boxes + 1))):
        box_w, box_h = (int(v) for v in rng.integers(smallest, largest + 1, size=2))
        left = int(rng.integers(margin, width - margin - box_w + 1))
        top = int(rng.integers(margin, height - margin - box_h + 1))
        mask[top:top + box_h, left:left + box_w] = 1.0
    return mask


class InpaintingMaskGenerator:
    """Random inpainting masks as Stable Diffusion's inpainting training drew them (see the module docstring).

    With probability `full_mask_p` the whole image is masked (the model then learns plain text-to-image); otherwise
    one of `variants` (LaMa's "medium", "thick") is picked uniformly, and within it boxes with probability `box_p`
    (LaMa's weights 0.3 against 1 for strokes), strokes otherwise. Sizes are LaMa's at 512 px, scaled by
    min(height, width) / 512.
    """

    def __init__(self, full_mask_p: float = 0.25, box_p: float = 0.3 / 1.3,
                 variants: Sequence[str] = ("medium", "thick")):
        if not 0.0 <= full_mask_p <= 1.0 or not 0.0 <= box_p <= 1.0:
            raise ValueError(f"full_mask_p and box_p are probabilities, got {full_mask_p} and {box_p}")
        unknown = [name for name in variants if name not in LAMA_SETTINGS]
        if unknown or not variants:
            raise ValueError(f"unknown mask variants {unknown}; choose from {sorted(LAMA_SETTINGS)}")
        self.full_mask_p = float(full_mask_p)
        self.box_p = float(box_p)
        self.variants = tuple(variants)

    def __call__(self, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
        """A [height, width] float32 mask, 1 = repaint, drawn from `rng`."""
        if rng.random() < self.full_mask_p:
            return np.ones((height, width), np.float32)
        settings = LAMA_SETTINGS[self.variants[int(rng.integers(len(self.variants)))]]
        scale = min(height, width) / REFERENCE_SIZE
        draw = box_mask if rng.random() < self.box_p else stroke_mask
        return draw(height, width, settings, rng, scale)


class InpaintingExamples(Dataset):
    """The examples of `dataset` with a random inpainting mask: each gets `mask_key` ([H, W, 1] float32, 1 =
    repaint) and `masked_image_key` (image * (mask < 0.5), HWC in [-1, 1]), the keys `LatentInpaintDiffusion`
    reads.

    `dataset` is a data set or its config (`target`/`params`), e.g. `ldm.data.captioned.CaptionedImages` or
    `ldm.data.shapes.SyntheticShapes`, whose examples hold an HWC image under `image_key`. `data_root`, when given,
    is passed on to that config (so `main.py --data_root` reaches it). `mask_generator` is a config of a callable
    (height, width, numpy Generator) -> mask; the default is `InpaintingMaskGenerator()`.

    Masks are seedable: with `seed`, example i's mask is the same in every epoch and worker (for validation);
    without it, every draw is new, seeded from torch's generator, which `main.py --seed` and the data loader's
    per-worker seeds make reproducible.
    """

    def __init__(self, dataset: Any, image_key: str = "jpg", mask_key: str = "mask",
                 masked_image_key: str = "masked_image", seed: Optional[int] = None,
                 mask_generator: Optional[Mapping[str, Any]] = None, data_root: Optional[str] = None):
        if isinstance(dataset, Mapping):
            dataset = dict(dataset)
            if data_root is not None:
                dataset["params"] = {**dict(dataset.get("params") or {}), "data_root": data_root}
            dataset = instantiate_from_config(dataset)
        elif data_root is not None:
            raise ValueError("data_root can only be passed on to a data set given as a config")
        self.dataset = dataset
        self.image_key = image_key
        self.mask_key = mask_key
        self.masked_image_key = masked_image_key
        self.seed = seed
        self.mask_generator = (instantiate_from_config(mask_generator) if mask_generator is not None
                               else InpaintingMaskGenerator())

    def __len__(self) -> int:
        return len(self.dataset)

    def rng(self, index: int) -> np.random.Generator:
        """The generator of example `index`'s mask."""
        if self.seed is not None:
            return np.random.default_rng([int(self.seed), int(index)])
        return np.random.default_rng(int(torch.randint(0, 2 ** 63 - 1, ()).item()))

    def __getitem__(self, index: int) -> dict[str, Any]:
        example = dict(self.dataset[index])
        image = example[self.image_key]
        height, width = image.shape[0], image.shape[1]
        mask = self.mask_generator(height, width, self.rng(index))[..., None].astype(np.float32)
        if torch.is_tensor(image):
            mask = torch.from_numpy(mask).to(image.dtype)
        example[self.mask_key] = mask
        example[self.masked_image_key] = image * (mask < 0.5)
        return example
