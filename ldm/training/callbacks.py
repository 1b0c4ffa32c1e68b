"""Callbacks of `main.py`: the run directory's set-up, metrics written with each checkpoint, and
textual-inversion embedding files."""
from __future__ import annotations

import logging
import os
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf

from ldm.training.files import atomic_write_bytes

logger = logging.getLogger(__name__)


class SetupCallback(pl.Callback):
    """Creates `logdir/{checkpoints,configs}` and saves the merged project and Lightning configs there."""

    def __init__(self, now: str, logdir: str, ckptdir: str, cfgdir: str, config: DictConfig,
                 lightning_config: DictConfig):
        super().__init__()
        self.now = now
        self.logdir = logdir
        self.ckptdir = ckptdir
        self.cfgdir = cfgdir
        self.config = config
        self.lightning_config = lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not trainer.is_global_zero:
            return
        for directory in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(directory, exist_ok=True)
        for name, config in (("project", self.config), ("lightning", OmegaConf.create({"lightning": self.lightning_config}))):
            text = OmegaConf.to_yaml(config).encode()
            atomic_write_bytes(os.path.join(self.cfgdir, f"{self.now}-{name}.yaml"), lambda handle: handle.write(text))


class FlushLogsOnCheckpoint(pl.Callback):
    """Writes the loggers' buffered metrics (the CSV logger holds them for `flush_logs_every_n_steps`) with every
    checkpoint, so that a run killed without warning keeps the metrics logged up to its newest checkpoint."""

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            for run_logger in trainer.loggers:
                run_logger.save()


class EmbeddingCheckpoint(pl.Callback):
    """Textual inversion: with every checkpoint, save the learned embeddings as
    `embeddings_gs-<step>.pt` and `embeddings.pt` in the original format; with `trainable_only`, the
    Lightning checkpoint keeps only the weights that train (the frozen model comes from `actual_resume`)."""

    def __init__(self, ckptdir: str, trainable_only: bool):
        super().__init__()
        self.ckptdir = ckptdir
        self.trainable_only = trainable_only

    def save_embeddings(self, pl_module: pl.LightningModule, final: bool = False) -> None:
        manager = pl_module.embedding_manager
        os.makedirs(self.ckptdir, exist_ok=True)
        if not final:
            manager.save(os.path.join(self.ckptdir, f"embeddings_gs-{pl_module.global_step}.pt"))
        manager.save(os.path.join(self.ckptdir, "embeddings.pt"))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        if trainer.is_global_zero:
            self.save_embeddings(pl_module)
        if self.trainable_only:
            kept = {name for name, param in pl_module.named_parameters() if param.requires_grad}
            kept |= {key for key in checkpoint["state_dict"] if key.startswith("embedding_manager.")}
            checkpoint["state_dict"] = {key: value for key, value in checkpoint["state_dict"].items() if key in kept}

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.is_global_zero:
            self.save_embeddings(pl_module, final=True)
