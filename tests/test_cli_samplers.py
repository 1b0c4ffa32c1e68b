"""Every sampler through both command lines, run in this process against a tiny random checkpoint: the run
succeeds, writes its image and names the sampler in the PNG as the web UIs do; stochastic samplers repeat
under a seed; img2img's strength ends (1 = pure noise, 0 = the init image) as the scripts draw their noise;
and the sampler flags' mistakes are one line on stderr, exit code 2, nothing written."""
from __future__ import annotations

import functools
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.common import run_cli
from ldm.cli.outputs import parse_infotext
from tests.cli_support import load_script, parameters, pixels, sample_names, snapshot, write_tiny_checkpoint
from tests.model_factory import TINY_SD_CONFIG

STEPS = 3
# The tiny model takes 64x64 images (a multiple of its 16); img2img's size comes from its init image.
COMMON = ["--config", str(TINY_SD_CONFIG), "--ddim_steps", str(STEPS), "--n_samples", "1", "--n_iter", "1",
          "--skip_grid", "--no_safety_checker", "--no_watermark", "--precision", "full"]
SIZE = {"txt2img.py": ["--H", "64", "--W", "64"], "img2img.py": []}

# (sampler, schedule) -> the label the PNG must carry, written out here rather than computed.
LABELS = {
    ("ddim", "default"): "DDIM",
    ("plms", "default"): "PLMS",
    ("dpm_solver", "default"): "DPM-Solver++ 2M",
    ("lms", "default"): "LMS",
    ("euler", "default"): "Euler",
    ("euler_ancestral", "default"): "Euler a",
    ("heun", "default"): "Heun",
    ("dpm_2", "default"): "DPM2",
    ("dpm_2_ancestral", "default"): "DPM2 a",
    ("dpmpp_2s_ancestral", "default"): "DPM++ 2S a",
    ("dpmpp_2m", "default"): "DPM++ 2M",
    ("dpmpp_sde", "default"): "DPM++ SDE",
    ("dpmpp_2m_sde", "default"): "DPM++ 2M SDE",
    ("dpmpp_2m", "karras"): "DPM++ 2M Karras",
    ("euler_ancestral", "karras"): "Euler a Karras",
    ("dpmpp_sde", "karras"): "DPM++ SDE Karras",
    ("dpmpp_2m_sde", "exponential"): "DPM++ 2M SDE Exponential",
    ("heun", "exponential"): "Heun Exponential",
}
SCRIPT_NAMES = ("txt2img.py", "img2img.py")


