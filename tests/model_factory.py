"""Tiny models with random, non-zero weights for tests (the original zero-initialises output
layers, which would make every comparison pass vacuously)."""
from __future__ import annotations

from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ldm.util import instantiate_from_config

TESTS_DIR = Path(__file__).resolve().parent
REPO_DIR = TESTS_DIR.parent
TINY_SD_CONFIG = TESTS_DIR / "configs" / "tiny-sd.yaml"
DATA_DIR = TESTS_DIR / "data"


def tiny_config() -> DictConfig:
    return OmegaConf.load(TINY_SD_CONFIG)


@torch.no_grad()
def randomize_(module: torch.nn.Module, seed: int = 0, scale: float = 0.05) -> torch.nn.Module:
    """Add seeded noise to every floating parameter, so no layer stays at its zero initialisation."""
    generator = torch.Generator().manual_seed(seed)
    for param in module.parameters():
        param.add_(torch.randn(param.shape, generator=generator) * scale)
    return module


def random_tiny_model(seed: int = 0, config: DictConfig | None = None) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = instantiate_from_config((config or tiny_config()).model)
    return randomize_(model, seed).eval()
