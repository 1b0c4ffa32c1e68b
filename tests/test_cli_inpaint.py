"""scripts/inpaint.py on the demo model (mask blending on a text-to-image checkpoint): the unmasked pixels stay the
input's, the masked ones change, with every sampler; masks from files and from transparency; outpainting; and the
mistakes a user makes, each one line with exit code 2 and nothing written."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image, ImageDraw

from ldm.cli.common import EXIT_USER_ERROR, run_cli
from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG
from ldm.models.diffusion.sampler_names import SAMPLER_NAMES
from tests.cli_support import load_script, parameters, pixels, snapshot
from tests.model_factory import REPO_DIR

FAST = ["--demo", "--ddim_steps", "3", "--n_samples", "1", "--skip_grid", "--prompt",
        "a red circle on a blue background"]
BLENDING = [*FAST, "--config", str(DEMO_CONFIG), "--ckpt", str(DEMO_CHECKPOINT)]  # the text-to-image demo model


@pytest.fixture(scope="module")
def inpaint():
    return load_script("inpaint.py")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A yellow square on blue (32x32, the demo model's size), a mask over its middle, and the same image with that
    region transparent."""
    root = tmp_path_factory.mktemp("inpaint-inputs")
    image = Image.new("RGB", (32, 32), (20, 40, 200))
    ImageDraw.Draw(image).rectangle([4, 4, 20, 20], fill=(230, 220, 30))
    image.save(root / "square.png")
    mask = Image.new("L", (32, 32), 0)
    ImageDraw.Draw(mask).rectangle([8, 8, 27, 27], fill=255)
    mask.save(root / "mask.png")
    rgba = image.convert("RGBA")
    rgba.putalpha(Image.eval(mask, lambda v: 255 - v))
    rgba.save(root / "transparent.png")
    mask.resize((64, 64), Image.NEAREST).save(root / "mask-64.png")
    Image.new("L", (32, 32), 0).save(root / "black.png")
    Image.new("L", (32, 32), 255).save(root / "white.png")
    (root / "not-an-image.png").write_text("hello")
    return root


def run(inpaint, *args) -> int:
    try:
        return run_cli(inpaint.main, [str(a) for a in args])
    except SystemExit as exit:  # argparse's own errors
        return exit.code


def masked(files) -> np.ndarray:
    return np.asarray(Image.open(files / "mask.png")) > 127


@pytest.mark.parametrize("model", ["blending", "inpainting"])
def test_every_sampler_repaints_the_mask_and_keeps_the_rest(inpaint, files, tmp_path, model):
    source = pixels(files / "square.png")
    inside = masked(files)
    for i, sampler in enumerate(SAMPLER_NAMES):
        outdir = tmp_path / sampler
        assert run(inpaint, *(BLENDING if model == "blending" else FAST), "--init-img", files / "square.png",
                   "--mask", files / "mask.png", "--sampler", sampler, "--outdir", outdir, "--seed", i) == 0
        result = pixels(outdir / "samples" / "00000.png")
        assert np.array_equal(result[~inside], source[~inside]), sampler
        assert np.abs(result[inside].astype(int) - source[inside]).mean() > 10, sampler
    info = parameters(tmp_path / "dpmpp_2m_sde" / "samples" / "00000.png")
    assert "Sampler: DPM++ 2M SDE" in info
    assert ("Inpainting model: True" in info) == (model == "inpainting")  # --demo picks the inpainting model


