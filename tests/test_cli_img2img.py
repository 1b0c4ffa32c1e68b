"""scripts/img2img.py end to end against a tiny random checkpoint, and the init-image conversions."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from ldm.cli.images import fit_to_multiple, open_init_image
from ldm.cli.outputs import parse_infotext
from ldm.errors import UserInputError
from tests.cli_support import parameters, pixels, run_script, sample_names, write_tiny_checkpoint
from tests.model_factory import TINY_SD_CONFIG


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("img2img")
    write_tiny_checkpoint(root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (70, 100, 4), dtype=np.uint8), "RGBA").save(root / "init.png")
    return root


def _run(tmp, outdir, *args):
    run = run_script("img2img.py", "--config", TINY_SD_CONFIG, "--ckpt", "tiny.safetensors", "--init-img",
                     "init.png", "--ddim_steps", "4", "--outdir", outdir, "--no_safety_checker", *args, tmp=tmp)
    assert run.returncode == 0, run.stderr
    return run


def test_img2img_rounds_the_size_down_and_records_the_strength(tmp):
    outdir = tmp / "out"
    run = _run(tmp, outdir, "--strength", "0.5", "--prompt", "a blue star", "--seed", "3")
    assert "init image 100x70 resized to 96x64 (a multiple of 16)" in run.stdout
    assert "target t_enc is 2 steps" in run.stdout
    assert sample_names(outdir) == ["00000.png", "00001.png"] and (outdir / "grid-0000.png").exists()
    assert pixels(outdir / "samples" / "00000.png").shape == (64, 96, 3)
    prompt, _, fields = parse_infotext(parameters(outdir / "samples" / "00001.png"))
    assert prompt == "a blue star"
    assert (fields["Denoising strength"], fields["Size"], fields["Seed"], fields["Steps"]) == ("0.5", "96x64", "3", "4")
    assert str(outdir / "samples") in run.stdout.strip().splitlines()[-1]


def test_full_strength_and_fixed_code_repeat_the_noise_across_iterations(tmp):
    outdir = tmp / "fixed"
    _run(tmp, outdir, "--strength", "1.0", "--fixed_code", "--n_iter", "2", "--n_samples", "1", "--skip_grid")
    first, second = (pixels(outdir / "samples" / name) for name in sample_names(outdir))
    assert np.array_equal(first, second)


def test_exif_orientation_is_applied(tmp_path):
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    Image.new("RGB", (80, 40), "red").save(path, exif=exif)
    assert open_init_image(str(path)).size == (40, 80)


@pytest.mark.parametrize("mode, colour", [("RGBA", (0, 0, 0, 0)), ("LA", (0, 0)), ("L", 77), ("I;16", 65535)])
def test_alpha_becomes_white_and_grayscale_rgb(tmp_path, mode, colour):
    path = tmp_path / "image.png"
    Image.new(mode, (16, 16), colour).save(path)
    image = open_init_image(str(path))
    assert image.mode == "RGB"
    expected = {"RGBA": 255, "LA": 255, "L": 77, "I;16": 255}[mode]
    assert (np.asarray(image) == expected).all()


def test_size_is_rounded_down_to_the_multiple_and_too_small_is_refused():
    image, note = fit_to_multiple(Image.new("RGB", (130, 64)), 64)
    assert image.size == (128, 64) and "130x64 resized to 128x64" in note
    assert fit_to_multiple(Image.new("RGB", (128, 64)), 64)[1] is None
    with pytest.raises(UserInputError, match="at least 64 pixels"):
        fit_to_multiple(Image.new("RGB", (63, 100)), 64)
