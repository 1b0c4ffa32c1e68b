"""`ImageLogger`: the original callback that calls `model.log_images` every `batch_frequency` batches
and writes each returned image batch as a PNG grid under `<logdir>/images/<split>/`."""
from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from PIL import Image

from ldm.training.files import atomic_write_bytes


class ImageLogger(pl.Callback):
    """Image grids of `log_images` at steps 1, 2, 4, ... (with `increase_log_steps`) and every `batch_frequency`."""

    def __init__(self, batch_frequency: int, max_images: int, clamp: bool = True, increase_log_steps: bool = True,
                 rescale: bool = True, disabled: bool = False, log_on_batch_idx: bool = False,
                 log_first_step: bool = False, log_images_kwargs: Optional[dict] = None):
        super().__init__()
        self.batch_freq = max(1, int(batch_frequency))
        self.max_images = max_images
        self.log_steps = ([2 ** n for n in range(int(np.log2(self.batch_freq)) + 1)] if increase_log_steps
                          else [self.batch_freq])
        self.clamp = clamp
        self.rescale = rescale
        self.disabled = disabled
        self.log_on_batch_idx = log_on_batch_idx
        self.log_first_step = log_first_step
        self.log_images_kwargs = dict(log_images_kwargs or {})
        self.previous_idx: dict[str, int] = {}

    def log_local(self, save_dir: str, split: str, images: dict[str, torch.Tensor], global_step: int,
                  current_epoch: int, batch_idx: int) -> None:
        root = os.path.join(save_dir, "images", split)
        os.makedirs(root, exist_ok=True)
        for key, batch in images.items():
            grid = torchvision.utils.make_grid(batch, nrow=4)
            if self.rescale:
                grid = (grid + 1.0) / 2.0
            array = (grid.permute(1, 2, 0).clamp(0, 1).numpy() * 255).round().astype(np.uint8)
            filename = f"{key}_gs-{global_step:06}_e-{current_epoch:06}_b-{batch_idx:06}.png"
            atomic_write_bytes(os.path.join(root, filename), lambda handle: Image.fromarray(array).save(handle, "PNG"))

    def check_frequency(self, check_idx: int, split: str = "train") -> bool:
        """Whether a logging step (a multiple of `batch_frequency`, or one of 1, 2, 4, ...) was reached since the
        last call; counting by crossing, not equality, because Lightning 2 advances `global_step` once per
        optimizer step, i.e. by two per batch for an autoencoder training its discriminator."""
        previous = self.previous_idx.get(split, -1)
        self.previous_idx[split] = check_idx
        if check_idx <= 0 and not self.log_first_step:
            return False
        due = [step for step in self.log_steps if previous < step <= check_idx]
        if due:
            self.log_steps = [step for step in self.log_steps if step > check_idx]
        return bool(due) or check_idx // self.batch_freq > max(previous, 0) // self.batch_freq or (
            check_idx == 0 and previous < 0)

    def log_img(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int,
                split: str = "train") -> None:
        check_idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if (self.disabled or self.max_images <= 0 or not callable(getattr(pl_module, "log_images", None))
                or not self.check_frequency(check_idx, split) or trainer.logger is None):
            return
        was_training = pl_module.training
        if was_training:
            pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, split=split, **self.log_images_kwargs)
        images = {key: value[: self.max_images].detach().float().cpu() for key, value in images.items()
                  if isinstance(value, torch.Tensor)}
        if self.clamp:
            images = {key: value.clamp(-1.0, 1.0) for key, value in images.items()}
        if trainer.is_global_zero:
            self.log_local(trainer.logger.save_dir, split, images, pl_module.global_step, pl_module.current_epoch,
                           batch_idx)
        if was_training:
            pl_module.train()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if pl_module.global_step > 0 or self.log_first_step:
            self.log_img(trainer, pl_module, batch, batch_idx, split="train")

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if pl_module.global_step > 0 and not trainer.sanity_checking:
            self.log_img(trainer, pl_module, batch, batch_idx, split="val")
