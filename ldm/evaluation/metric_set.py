"""The metrics an evaluation can compute, by name: FID and CLIP score (ldm.evaluation.fid, .clip_score) for
Stable Diffusion, prompt accuracy (ldm.evaluation.shapes_accuracy) for the demo model."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

import torch

from ldm.errors import UserInputError
from ldm.evaluation.metric import Metric

METRIC_NAMES = ("fid", "clip_score", "accuracy")
NEEDS_REFERENCE_IMAGES = ("fid",)


def parse_metric_names(text: str) -> list[str]:
    """argparse-style check of a comma-separated metric list."""
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in METRIC_NAMES]
    if unknown or not names:
        raise UserInputError(f"--metrics {text!r}: choose from {', '.join(METRIC_NAMES)}, separated by commas")
    return list(dict.fromkeys(names))


def build_metrics(names: Sequence[str], device: torch.device, reference_dir: Optional[str] = None,
                  cache_dir: Optional[Path] = None) -> list[Metric]:
    """The metrics of `names`, ready to compute on `device`."""
    metrics: list[Metric] = []
    for name in names:
        if name == "fid":
            from ldm.evaluation.fid import FID

            metrics.append(FID(reference_dir, device=device, cache_dir=cache_dir))
        elif name == "clip_score":
            from ldm.evaluation.clip_score import CLIPScore

            metrics.append(CLIPScore(device=device))
        else:
            from ldm.evaluation.shapes_accuracy import ShapesAccuracy

            metrics.append(ShapesAccuracy())
    return metrics


def fetch_weights(names: Sequence[str]) -> None:
    """Download the pretrained weights the metrics of `names` need, if not yet cached; offline, a missing file is
    an error naming it and where to put it (ldm.evaluation.pretrained), before any image is sampled."""
    from ldm.evaluation.pretrained import fetch

    if "fid" in names:
        from ldm.evaluation.pretrained import inception_weights

        fetch(inception_weights())
    if "clip_score" in names:
        from ldm.evaluation.clip_score import DEFAULT_CLIP
        from ldm.evaluation.pretrained import clip_weights

        fetch(clip_weights(DEFAULT_CLIP))
