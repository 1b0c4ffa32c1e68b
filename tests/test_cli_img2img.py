"""scripts/img2img.py end to end against a tiny random checkpoint, and the init-image conversions."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.images import fit_to_multiple, image_to_tensor, open_init_image
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


def _original_img2img(tmp, seed: int, strength: float, n_iter: int, n_samples: int) -> list[np.ndarray]:
    """The sampling loop of the original CompVis scripts/img2img.py on the CPU, as it draws its noise (the init
    image read as this project reads it), on one thread as the scripts run in these tests."""
    from pytorch_lightning import seed_everything

    from ldm import accel
    from ldm.checkpoint import load_model_from_config
    from ldm.models.diffusion.ddim import DDIMSampler

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        seed_everything(seed)
        # The script's layers (ldm.accel's, unless LDM_ACCEL=0), so that only the order of the draws is compared.
        model = accel.optimize(load_model_from_config(str(TINY_SD_CONFIG), str(tmp / "tiny.safetensors")), "cpu")
        sampler = DDIMSampler(model)
        init_image, _ = fit_to_multiple(open_init_image(str(tmp / "init.png")), 16)
        init_image = image_to_tensor(init_image).repeat(n_samples, 1, 1, 1)
        init_latent = model.get_first_stage_encoding(model.encode_first_stage(init_image))
        sampler.make_schedule(ddim_num_steps=4, ddim_eta=0.0, verbose=False)
        t_enc = int(strength * 4)
        images = []
        with torch.no_grad(), model.ema_scope():
            for _ in range(n_iter):
                uc = model.get_learned_conditioning(n_samples * [""])
                c = model.get_learned_conditioning(n_samples * ["a blue star"])
                z_enc = sampler.stochastic_encode(init_latent, torch.tensor([t_enc] * n_samples))
                samples = sampler.decode(z_enc, c, t_enc, unconditional_guidance_scale=5.0,
                                         unconditional_conditioning=uc, verbose=False)
                x = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)
                images += [(255.0 * s).astype(np.uint8) for s in x.cpu().permute(0, 2, 3, 1).numpy()]
        return images
    finally:
        torch.set_num_threads(threads)


def test_noise_is_drawn_as_the_original_draws_it(tmp):
    outdir = tmp / "as-original"
    _run(tmp, outdir, "--strength", "0.5", "--prompt", "a blue star", "--seed", "11", "--n_iter", "2",
         "--skip_grid")
    expected = _original_img2img(tmp, seed=11, strength=0.5, n_iter=2, n_samples=2)
    names = sample_names(outdir)
    assert len(names) == len(expected) == 4
    assert not np.array_equal(expected[0], expected[2])  # a new noise for every iteration
    for name, image in zip(names, expected):
        assert np.array_equal(pixels(outdir / "samples" / name), image), name


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
