"""The textual-inversion training set (Gal et al. 2022, sec. 4): the 3-5 images of a concept,
each paired with a caption drawn from CLIP's ImageNet templates with the placeholder in place of
the object's name ("a photo of a *", "a rendering of a *", ...).

Items are `{"image": HWC float32 in [-1, 1], "caption": str}`. Images are read with their EXIF
orientation applied (phone pictures need no manual rotation) and files that are not images are
skipped.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset

from ldm.data.image_io import load_rgb_image
from ldm.errors import UserInputError
from ldm.placeholder_tokens import per_img_token_list

logger = logging.getLogger(__name__)

imagenet_templates_smallest = [
    "a photo of a {}",
]

imagenet_templates_small = [
    "a photo of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a photo of a clean {}",
    "a photo of a dirty {}",
    "a dark photo of the {}",
    "a photo of my {}",
    "a photo of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a photo of the {}",
    "a good photo of the {}",
    "a photo of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a photo of the clean {}",
    "a rendition of a {}",
    "a photo of a nice {}",
    "a good photo of a {}",
    "a photo of the nice {}",
    "a photo of the small {}",
    "a photo of the weird {}",
    "a photo of the large {}",
    "a photo of a cool {}",
    "a photo of a small {}",
    "an illustration of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "an illustration of a clean {}",
    "an illustration of a dirty {}",
    "a dark photo of the {}",
    "an illustration of my {}",
    "an illustration of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "an illustration of the {}",
    "a good photo of the {}",
    "an illustration of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "an illustration of the clean {}",
    "a rendition of a {}",
    "an illustration of a nice {}",
    "a good photo of a {}",
    "an illustration of the nice {}",
    "an illustration of the small {}",
    "an illustration of the weird {}",
    "an illustration of the large {}",
    "an illustration of a cool {}",
    "an illustration of a small {}",
    "a depiction of a {}",
    "a rendering of a {}",
    "a cropped photo of the {}",
    "the photo of a {}",
    "a depiction of a clean {}",
    "a depiction of a dirty {}",
    "a dark photo of the {}",
    "a depiction of my {}",
    "a depiction of the cool {}",
    "a close-up photo of a {}",
    "a bright photo of the {}",
    "a cropped photo of a {}",
    "a depiction of the {}",
    "a good photo of the {}",
    "a depiction of one {}",
    "a close-up photo of the {}",
    "a rendition of the {}",
    "a depiction of the clean {}",
    "a rendition of a {}",
    "a depiction of a nice {}",
    "a good photo of a {}",
    "a depiction of the nice {}",
    "a depiction of the small {}",
    "a depiction of the weird {}",
    "a depiction of the large {}",
    "a depiction of a cool {}",
    "a depiction of a small {}",
]

imagenet_dual_templates_small = [
    "a photo of a {} with {}",
    "a rendering of a {} with {}",
    "a cropped photo of the {} with {}",
    "the photo of a {} with {}",
    "a photo of a clean {} with {}",
    "a photo of a dirty {} with {}",
    "a dark photo of the {} with {}",
    "a photo of my {} with {}",
    "a photo of the cool {} with {}",
    "a close-up photo of a {} with {}",
    "a bright photo of the {} with {}",
    "a cropped photo of a {} with {}",
    "a photo of the {} with {}",
    "a good photo of the {} with {}",
    "a photo of one {} with {}",
    "a close-up photo of the {} with {}",
    "a rendition of the {} with {}",
    "a photo of the clean {} with {}",
    "a rendition of a {} with {}",
    "a photo of a nice {} with {}",
    "a good photo of a {} with {}",
    "a photo of the nice {} with {}",
    "a photo of the small {} with {}",
    "a photo of the weird {} with {}",
    "a photo of the large {} with {}",
    "a photo of a cool {} with {}",
    "a photo of a small {} with {}",
]

INTERPOLATIONS = {
    "linear": Image.Resampling.BILINEAR,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}


def _is_image(path: Path) -> bool:
    try:
        with Image.open(path) as image:
            image.verify()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        return False
    return True


def find_images(data_root: str | os.PathLike) -> list[str]:
    """Sorted paths of the readable images directly inside `data_root`; other files are skipped."""
    root = Path(data_root)
    if not root.is_dir():
        raise UserInputError(f"data root {root} is not a directory; pass --data_root path/to/images")
    images, skipped = [], []
    for path in sorted(root.iterdir()):
        if path.is_file() and not path.name.startswith(".") and _is_image(path):
            images.append(str(path))
        elif path.is_file():
            skipped.append(path.name)
    if skipped:
        logger.info("skipping %d files in %s that are not images: %s", len(skipped), root, ", ".join(skipped[:5]))
    if not images:
        raise UserInputError(f"no images in {root}" + (f" (skipped {len(skipped)} files that are not images)"
                                                       if skipped else "") + "; put the 3-5 concept images there")
    return images


class PersonalizedBase(Dataset):
    """Images of one concept with template captions around the placeholder (object templates).

    `set="train"` repeats the images `repeats` times per epoch; any other value gives each image once.
    With `per_image_tokens`, a quarter (`mixing_prob`) of the captions also name the image's own
    placeholder ("a photo of a * with א"). `coarse_class_text` is put before the placeholder.
    """

    templates: Sequence[str] = imagenet_templates_small
    dual_templates: Sequence[str] = imagenet_dual_templates_small

    def __init__(self, data_root: str, size: Optional[int] = None, repeats: int = 100,
                 interpolation: str = "bicubic", flip_p: float = 0.5, set: str = "train",
                 placeholder_token: str = "*", per_image_tokens: bool = False, center_crop: bool = False,
                 mixing_prob: float = 0.25, coarse_class_text: Optional[str] = None):
        if interpolation not in INTERPOLATIONS:
            raise UserInputError(f"unknown interpolation {interpolation!r}; use one of {sorted(INTERPOLATIONS)}")
        self.data_root = data_root
        self.image_paths = find_images(data_root)
        self.num_images = len(self.image_paths)
        self._length = self.num_images * repeats if set == "train" else self.num_images
        self.placeholder_token = placeholder_token
        self.per_image_tokens = per_image_tokens
        self.center_crop = center_crop
        self.mixing_prob = mixing_prob
        self.coarse_class_text = coarse_class_text
        if per_image_tokens and self.num_images >= len(per_img_token_list):
            raise UserInputError(f"per_image_tokens supports fewer than {len(per_img_token_list)} images; "
                                 f"{data_root} has {self.num_images}")
        self.size = size
        self.interpolation = INTERPOLATIONS[interpolation]
        self.flip_p = flip_p

    def __len__(self) -> int:
        return self._length

    def caption(self, i: int) -> str:
        """A random template caption for image `i % num_images`."""
        placeholder = self.placeholder_token
        if self.coarse_class_text:
            placeholder = f"{self.coarse_class_text} {placeholder}"
        if self.per_image_tokens and torch.rand(()).item() < self.mixing_prob:
            template = self.dual_templates[int(torch.randint(len(self.dual_templates), ()))]
            return template.format(placeholder, per_img_token_list[i % self.num_images])
        return self.templates[int(torch.randint(len(self.templates), ()))].format(placeholder)

    def __getitem__(self, i: int) -> dict[str, object]:
        image = load_rgb_image(self.image_paths[i % self.num_images])
        if self.center_crop:
            width, height = image.size
            crop = min(width, height)
            left, top = (width - crop) // 2, (height - crop) // 2
            image = image.crop((left, top, left + crop, top + crop))
        if self.size is not None:
            image = image.resize((self.size, self.size), resample=self.interpolation)
        if torch.rand(()).item() < self.flip_p:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, dtype=np.uint8)
        return {"caption": self.caption(i), "image": (pixels / 127.5 - 1.0).astype(np.float32)}
