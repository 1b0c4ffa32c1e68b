"""Long and weighted prompts on the command line (scripts/txt2img.py on a tiny random checkpoint): a prompt that fits
gives the original's image with and without chunking or weighting, a 150-token prompt is encoded whole unless
--truncate_prompts (which warns), and --prompt_weighting is recorded in the PNG."""
from __future__ import annotations

import numpy as np
import pytest

from tests.cli_support import FAST, parameters, pixels, run_script, sample_names, write_tiny_checkpoint

SHORT = "a red circle on a blue background"
LONG = "a red circle on a blue background, " * 19  # 152 tokens: three chunks
UNBALANCED = "a red (circle"


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Flags -> the outdir of a run over SHORT and LONG (one image each, same seeds), or SHORT and UNBALANCED."""
    tmp = tmp_path_factory.mktemp("prompts")
    ckpt = write_tiny_checkpoint(tmp / "tiny.safetensors")
    prompts = {"long": tmp / "long.txt", "unbalanced": tmp / "unbalanced.txt"}
    prompts["long"].write_text(f"{SHORT}\n{LONG}\n")
    prompts["unbalanced"].write_text(f"{SHORT}\n{UNBALANCED}\n")
    results = {}
    for name, flags, file in (("chunked", [], "long"), ("truncated", ["--truncate_prompts"], "long"),
                              ("weighted", ["--prompt_weighting"], "unbalanced")):
        outdir = tmp / name
        run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--from-file", prompts[file],
                         "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_watermark", *flags, tmp=tmp)
        assert run.returncode == 0, run.stderr
        assert sample_names(outdir) == ["00000.png", "00001.png"]
        results[name] = (outdir / "samples", run)
    return results


def test_a_prompt_that_fits_gives_the_same_image_on_every_path(runs):
    images = [pixels(runs[name][0] / "00000.png") for name in ("chunked", "truncated", "weighted")]
    assert np.array_equal(images[0], images[1]) and np.array_equal(images[0], images[2])


def test_a_long_prompt_is_not_cut_unless_asked(runs):
    chunked, truncated = (pixels(runs[name][0] / "00001.png") for name in ("chunked", "truncated"))
    assert not np.array_equal(chunked, truncated)
    warnings = [line for line in runs["truncated"][1].stderr.splitlines() if "--truncate_prompts" in line]
    assert len(warnings) == 1 and warnings[0].endswith("is cut at 75 tokens; its last 77 tokens are ignored")
    assert "--truncate_prompts" not in runs["chunked"][1].stderr


def test_prompt_weighting_is_recorded_and_unbalanced_brackets_warn(runs):
    samples, run = runs["weighted"]
    assert "Emphasis: Original" in parameters(samples / "00000.png")
    assert "Emphasis" not in parameters(runs["chunked"][0] / "00000.png")
    assert parameters(samples / "00001.png").startswith(UNBALANCED + "\n")
    assert "unbalanced brackets in the prompt 'a red (circle'" in run.stderr
