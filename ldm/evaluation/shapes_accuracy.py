"""The demo model's metric: the share of its images that show what the caption asks for (colour, shape and
background, read back with ldm.data.shapes_analysis). Offline, no weights."""
from __future__ import annotations

from typing import Sequence

from PIL import Image

from ldm.data.shapes import parse_caption
from ldm.data.shapes_analysis import read_image
from ldm.evaluation.metric import Sample


class ShapesAccuracy:
    """Prompt accuracy: an image counts if its foreground colour, shape and background colour all match its
    caption ("a red circle on a blue background", any template of ldm.data.shapes)."""

    name = "accuracy"
    higher_is_better = True

    def compute(self, samples: Sequence[Sample]) -> float:
        if not samples:
            raise ValueError("no samples to score")
        correct = 0
        for sample in samples:
            expected = parse_caption(sample.caption)
            if expected is None:
                raise ValueError(f"not a caption of the demo data set (ldm.data.shapes): {sample.caption!r}")
            with Image.open(sample.path) as image:
                reading = read_image(image)
            correct += (reading.color, reading.shape, reading.background) == expected
        return correct / len(samples)
