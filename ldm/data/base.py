"""Shared pieces of the datasets: the iterable-dataset interface of the original `ldm.data.base`, and
the image preprocessing of training (resize, square crop, horizontal flip, scaling to [-1, 1])."""
from __future__ import annotations

from abc import abstractmethod
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import IterableDataset

from ldm.errors import UserInputError

INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
CROPS = ("random", "center", "none")


class Txt2ImgIterableBaseDataset(IterableDataset):
    """Interface of chainable iterable text-to-image datasets; `main.worker_init_fn` splits
    `valid_ids` between data-loader workers through `sample_ids`."""

    def __init__(self, num_records: int = 0, valid_ids: Optional[Sequence[int]] = None, size: int = 256):
        super().__init__()
        self.num_records = num_records
        self.valid_ids = valid_ids
        self.sample_ids = valid_ids
        self.size = size

    def __len__(self) -> int:
        return self.num_records

    @abstractmethod
    def __iter__(self) -> Iterator[dict]:
        ...


class ImageTransform:
    """PIL image -> HWC float32 array in [-1, 1] of shape (size, size, 3).

    The shorter side is resized to `size`, then a square is cut out: at a random place (`crop="random"`),
    in the middle (`"center"`), or not at all, the whole image being stretched to a square (`"none"`).
    With probability `flip_p` the result is mirrored left-right. Randomness comes from torch's generator,
    which the data loader seeds differently in every worker.
    """

    def __init__(self, size: int, crop: str = "random", flip_p: float = 0.0, interpolation: str = "bicubic"):
        if crop not in CROPS:
            raise UserInputError(f"crop must be one of {', '.join(CROPS)}, got {crop!r}")
        if interpolation not in INTERPOLATIONS:
            raise UserInputError(f"interpolation must be one of {', '.join(INTERPOLATIONS)}, got {interpolation!r}")
        if not 0.0 <= flip_p <= 1.0:
            raise UserInputError(f"flip_p must be a probability between 0 and 1, got {flip_p}")
        if size <= 0:
            raise UserInputError(f"image size must be positive, got {size}")
        self.size = int(size)
        self.crop = crop
        self.flip_p = float(flip_p)
        self.resample = INTERPOLATIONS[interpolation]

    def __call__(self, image: Image.Image) -> np.ndarray:
        image = self.resize_and_crop(image)
        if self.flip_p > 0 and torch.rand(()).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return to_model_array(image)

    def resize_and_crop(self, image: Image.Image) -> Image.Image:
        size = self.size
        if self.crop == "none":
            return image.resize((size, size), resample=self.resample)
        width, height = image.size
        scale = size / min(width, height)
        new_width, new_height = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_width, new_height), resample=self.resample)
        if self.crop == "center":
            left, top = (new_width - size) // 2, (new_height - size) // 2
        else:
            left = int(torch.randint(0, new_width - size + 1, ()).item())
            top = int(torch.randint(0, new_height - size + 1, ()).item())
        return image.crop((left, top, left + size, top + size))


def to_model_array(image: Image.Image) -> np.ndarray:
    """RGB PIL image -> HWC float32 array in [-1, 1], the layout the models' `get_input` expects."""
    return (np.asarray(image.convert("RGB"), dtype=np.float32) / 127.5 - 1.0).astype(np.float32)