def test_transparency_is_the_mask_and_strength_below_1_keeps_more(inpaint, files, tmp_path):
    inside = masked(files)
    source = pixels(files / "square.png")
    assert run(inpaint, *FAST, "--init-img", files / "transparent.png", "--outdir", tmp_path / "alpha") == 0
    result = pixels(tmp_path / "alpha" / "samples" / "00000.png")
    assert np.array_equal(result[~inside], source[~inside])
    changes = []
    for strength in ("1.0", "0.2"):
        outdir = tmp_path / strength
        assert run(inpaint, *FAST, "--ddim_steps", "10", "--init-img", files / "square.png", "--mask",
                   files / "mask.png", "--strength", strength, "--outdir", outdir, "--no_watermark") == 0
        result = pixels(outdir / "samples" / "00000.png")
        assert np.array_equal(result[~inside], source[~inside])
        changes.append(np.abs(result[inside].astype(int) - source[inside]).mean())
    assert changes[1] < changes[0]
    info = parameters(tmp_path / "0.2" / "samples" / "00000.png")
    assert "Denoising strength: 0.2" in info and "Mask blur: 4" in info


def test_mask_blur_feathers_inwards_only(inpaint, files, tmp_path):
    source = pixels(files / "square.png")
    inside = masked(files)
    for blur in ("0", "6"):
        assert run(inpaint, *FAST, "--init-img", files / "square.png", "--mask", files / "mask.png", "--mask_blur",
                   blur, "--outdir", tmp_path / blur, "--seed", "3") == 0
    sharp, soft = (pixels(tmp_path / b / "samples" / "00000.png") for b in ("0", "6"))
    assert np.array_equal(soft[~inside], source[~inside])
    edge = (slice(None), 8)  # the mask's left column: mostly the input's with the feather, the sample's without
    assert np.abs(soft[edge].astype(int) - source[edge]).sum() < np.abs(sharp[edge].astype(int) - source[edge]).sum()
    assert np.array_equal(soft[16, 16], sharp[16, 16])  # the middle is beyond the feather


def test_invert_mask_and_a_mask_of_another_size(inpaint, files, tmp_path, capsys):
    source = pixels(files / "square.png")
    inside = masked(files)
    assert run(inpaint, *FAST, "--init-img", files / "square.png", "--mask", files / "mask-64.png",
               "--invert_mask", "--outdir", tmp_path) == 0
    assert "mask 64x64 resized to the image's 32x32" in capsys.readouterr().out
    result = pixels(tmp_path / "samples" / "00000.png")
    assert np.array_equal(result[inside], source[inside])


def test_outpainting_grows_the_canvas_and_keeps_the_image(inpaint, files, tmp_path):
    source = pixels(files / "square.png")
    assert run(inpaint, *FAST, "--init-img", files / "square.png", "--outpaint", "8,0,24,16", "--outdir",
               tmp_path) == 0
    result = pixels(tmp_path / "samples" / "00000.png")
    assert result.shape == (48, 64, 3)
    assert np.array_equal(result[0:32, 8:40], source)
    assert 'Outpaint: "8,0,24,16"' in parameters(tmp_path / "samples" / "00000.png")


def test_an_all_white_mask_renders_a_whole_new_image(inpaint, files, tmp_path):
    assert run(inpaint, *FAST, "--init-img", files / "square.png", "--mask", files / "white.png", "--outdir",
               tmp_path) == 0
    assert pixels(tmp_path / "samples" / "00000.png").shape == (32, 32, 3)


@pytest.mark.parametrize("args, message", [
    (["--mask", "black.png"], "nothing to repaint"),
    (["--mask", "not-an-image.png"], "cannot read mask"),
    (["--mask", "missing.png"], "mask not found"),
    ([], "no mask"),
    (["--mask", "mask.png", "--outpaint=-8,0,0,0"], "non-negative multiples of 8"),
    (["--mask", "mask.png", "--outpaint", "4,0,0,0"], "non-negative multiples of 8"),
    (["--mask", "mask.png", "--outpaint", "8,0"], "LEFT,TOP,RIGHT,BOTTOM"),
    (["--mask", "mask.png", "--steps", "10"], "--steps belongs to the --indir mode"),
    (["--mask", "mask.png", "--indir", "."], "give one or the other"),
    (["--mask", "mask.png", "--fixed_code"], "--fixed_code"),
    (["--mask", "mask.png", "--schedule", "karras"], "--schedule karras"),
    (["--mask", "mask.png", "--mask_blur", "-1"], "--mask_blur"),
    (["--mask", "mask.png", "--config", "models/demo/inpainting.yaml", "--ckpt", "models/demo/model.safetensors"],
     "--config"),
])
def test_mistakes_are_one_line_exit_2_and_write_nothing(inpaint, files, tmp_path, capsys, args, message):
    outdir = tmp_path / "out"
    argv = [*FAST, "--init-img", files / "square.png", "--outdir", outdir,
            *[files / a if a.endswith(".png") else REPO_DIR / a if a.startswith("models/") else a for a in args]]
    assert run(inpaint, *argv) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err
    assert snapshot(outdir) == {}


