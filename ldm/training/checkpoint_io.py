"""Lightning checkpoint I/O that writes atomically and reads through the safe loader of `ldm.checkpoint`."""
from __future__ import annotations

from typing import Any, Callable, Optional

import torch
from pytorch_lightning.plugins.io import TorchCheckpointIO

from ldm.checkpoint import read_checkpoint
from ldm.training.files import atomic_write_bytes


class AtomicCheckpointIO(TorchCheckpointIO):
    """`last.ckpt` and friends are either the old file or the complete new one, never a torn write
    (even when the process is killed mid-save); loading never runs code from the file."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Optional[Any] = None) -> None:
        atomic_write_bytes(path, lambda handle: torch.save(checkpoint, handle))

    def load_checkpoint(self, path: Any, map_location: Optional[Callable] = None,
                        weights_only: Optional[bool] = None) -> dict[str, Any]:
        return read_checkpoint(path)
