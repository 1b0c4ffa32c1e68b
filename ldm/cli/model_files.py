"""--vae and --lora: files applied to the loaded model before sampling, and what the PNG text records of them
with the web UIs' names (`VAE hash`, `VAE`, `Lora hashes`)."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from torch import nn

from ldm.cli.hashing import BackgroundHash, lora_short_hash
from ldm.lora import apply_lora, read_lora
from ldm.vae_files import load_vae

logger = logging.getLogger(__name__)

NAME_SEPARATORS = str.maketrans("", "", ":,")  # what the web UIs strip from a LoRA's name in 'Lora hashes'


@dataclass(frozen=True)
class MergedLora:
    """A LoRA merged for this run: its name (the file's stem), weight and web-UI hash."""

    name: str
    weight: float
    short_hash: str


@dataclass(frozen=True)
class ModelFiles:
    """The VAE and LoRA files a run applied to its model."""

    vae: Optional[Path] = None
    vae_hash: Optional[BackgroundHash] = None
    loras: tuple[MergedLora, ...] = ()

    def fields(self) -> dict[str, Any]:
        """PNG fields: 'VAE hash', 'VAE' (the file's name), 'Lora hashes' and this project's 'Lora weights'."""
        fields: dict[str, Any] = {}
        if self.vae is not None:
            fields["VAE hash"] = self.vae_hash.short() if self.vae_hash else None
            fields["VAE"] = self.vae.name
        if self.loras:
            fields["Lora hashes"] = ", ".join(f"{lora.name.translate(NAME_SEPARATORS)}: {lora.short_hash}"
                                              for lora in self.loras)
            fields["Lora weights"] = ", ".join(f"{lora.name.translate(NAME_SEPARATORS)}: {lora.weight:g}"
                                               for lora in self.loras)
        return fields


def apply_model_files(model: nn.Module, opt: argparse.Namespace) -> ModelFiles:
    """Load `opt.vae` over the model's autoencoder, then merge each `opt.lora` (path, weight) into its weights
    (for good: the run never takes them out, so no copies of the original weights are kept)."""
    vae = Path(opt.vae) if getattr(opt, "vae", None) else None
    vae_hash = None
    if vae is not None:
        vae_hash = BackgroundHash(vae)
        load_vae(model, vae)
    merged = []
    for path, weight in getattr(opt, "lora", None) or ():
        lora = read_lora(path)
        apply_lora(model, lora, weight, removable=False)
        merged.append(MergedLora(name=lora.name, weight=weight, short_hash=lora_short_hash(path, lora.metadata)))
    return ModelFiles(vae=vae, vae_hash=vae_hash, loras=tuple(merged))
