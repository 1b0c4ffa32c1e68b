"""Where a training run lives and what it is configured with: the log directory, the resumed
checkpoint, and the configs merged from `--base` files and `key=value` overrides (as the original `main.py`)."""
from __future__ import annotations

import datetime
import glob
import os
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import DictConfig, OmegaConf

from ldm.config_files import load_config
from ldm.errors import UserInputError, first_line
from ldm.training.config_checks import refuse_non_finite_overrides, refuse_non_finite_values


@dataclass
class RunPaths:
    now: str
    nowname: str
    logdir: str
    resume_checkpoint: Optional[str]

    @property
    def ckptdir(self) -> str:
        return os.path.join(self.logdir, "checkpoints")

    @property
    def cfgdir(self) -> str:
        return os.path.join(self.logdir, "configs")


def _timestamp() -> str:
    return datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")


def resolve_resume(resume: str) -> tuple[str, str]:
    """(log directory, checkpoint) of `-r`: a run directory (its `checkpoints/last.ckpt`) or a checkpoint in one."""
    if not os.path.exists(resume):
        raise UserInputError(f"cannot resume: {resume} does not exist; give a log directory (logs/<run>) or a "
                             "checkpoint in one")
    if os.path.isfile(resume):
        parent = os.path.dirname(os.path.abspath(resume))
        if os.path.basename(parent) != "checkpoints":
            raise UserInputError(f"cannot resume from {resume}: a checkpoint to resume must lie in a run's "
                                 "checkpoints/ folder (logs/<run>/checkpoints/last.ckpt)")
        return os.path.dirname(parent), resume
    logdir = os.path.normpath(resume)
    checkpoint = os.path.join(logdir, "checkpoints", "last.ckpt")
    if not os.path.isfile(checkpoint):
        raise UserInputError(f"cannot resume {resume}: it is not a training run (no checkpoints/last.ckpt in it)")
    return logdir, checkpoint


def run_paths(base: Sequence[str], name: str, resume: str, logdir: str, postfix: str, project: Optional[str]
              ) -> tuple[RunPaths, list[str]]:
    """The run's paths and the config files to merge (a resumed run's saved configs come first)."""
    now = _timestamp()
    if name and resume:
        raise UserInputError("-n/--name and -r/--resume cannot be given together: a resumed run keeps its name")
    if resume:
        run_dir, checkpoint = resolve_resume(resume)
        saved = sorted(glob.glob(os.path.join(run_dir, "configs", "*.yaml")))
        if not saved:
            raise UserInputError(f"cannot resume {resume}: {run_dir}/configs holds no saved config")
        return RunPaths(now, os.path.basename(run_dir), run_dir, checkpoint), saved + list(base)
    if name:
        suffix = "_" + name
    elif base:
        suffix = "_" + os.path.splitext(os.path.basename(base[0]))[0]
    else:
        suffix = ""
    nowname = now + suffix + postfix
    root = os.path.join(logdir, project) if project else logdir
    return RunPaths(now, nowname, os.path.join(root, nowname), None), list(base)


def merged_config(files: Sequence[str], overrides: Sequence[str]) -> tuple[DictConfig, DictConfig]:
    """(project config, its `lightning` section), from config files merged left to right and then
    `key=value` dot-list overrides; NaN and infinite numbers are refused."""
    if not files:
        raise UserInputError("no config given: pass one with --base configs/<name>.yaml")
    for item in overrides:
        if item.startswith("-") or "=" not in item:
            raise UserInputError(f"unrecognised argument {item!r}: options are listed by --help, config overrides "
                                 "are written key=value (e.g. lightning.trainer.max_steps=100)")
    refuse_non_finite_overrides(overrides)
    configs = [load_config(path) for path in files]
    try:
        config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(list(overrides)))
    except Exception as error:
        raise UserInputError(f"cannot merge the configs: {first_line(error)}") from error
    refuse_non_finite_values(config)
    lightning_config = config.pop("lightning", OmegaConf.create())
    if "model" not in config:
        raise UserInputError(f"the config ({', '.join(files)}) has no model section")
    return config, lightning_config
