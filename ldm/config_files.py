"""Reading YAML configs: as OmegaConf objects (for merging and overrides, as training does) or as plain containers
(for building a model, which needs only the values)."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml
from omegaconf import DictConfig, OmegaConf
# OmegaConf has no public way to parse YAML without building its nodes: this private function is the one that
# `OmegaConf.load` uses, so the version of omegaconf is pinned in pyproject.toml (tests/test_config_files.py).
from omegaconf._yaml import get_yaml_loader

from ldm.errors import UserInputError, first_line


def _existing_file(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"config not found: {path}")
    return path


def load_config(path: str | os.PathLike) -> DictConfig:
    """Read a YAML config, with a clear error for a missing or unparsable file."""
    path = _existing_file(path)
    try:
        config = OmegaConf.load(path)
    except Exception as error:
        raise UserInputError(f"cannot parse config {path}: {first_line(error)}") from error
    if not isinstance(config, DictConfig):
        raise UserInputError(f"config {path} is not a YAML mapping")
    return config


def read_plain_config(path: str | os.PathLike) -> dict[str, Any]:
    """A YAML config as plain dicts and lists: what `OmegaConf.to_container(load_config(path), resolve=True)`
    gives, parsed by OmegaConf's YAML rules but without building its node objects, which took a sixth of the
    time of loading SD v1 from a .safetensors file. Files with `${...}` interpolations go through OmegaConf."""
    path = _existing_file(path)
    text = path.read_text(encoding="utf-8")
    if "${" in text:
        return OmegaConf.to_container(load_config(path), resolve=True)
    try:
        config = yaml.load(text, Loader=get_yaml_loader())
    except Exception as error:
        raise UserInputError(f"cannot parse config {path}: {first_line(error)}") from error
    if not isinstance(config, dict):
        raise UserInputError(f"config {path} is not a YAML mapping")
    return config