def test_indir_mode_runs_the_original_ldm_script(inpaint, tmp_path):
    import torch
    from omegaconf import OmegaConf

    from tests.model_factory import TESTS_DIR, random_tiny_model

    config = TESTS_DIR / "configs" / "tiny-ldm-inpainting.yaml"
    model = random_tiny_model(0, OmegaConf.load(config))
    torch.save({"state_dict": model.state_dict()}, tmp_path / "last.ckpt")
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    image = np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    mask = np.zeros((16, 16), dtype=np.uint8)
    mask[4:12, 4:12] = 255
    Image.fromarray(image).save(indir / "photo.png")
    Image.fromarray(mask).save(indir / "photo_mask.png")
    assert run(inpaint, "--indir", indir, "--outdir", outdir, "--steps", "2", "--config", config,
               "--ckpt", tmp_path / "last.ckpt") == 0
    result = pixels(outdir / "photo.png")
    assert np.array_equal(result[mask == 0], image[mask == 0])


@pytest.fixture(scope="module")
def inpainting_checkpoint(tmp_path_factory):
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from tests.model_factory import TESTS_DIR, random_tiny_model

    model = random_tiny_model(2, OmegaConf.load(TESTS_DIR / "configs" / "tiny-sd-inpainting.yaml"))
    path = tmp_path_factory.mktemp("ckpt-9") / "inpainting.safetensors"
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def test_a_9_channel_checkpoint_inpaints_with_its_conditioning(inpaint, files, tmp_path, inpainting_checkpoint):
    from tests.model_factory import TESTS_DIR

    big = tmp_path / "square-64.png"
    Image.open(files / "square.png").resize((64, 64)).save(big)
    Image.open(files / "mask.png").resize((64, 64), Image.NEAREST).save(tmp_path / "mask-64.png")
    inside = np.asarray(Image.open(tmp_path / "mask-64.png")) > 127
    for sampler in ("ddim", "dpmpp_2m"):
        outdir = tmp_path / sampler
        assert run(inpaint, "--config", TESTS_DIR / "configs" / "tiny-sd-inpainting.yaml", "--ckpt",
                   inpainting_checkpoint, "--init-img", big, "--mask", tmp_path / "mask-64.png", "--ddim_steps", "3",
                   "--n_samples", "1", "--skip_grid", "--no_safety_checker", "--no_watermark", "--sampler", sampler,
                   "--outdir", outdir) == 0
        result = pixels(outdir / "samples" / "00000.png")
        assert np.array_equal(result[~inside], pixels(big)[~inside])
        assert "Inpainting model: True" in parameters(outdir / "samples" / "00000.png")


def test_a_config_and_checkpoint_of_different_inputs_are_refused(inpaint, files, tmp_path, capsys,
                                                                 inpainting_checkpoint):
    from tests.model_factory import TESTS_DIR

    outdir = tmp_path / "out"
    assert run(inpaint, "--config", TESTS_DIR / "configs" / "tiny-sd.yaml", "--ckpt", inpainting_checkpoint,
               "--init-img", files / "square.png", "--mask", files / "mask.png", "--outdir", outdir) == EXIT_USER_ERROR
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "9" in err and "4" in err, err
    assert snapshot(outdir) == {}
