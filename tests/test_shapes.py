"""The demo data: deterministic captioned shapes, the held-out pair, and the image analysis that reads them back."""
from __future__ import annotations

import numpy as np
import pytest

from ldm.data.shapes import SHAPES, SyntheticShapes, render
from ldm.data.shapes_analysis import read_image


def test_items_are_deterministic_and_captioned():
    first, again = SyntheticShapes(size=32, length=10, seed=3), SyntheticShapes(size=32, length=10, seed=3)
    np.testing.assert_array_equal(first[4]["image"], again[4]["image"])
    assert first[4]["caption"] == again[4]["caption"]
    spec, caption = first.spec(4)
    assert spec.color in caption and spec.shape in caption and spec.background in caption
    assert first[4]["image"].shape == (32, 32, 3)


def test_held_out_pair_never_appears():
    data = SyntheticShapes(size=32, length=2000, exclude=[["purple", "star"]])
    specs = [data.spec(i)[0] for i in range(2000)]
    assert not any(s.color == "purple" and s.shape == "star" for s in specs)
    assert any(s.color == "purple" for s in specs) and any(s.shape == "star" for s in specs)
    assert {s.shape for s in specs} == set(SHAPES)


@pytest.mark.parametrize("size", [32, 64])
def test_analysis_reads_the_generator_exactly(size):
    data = SyntheticShapes(size=size, length=300, seed=11)
    for index in range(300):
        spec, _ = data.spec(index)
        reading = read_image(render(spec, size))
        assert (reading.color, reading.shape, reading.background) == (spec.color, spec.shape, spec.background)


def test_plain_image_has_no_shape():
    reading = read_image(np.full((32, 32, 3), 30, dtype=np.uint8))
    assert reading.shape is None and reading.background == "black"
