"""Building the Lightning `Trainer` of a run from the config's `lightning` section and `--gpus`."""
from __future__ import annotations

import difflib
import inspect
import logging
import os
from typing import Any

import pytorch_lightning as pl
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.loggers import CSVLogger

from ldm.errors import UserInputError
from ldm.training.callbacks import EmbeddingCheckpoint, FlushLogsOnCheckpoint, SetupCallback
from ldm.training.checkpoint_io import AtomicCheckpointIO
from ldm.training.run import RunPaths
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

_SET_BY_MAIN = ("logger", "callbacks", "plugins", "default_root_dir")


def check_trainer_options(trainer_config: dict[str, Any]) -> None:
    """Refuse a `lightning.trainer` key that `pl.Trainer` does not take (naming the closest ones it does), or one
    that `main.py` sets itself."""
    valid = [name for name in inspect.signature(pl.Trainer.__init__).parameters if name != "self"]
    for key in trainer_config:
        if key in _SET_BY_MAIN:
            raise UserInputError(f"lightning.trainer.{key} is set by main.py itself; remove it from the config"
                                 + (" (callbacks go in lightning.callbacks)" if key == "callbacks" else ""))
        if key not in valid:
            close = difflib.get_close_matches(key, valid, n=3)
            hint = f"did you mean {' or '.join(close)}?" if close else "see the arguments of pytorch_lightning.Trainer"
            raise UserInputError(f"lightning.trainer.{key} is not a Lightning Trainer option: {hint}")


def checkpoint_callback(model: Any, paths: RunPaths, lightning_config: DictConfig, has_validation: bool) -> Any:
    """The original's ModelCheckpoint: `last.ckpt` always (overwritten in place, also after a resume); the best
    3 by the model's `monitor` when there is validation data; `lightning.modelcheckpoint.params` override.
    With `every_n_train_steps` and no explicit monitor, every periodic checkpoint is kept, whether or not a
    validation metric exists yet. Files are `epoch=NNNNNN-step=NNNNNNNNN.ckpt`."""
    params: dict[str, Any] = {"dirpath": paths.ckptdir, "filename": "{epoch:06}-{step:09}", "verbose": True,
                              "save_last": True, "enable_version_counter": False}
    overrides = OmegaConf.select(lightning_config, "modelcheckpoint.params", default=None)
    overrides = OmegaConf.to_container(overrides, resolve=True) if overrides is not None else {}
    monitor = getattr(model, "monitor", None)
    if overrides.get("every_n_train_steps") and "monitor" not in overrides:
        params.update(save_top_k=-1)
    elif monitor and has_validation:
        params.update(monitor=monitor, save_top_k=3)
    params.update(overrides)
    return pl.callbacks.ModelCheckpoint(**params)


class LastCheckpoint(pl.Callback):
    """`last.ckpt` at the end of training, and on an exception or Ctrl-C (the original's `melk`), so that
    `-r` goes on from exactly where the run stopped."""

    def __init__(self, ckptdir: str):
        super().__init__()
        self.ckptdir = ckptdir

    @property
    def path(self) -> str:
        return os.path.join(self.ckptdir, "last.ckpt")

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        trainer.save_checkpoint(self.path, weights_only=False)

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0 or isinstance(exception, UserInputError):
            return
        logger.warning("training stopped (%s): saving %s", type(exception).__name__, self.path)
        trainer.save_checkpoint(self.path, weights_only=False)


def build_callbacks(model: Any, paths: RunPaths, config: DictConfig, lightning_config: DictConfig,
                    has_validation: bool, trainable_only: bool) -> list[pl.Callback]:
    callbacks_config = OmegaConf.merge(
        {"image_logger": {"target": "ldm.training.image_logger.ImageLogger",
                          "params": {"batch_frequency": 750, "max_images": 4, "clamp": True}},
         "learning_rate_logger": {"target": "pytorch_lightning.callbacks.LearningRateMonitor",
                                  "params": {"logging_interval": "step"}}},
        lightning_config.get("callbacks", {}))
    callbacks = [SetupCallback(paths.now, paths.logdir, paths.ckptdir, paths.cfgdir, config, lightning_config),
                 checkpoint_callback(model, paths, lightning_config, has_validation),
                 LastCheckpoint(paths.ckptdir), FlushLogsOnCheckpoint()]
    callbacks += [instantiate_from_config(callbacks_config[name]) for name in callbacks_config]
    if getattr(model, "embedding_manager", None) is not None:
        callbacks.append(EmbeddingCheckpoint(paths.ckptdir, trainable_only))
    return callbacks


def build_trainer(model: Any, paths: RunPaths, config: DictConfig, lightning_config: DictConfig,
                  trainer_config: dict[str, Any], has_validation: bool, trainable_only: bool) -> pl.Trainer:
    """The run's Trainer. An integer `val_check_interval` counts training batches across epochs (it may exceed
    an epoch) unless the config sets `check_val_every_n_epoch`."""
    interval = trainer_config.get("val_check_interval")
    if isinstance(interval, int) and not isinstance(interval, bool):
        trainer_config.setdefault("check_val_every_n_epoch", None)
    if not has_validation:
        trainer_config["limit_val_batches"] = 0
    if not getattr(model, "automatic_optimization", True) and trainer_config.get("strategy") == "ddp":
        trainer_config["strategy"] = "ddp_find_unused_parameters_true"
    return pl.Trainer(
        **trainer_config,
        logger=CSVLogger(save_dir=paths.logdir, name="csv", version=paths.now),
        callbacks=build_callbacks(model, paths, config, lightning_config, has_validation, trainable_only),
        plugins=[AtomicCheckpointIO()],
        default_root_dir=paths.logdir,
    )