@functools.cache
def _script(name: str) -> ModuleType:
    return load_script(name)


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    """A checkpoint and two different init images, with the runs' caches kept in here, offline, one thread."""
    root = tmp_path_factory.mktemp("cli-samplers")
    write_tiny_checkpoint(root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    for name in ("init.png", "other-init.png"):
        Image.fromarray(rng.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(root / name)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(root / "cache"))
        patch.setenv("HF_HOME", str(root / "hf-home"))
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.delenv("LDM_SAFETY_CHECKER", raising=False)
        yield root
    torch.set_num_threads(threads)


def _args(tmp: Path, script: str, *args: str, init: str = "init.png") -> list[str]:
    init_args = ["--init-img", str(tmp / init)] if script == "img2img.py" else []
    return [*COMMON, *SIZE[script], "--ckpt", str(tmp / "tiny.safetensors"), *init_args, *args]


def _render(tmp: Path, script: str, outdir: Path, *args: str, init: str = "init.png") -> list[Path]:
    """Run the script into `outdir` (which must be new); its sample files, in order."""
    assert not outdir.exists()
    code = run_cli(_script(script).main, _args(tmp, script, *args, "--outdir", str(outdir), init=init))
    assert code == 0
    return [outdir / "samples" / name for name in sample_names(outdir)]


def _fields(path: Path) -> dict[str, str]:
    return parse_infotext(parameters(path))[2]


def _sampler_flags(sampler: str, schedule: str) -> list[str]:
    return ["--sampler", sampler] + (["--schedule", schedule] if schedule != "default" else [])


@pytest.mark.parametrize("sampler, schedule", LABELS)
@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_every_sampler_renders_and_is_named_as_the_web_uis_name_it(tmp, script, sampler, schedule):
    outdir = tmp / f"every-{script}-{sampler}-{schedule}"
    [sample] = _render(tmp, script, outdir, *_sampler_flags(sampler, schedule))
    image = pixels(sample)
    assert image.shape == (64, 64, 3) and image.std() > 0
    fields = _fields(sample)
    assert fields["Sampler"] == LABELS[sampler, schedule]
    assert fields["Steps"] == str(STEPS)
    assert ("Eta" in fields) == (sampler == "ddim")  # DDIM's eta only
    assert ("Denoising strength" in fields) == (script == "img2img.py")


@pytest.mark.parametrize("flag, label", [("--plms", "PLMS"), ("--dpm_solver", "DPM-Solver++ 2M")])
@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_the_original_sampler_flags_still_work(tmp, script, flag, label):
    """--plms (which the original img2img refused) and --dpm_solver, in both scripts."""
    [sample] = _render(tmp, script, tmp / f"flag-{script}{flag}", flag)
    assert _fields(sample)["Sampler"] == label and pixels(sample).std() > 0


@pytest.mark.parametrize("sampler", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde"])
def test_a_seed_repeats_a_stochastic_sampler(tmp, sampler):
    """The per-step noise (the ancestral samplers' draws, the SDE samplers' Brownian tree) comes from the run's
    seeded stream: the same seed gives the same pixels, another seed others."""
    first, again, other = (_render(tmp, "txt2img.py", tmp / f"seed-{sampler}-{n}", "--sampler", sampler,
                                   "--seed", seed)[0]
                           for n, seed in enumerate(("5", "5", "6")))
    assert np.array_equal(pixels(first), pixels(again))
    assert not np.array_equal(pixels(first), pixels(other))


@pytest.mark.parametrize("script, sampler", [("txt2img.py", "dpmpp_sde"), ("img2img.py", "euler_ancestral")])
def test_seed_per_sample_re_renders_a_stochastic_sample_from_its_seed(tmp, script, sampler):
    many = _render(tmp, script, tmp / f"per-sample-{script}-{sampler}", "--sampler", sampler, "--seed", "20",
                   "--seed_per_sample", "--n_samples", "2")
    [alone] = _render(tmp, script, tmp / f"per-sample-alone-{script}-{sampler}", "--sampler", sampler,
                      "--seed", "21")
    assert len(many) == 2 and _fields(many[1])["Seed"] == "21"
    assert np.array_equal(pixels(many[1]), pixels(alone))
    assert not np.array_equal(pixels(many[0]), pixels(alone))


@pytest.mark.parametrize("sampler, schedule", [("euler", "default"), ("dpmpp_2m", "karras")])
def test_full_strength_is_pure_noise_drawn_after_the_init_latent(tmp, sampler, schedule):
    """img2img --strength 1.0 ignores the init image, but it is not txt2img's image for the same seed: img2img
    first samples the init image's latent from the encoder's posterior (one latent-sized draw from the seeded
    stream), then draws the start noise. With a sampler that draws nothing per step, that start noise is
    txt2img's second start code, so img2img at strength 1 repeats txt2img's second iteration."""
    flags = [*_sampler_flags(sampler, schedule), "--seed", "7", "--scale", "5", "--prompt", "a blue star"]
    full = [_render(tmp, "img2img.py", tmp / f"full-{sampler}-{init}", *flags, "--strength", "1.0", init=init)[0]
            for init in ("init.png", "other-init.png")]
    assert np.array_equal(pixels(full[0]), pixels(full[1]))  # the init image plays no part
    first, second = _render(tmp, "txt2img.py", tmp / f"full-txt2img-{sampler}", *flags, "--n_iter", "2")
    assert not np.array_equal(pixels(full[0]), pixels(first))
    assert np.array_equal(pixels(full[0]), pixels(second))


def test_zero_strength_returns_the_init_image_with_every_sampler(tmp, capsys):
    """No step runs: every sampler gives the init image as the autoencoder reproduces it (its posterior
    sample from the seeded stream, decoded); the prompt plays no part."""
    runs = [_render(tmp, "img2img.py", tmp / f"zero-{n}", *flags, "--strength", "0", "--seed", "3", init=init)[0]
            for n, (flags, init) in enumerate([([], "init.png"), (["--sampler", "euler"], "init.png"),
                                               (["--sampler", "dpmpp_sde", "--prompt", "a red circle"], "init.png"),
                                               (["--plms"], "init.png"), (["--sampler", "euler"], "other-init.png")])]
    assert "target t_enc is 0 steps" in capsys.readouterr().out
    for run in runs[1:4]:
        assert np.array_equal(pixels(run), pixels(runs[0]))
    assert not np.array_equal(pixels(runs[4]), pixels(runs[0]))  # another init image, another result


BAD = {
    "unknown sampler": (["--sampler", "foo"], ["--sampler", "invalid choice: 'foo'", "dpmpp_2m", "ddim"]),
    "unknown schedule": (["--sampler", "euler", "--schedule", "foo"],
                         ["--schedule", "invalid choice: 'foo'", "karras", "exponential"]),
    "schedule with the default ddim": (["--schedule", "karras"],
                                       ["--schedule karras", "ddim", "k-diffusion", "drop --schedule",
                                        "--sampler dpmpp_2m"]),
    "schedule with ddim": (["--sampler", "ddim", "--schedule", "exponential"],
                           ["--schedule exponential", "ddim", "drop --schedule", "--sampler dpmpp_2m"]),
    "schedule with plms": (["--sampler", "plms", "--schedule", "karras"], ["--schedule karras", "plms"]),
    "schedule with dpm_solver": (["--sampler", "dpm_solver", "--schedule", "karras"],
                                 ["--schedule karras", "dpm_solver", "--sampler dpmpp_2m"]),
    "schedule with --plms": (["--plms", "--schedule", "karras"], ["--schedule karras", "in place of --plms"]),
    "schedule with --dpm_solver": (["--dpm_solver", "--schedule", "karras"],
                                   ["--schedule karras", "in place of --dpm_solver"]),
    "zero steps": (["--ddim_steps", "0", "--sampler", "euler"], ["--ddim_steps: must be at least 1, got 0"]),
    "eta with a k sampler": (["--sampler", "euler_ancestral", "--ddim_eta", "0.5"],
                             ["--ddim_eta", "DDIM only", "euler_ancestral", "leave --ddim_eta at 0",
                              "drop --sampler euler_ancestral"]),
    "eta with --plms": (["--plms", "--ddim_eta", "0.5"], ["--ddim_eta", "DDIM only", "plms", "drop --plms"]),
    "--plms and --sampler": (["--plms", "--sampler", "euler"], ["choose one sampler", "--plms", "--sampler euler"]),
    "--dpm_solver and --sampler": (["--dpm_solver", "--sampler", "dpmpp_2m"],
                                   ["choose one sampler", "--dpm_solver", "--sampler dpmpp_2m"]),
    "--plms and --dpm_solver": (["--plms", "--dpm_solver"], ["choose one sampler", "--plms", "--dpm_solver"]),
}


@pytest.mark.parametrize("case", BAD)
@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_sampler_mistakes_are_one_line_and_write_nothing(tmp, capsys, script, case):
    """The checkpoint is a real one, so a mistake that slipped through would render and write."""
    args, expected = BAD[case]
    outdir = tmp / "never"
    before = snapshot(tmp)
    capsys.readouterr()
    try:
        code = run_cli(_script(script).main, _args(tmp, script, *args, "--outdir", str(outdir)))
    except SystemExit as exit:  # argparse's errors exit from inside the parser
        code = exit.code
    out, err = capsys.readouterr()
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and ": error: " in lines[0], err
    for text in expected:
        assert text in lines[0], lines[0]
    assert out == ""
    assert not outdir.exists() and snapshot(tmp) == before


@pytest.mark.parametrize("script", SCRIPT_NAMES)
def test_help_describes_the_sampler_flags(script):
    help_text = " ".join(_script(script).build_parser().format_help().split())
    for name, _ in LABELS:
        assert name in help_text
    assert "--schedule {default,karras,exponential}" in help_text
    assert "docs/samplers.md" in help_text
    if script == "img2img.py":
        assert "int(strength * ddim_steps)" in help_text
