"""scripts/evaluate_inpainting.py: its cases are what it says (the mask covers the drawn shape, the prompt asks for
another shape and colour on the same background), and a tiny run reads its results back."""
import json

import numpy as np

from tests.cli_support import load_script


def test_cases_mask_the_shape_and_ask_for_another_on_the_same_background():
    evaluate = load_script("evaluate_inpainting.py")
    cases = evaluate.make_cases(40, seed=3)
    assert [c[2] for c in cases] == [c[2] for c in evaluate.make_cases(40, seed=3)]
    for image, mask, prompt, spec, color, shape in cases:
        assert color not in (spec.color, spec.background) and shape != spec.shape
        assert prompt == f"a {color} {shape} on a {spec.background} background"
        pixels = np.asarray(image, dtype=np.int32)
        background = pixels[0, 0]
        drawn = np.abs(pixels - background).sum(axis=2) > 60
        assert drawn.any() and mask[drawn].all()  # every pixel of the shape is under the mask
        assert not mask.all()  # the background stays visible for the reading


def test_a_tiny_run_prints_its_accuracies(capsys):
    evaluate = load_script("evaluate_inpainting.py")
    assert evaluate.main(["--n", "2", "--steps", "2", "--models", "blending", "--batch_size", "2"]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["model"] == "blending" and summary["n"] == 2
    assert 0.0 <= summary["prompted_color"] <= 1.0 and 0.0 <= summary["background_kept"] <= 1.0
