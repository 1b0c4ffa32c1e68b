"""The evaluation's work: one image per (checkpoint, caption, scale), where it is stored, its seed, and how the
work is cut into batches and shared between processes."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

MAX_SEED = 2 ** 32


def image_seed(seed: int, index: int) -> int:
    """The seed of caption `index`'s start noise: the same for every checkpoint and scale."""
    return (seed + index) % MAX_SEED


def scale_name(scale: float) -> str:
    """The folder of a guidance scale: scale_1.5, scale_2 (the shortest form that reads back as the number)."""
    return f"scale_{scale:g}" if float(f"{scale:g}") == scale else f"scale_{scale!r}"


def image_path(outdir: Path, checkpoint: str, scale: float, index: int) -> Path:
    return outdir / checkpoint / scale_name(scale) / f"{index:05d}.png"


@dataclass(frozen=True)
class Batch:
    """Captions `start` to `stop` (exclusive) of one checkpoint at one scale, sampled together. Batches are cut
    the same way whatever the number of processes, so each image comes out of the same batch every time."""

    checkpoint: str
    scale: float
    start: int
    stop: int

    @property
    def indices(self) -> range:
        return range(self.start, self.stop)


def all_batches(checkpoints: Sequence[str], scales: Sequence[float], n: int, batch_size: int) -> list[Batch]:
    """Every batch, checkpoint by checkpoint (so a process loads each checkpoint once), then caption by caption,
    the scales of a caption block side by side."""
    return [Batch(checkpoint, scale, start, min(start + batch_size, n))
            for checkpoint in checkpoints for start in range(0, n, batch_size) for scale in scales]


def shard(batches: Sequence[Batch], rank: int, world_size: int) -> list[Batch]:
    """The batches process `rank` of `world_size` samples: every world_size-th, from its rank on."""
    return list(batches[rank::world_size])
