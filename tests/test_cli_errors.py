"""Bad input to the sampling scripts: one line on stderr, exit code 2, no traceback, nothing written."""
from __future__ import annotations

import pytest
from PIL import Image

from tests.cli_support import FAST, run_script, snapshot, write_tiny_checkpoint
from tests.model_factory import TINY_SD_CONFIG


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-errors")
    write_tiny_checkpoint(root / "tiny.safetensors")
    (root / "not-a-checkpoint.ckpt").write_text("hello\n")
    (root / "truncated.safetensors").write_bytes((root / "tiny.safetensors").read_bytes()[:100_000])
    (root / "other.yaml").write_text(TINY_SD_CONFIG.read_text().replace("model_channels: 32", "model_channels: 64"))
    (root / "broken.yaml").write_text("model: [unclosed\n")
    (root / "empty.txt").write_text("\n  \n")
    (root / "a-file").write_text("")
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 64)
    (root / "tiny.png").write_bytes(b"")
    Image.new("RGB", (96, 96), "red").save(root / "init.png")
    return root


def _expect_error(tmp, script, args, message, outdir_name="out"):
    """Run the script into an outdir that holds one earlier image; it must stay as it was."""
    outdir = tmp / outdir_name
    (outdir / "samples").mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8)).save(outdir / "samples" / "00000.png")
    before = snapshot(outdir)
    if "--outdir" not in args:
        args = [*args, "--outdir", outdir]
    run = run_script(script, *args, tmp=tmp)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert lines[-1].startswith(f"{script}: error: ") and message in lines[-1], run.stderr
    assert sum("error" in line for line in lines) == 1, run.stderr
    assert snapshot(outdir) == before
    assert run.stdout == ""
    return lines[-1]


def test_missing_sd_checkpoint_names_path_source_and_demo(tmp):
    line = _expect_error(tmp, "txt2img.py", ["--config", TINY_SD_CONFIG], "checkpoint not found")
    assert "models/ldm/stable-diffusion-v1/model.ckpt" in line
    assert "huggingface.co/CompVis" in line and "--demo" in line


def test_missing_demo_checkpoint_says_where_the_demo_comes_from(tmp):
    line = _expect_error(tmp, "txt2img.py", ["--demo", "--ckpt", tmp / "nowhere.safetensors"],
                         "checkpoint not found")
    assert "demo model" in line


def test_nothing_is_created_when_the_outdir_does_not_exist(tmp):
    outdir = tmp / "never"
    run = run_script("txt2img.py", *FAST, "--ckpt", tmp / "not-a-checkpoint.ckpt", "--outdir", outdir, tmp=tmp)
    assert run.returncode == 2 and not outdir.exists()


COMMON = [*FAST, "--no_safety_checker"]
TXT2IMG_CASES = {
    "not a checkpoint": ([*COMMON, "--ckpt", "not-a-checkpoint.ckpt"], "not-a-checkpoint.ckpt"),
    "truncated checkpoint": ([*COMMON, "--ckpt", "truncated.safetensors"], "truncated.safetensors"),
    "checkpoint for another model": (["--config", "other.yaml", "--H", "64", "--W", "64", "--ckpt",
                                      "tiny.safetensors"], "does not fit this model"),
    "missing config": (["--config", "nowhere.yaml", "--ckpt", "tiny.safetensors"], "config not found: nowhere.yaml"),
    "unparsable config": (["--config", "broken.yaml", "--ckpt", "tiny.safetensors"], "cannot parse config"),
    "H not a multiple of 8": ([*COMMON, "--ckpt", "tiny.safetensors", "--H", "60"], "--H must be a multiple of 8"),
    "W not a multiple of the model's 16": ([*COMMON, "--ckpt", "tiny.safetensors", "--W", "72"],
                                           "--W must be a multiple of 16 for this model"),
    "ddim_steps 0": ([*COMMON, "--ckpt", "tiny.safetensors", "--ddim_steps", "0"], "--ddim_steps: must be at least 1"),
    "n_samples 0": ([*COMMON, "--ckpt", "tiny.safetensors", "--n_samples", "0"], "--n_samples: must be at least 1"),
    "missing prompt file": ([*COMMON, "--ckpt", "tiny.safetensors", "--from-file", "nowhere.txt"],
                            "prompt file not found"),
    "empty prompt file": ([*COMMON, "--ckpt", "tiny.safetensors", "--from-file", "empty.txt"], "is empty"),
    "outdir under a file": ([*COMMON, "--ckpt", "tiny.safetensors", "--outdir", "a-file/out"], "is a file"),
    "missing embedding": ([*COMMON, "--ckpt", "tiny.safetensors", "--embedding_path", "nowhere.pt"],
                          "embedding file not found"),
    "two samplers": ([*COMMON, "--ckpt", "tiny.safetensors", "--plms", "--dpm_solver"], "choose one sampler"),
    "safety checker required offline": ([*FAST, "--ckpt", "tiny.safetensors", "--require_safety_checker"],
                                        "safety checker"),
    "safety checker directory missing": ([*FAST, "--ckpt", "tiny.safetensors", "--safety_checker", "./nowhere"],
                                         "safety checker directory not found"),
}


@pytest.mark.parametrize("case", TXT2IMG_CASES)
def test_txt2img_bad_input(tmp, case):
    args, message = TXT2IMG_CASES[case]
    _expect_error(tmp, "txt2img.py", args, message)


IMG2IMG = ["--config", TINY_SD_CONFIG, "--ckpt", "tiny.safetensors", "--ddim_steps", "2", "--no_safety_checker"]
IMG2IMG_CASES = {
    "strength above 1": ([*IMG2IMG, "--init-img", "init.png", "--strength", "1.5"], "--strength: must be between"),
    "strength below 0": ([*IMG2IMG, "--init-img", "init.png", "--strength=-0.1"], "--strength: must be between"),
    "no init image given": (IMG2IMG, "--init-img"),
    "missing init image": ([*IMG2IMG, "--init-img", "nowhere.png"], "init image not found"),
    "corrupt init image": ([*IMG2IMG, "--init-img", "corrupt.png"], "cannot read init image"),
    "empty init image": ([*IMG2IMG, "--init-img", "tiny.png"], "cannot read init image"),
    "schedule with plms": ([*IMG2IMG, "--init-img", "init.png", "--plms", "--schedule", "karras"],
                           "--schedule karras applies only to the k-diffusion samplers"),
    "missing checkpoint": (["--init-img", "init.png", "--config", TINY_SD_CONFIG], "checkpoint not found"),
}


@pytest.mark.parametrize("case", IMG2IMG_CASES)
def test_img2img_bad_input(tmp, case):
    args, message = IMG2IMG_CASES[case]
    _expect_error(tmp, "img2img.py", args, message)
