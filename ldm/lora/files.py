"""Reading a LoRA file (LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models") without
running any code from it: `.safetensors` through the `safetensors` package, `.pt`/`.ckpt`/`.bin` through
`ldm.checkpoint.read_state_dict` (`torch.load(weights_only=True)`)."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ldm.checkpoint import read_state_dict
from ldm.errors import UserInputError, first_line


@dataclass(frozen=True)
class LoraFile:
    """The tensors of a LoRA file by key, and its safetensors metadata (empty for pickled files)."""

    path: Path
    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def name(self) -> str:
        """The file's stem, the name the web UIs give a LoRA."""
        return self.path.stem


def _read_safetensors(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise UserInputError(f"cannot read LoRA file {path}: it is truncated or not a .safetensors file "
                             f"({first_line(error)}); download it again") from error
    return tensors, metadata


def read_lora(path: str | os.PathLike) -> LoraFile:
    """The LoRA file at `path`, checked: present, not empty, readable, every weight a finite number."""
    path = Path(path)
    if not path.is_file():
        raise UserInputError(f"LoRA file {'is a directory' if path.is_dir() else 'not found'}: {path}")
    if path.stat().st_size == 0:
        raise UserInputError(f"LoRA file {path} is empty (0 bytes); download it again")
    if path.suffix.lower() == ".safetensors":
        tensors, metadata = _read_safetensors(path)
    else:
        tensors, metadata = read_state_dict(path), {}
    if not tensors:
        raise UserInputError(f"LoRA file {path} holds no weights; download it again")
    for key, tensor in tensors.items():
        if not isinstance(tensor, torch.Tensor):
            raise UserInputError(f"LoRA file {path}: {key} is not a tensor; is it a LoRA file?")
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise UserInputError(f"LoRA file {path}: the weight {key} holds NaN or infinite values; the file is "
                                 "damaged: download it again")
    return LoraFile(path=path, tensors=tensors, metadata=metadata)
