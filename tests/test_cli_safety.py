"""The safety checker with a stand-in: a tiny diffusers StableDiffusionSafetyChecker whose thresholds
flag every image, found through $LDM_SAFETY_CHECKER."""
from __future__ import annotations

import pytest
import torch

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
