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


def test_the_demo_inpainting_model_turns_a_masked_circle_into_the_prompted_square():
    import torch
    from PIL import Image

    from ldm.checkpoint import load_model_from_config
    from ldm.cli.images import image_to_tensor, to_unit_images
    from ldm.data.shapes import ShapeSpec, render, shape_box_mask
    from ldm.data.shapes_analysis import read_image
    from ldm.demo import DEMO_INPAINTING_CHECKPOINT, DEMO_INPAINTING_CONFIG
    from ldm.models.diffusion.inpainting import inpaint
    from ldm.models.diffusion.registry import make_sampler

    cases = [(ShapeSpec("circle", "yellow", "blue", 30, 32, 20), "red"),
             (ShapeSpec("circle", "green", "black", 34, 30, 22), "white"),
             (ShapeSpec("circle", "orange", "white", 32, 34, 18), "blue"),
             (ShapeSpec("circle", "purple", "yellow", 28, 28, 21), "green")]
    model = load_model_from_config(DEMO_INPAINTING_CONFIG, DEMO_INPAINTING_CHECKPOINT)
    images = torch.cat([image_to_tensor(render(spec, 32)) for spec, _ in cases])
    masks = torch.from_numpy(np.stack([shape_box_mask(spec, 32) for spec, _ in cases]))[:, None]
    prompts = [f"a {color} square on a {spec.background} background" for spec, color in cases]
    torch.manual_seed(0)
    samples = inpaint(model, make_sampler("ddim", model), images, masks, prompts, 25, factor=4, verbose=False)
    readings = [read_image(Image.fromarray((255 * image).astype(np.uint8)))
                for image in to_unit_images(model.decode_first_stage(samples))]
    right = [r.shape == "square" and r.color == color and r.background == spec.background
             for r, (spec, color) in zip(readings, cases)]
    assert sum(right) >= 3, readings
