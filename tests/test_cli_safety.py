"""The safety checker with a stand-in: a tiny diffusers StableDiffusionSafetyChecker whose thresholds
flag every image, found through $LDM_SAFETY_CHECKER; and when the invisible watermark says it cannot be applied."""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.watermark import Watermarker
from tests.cli_support import FAST, pixels, run_script, sample_names, write_tiny_checkpoint


def _flag_everything_checker(directory):
    """A randomly initialised checker whose concept thresholds (-10) every image exceeds."""
    from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
    from transformers import CLIPConfig, CLIPImageProcessor

    tiny = dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2)
    config = CLIPConfig(text_config=tiny, vision_config={**tiny, "image_size": 32, "patch_size": 16},
                        projection_dim=8)
    checker = StableDiffusionSafetyChecker(config)
    with torch.no_grad():
        checker.concept_embeds_weights.fill_(-10.0)
    checker.save_pretrained(directory)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def test_flagged_images_are_replaced_and_reported(tmp_path):
    pytest.importorskip("diffusers")
    checker = _flag_everything_checker(tmp_path / "checker")
    ckpt, outdir = write_tiny_checkpoint(tmp_path / "tiny.safetensors"), tmp_path / "out"
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--n_samples", "2", "--n_iter", "1",
                     tmp=tmp_path, LDM_SAFETY_CHECKER=str(checker))
    assert run.returncode == 0, run.stderr
    assert sample_names(outdir) == ["00000.png", "00001.png"]
    for name in sample_names(outdir):
        assert not pixels(outdir / "samples" / name).any()
        assert f"flagged {outdir / 'samples' / name}" in run.stderr
    assert "cannot be loaded" not in run.stderr and "Potential NSFW" not in run.stderr
    assert not pixels(outdir / "grid-0000.png").any()


def test_images_too_small_for_the_watermark_are_reported_once(caplog):
    small, large = Image.new("RGB", (64, 64), (200, 30, 30)), Image.new("RGB", (256, 256), (200, 30, 30))
    marker = Watermarker()
    with caplog.at_level(logging.DEBUG, logger="ldm"):
        assert [marker(small) is small for _ in range(3)] == [True] * 3
        assert (np.asarray(marker(large)) != np.asarray(large)).any()
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "64x64 images are too small to carry the invisible watermark (it needs 256x256 pixels); "
                          "saving them without it")]


def test_demo_runs_say_nothing_about_the_watermark(tmp_path):
    """The demo model's images are 32x32: never watermarked, and no warning about it on any run."""
    run = run_script("txt2img.py", "--demo", "--prompt", "a red circle on a blue background", "--n_samples", "1",
                     "--n_iter", "2", "--ddim_steps", "2", "--outdir", tmp_path / "out", tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert sample_names(tmp_path / "out") == ["00000.png", "00001.png"]
    assert "watermark" not in run.stderr


def test_a_warning_during_progress_bars_is_one_clean_line(tmp_path):
    """Into a file or pipe, a warning printed while the sampling bars are open carries no cursor escapes."""
    ckpt = write_tiny_checkpoint(tmp_path / "tiny.safetensors")
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--no_safety_checker", "--n_samples", "1", "--n_iter", "2",
                     "--outdir", tmp_path / "out", tmp=tmp_path)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "Sampling:" in run.stderr and "data:" in run.stderr  # the bars were drawn
    lines = [line for line in run.stderr.splitlines() if "invisible watermark" in line]
    assert len(lines) == 1 and lines[0].startswith("warning: 64x64 images are too small"), run.stderr
