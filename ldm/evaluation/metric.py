"""What an evaluation metric is: a function of the images sampled for one (checkpoint, guidance scale) group,
their captions and (for reference-based metrics) a set of real images. The harness (`ldm.evaluation`) samples
and stores images and hands each group to every metric; metrics never sample."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, Sequence, runtime_checkable


@dataclass(frozen=True)
class Sample:
    """One stored sample: its PNG, the caption it was sampled from, that caption's index in the caption list
    (which also fixes its seed), and the guidance scale."""

    path: Path
    caption: str
    index: int
    scale: float


@runtime_checkable
class Metric(Protocol):
    """A metric of a group of samples. `name` is its column in results.json and the CSV (e.g. "fid",
    "clip_score", "accuracy"); `higher_is_better` orients plots and summaries."""

    name: str
    higher_is_better: bool

    def compute(self, samples: Sequence[Sample]) -> float:
        """The metric over `samples` (all of one checkpoint and one scale), read from their files."""
        ...
