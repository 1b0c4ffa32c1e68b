"""scripts/txt2img.py end to end, as a subprocess against a tiny random checkpoint: numbering, grid,
PNG parameters, seeds, samplers, --from-file, --fixed_code, --demo, the watermark and Ctrl-C."""
from __future__ import annotations

import hashlib
import signal
import subprocess
import sys
import time
from contextlib import nullcontext

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ldm.cli.outputs import parse_infotext
from ldm.cli.watermark import WATERMARK, read_watermark
from tests.cli_support import (FAST, SCRIPTS, load_script, parameters, pixels, run_script, sample_names, script_env,
                               write_tiny_checkpoint)
from tests.model_factory import TINY_SD_CONFIG


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("txt2img")


@pytest.fixture(scope="module")
def ckpt(tmp):
    return write_tiny_checkpoint(tmp / "tiny.safetensors")


@pytest.fixture(scope="module")
def repeated_runs(tmp, ckpt):
    """Three runs into one outdir: seed 42 twice (2 iterations of 2 samples), then seed 43 without a grid."""
    outdir = tmp / "repeated"
    base = [*FAST, "--ckpt", ckpt, "--outdir", outdir, "--prompt", "a red circle", "--n_samples", "2"]
    runs = [run_script("txt2img.py", *base, tmp=tmp),
            run_script("txt2img.py", *base, tmp=tmp),
            run_script("txt2img.py", *base, "--seed", "43", "--n_iter", "1", "--skip_grid", tmp=tmp)]
    for run in runs:
        assert run.returncode == 0, run.stderr
    return outdir, runs


def test_files_are_numbered_after_existing_ones_and_never_overwritten(repeated_runs):
    outdir, runs = repeated_runs
    assert sample_names(outdir) == [f"{i:05}.png" for i in range(10)]
    assert sorted(p.name for p in outdir.glob("grid-*.png")) == ["grid-0000.png", "grid-0001.png"]
    assert not list(outdir.rglob(".partial-*"))
    assert str(outdir / "samples") in runs[0].stdout.strip().splitlines()[-1]
    assert "grid-0001.png" in runs[1].stdout.strip().splitlines()[-1]


def test_grid_has_n_samples_columns(repeated_runs):
    outdir, _ = repeated_runs
    assert pixels(outdir / "grid-0000.png").shape == (2 * 66 + 2, 2 * 66 + 2, 3)  # 2x2 tiles, 2-px borders


def test_same_seed_same_files_different_seed_different(repeated_runs):
    outdir, _ = repeated_runs
    first = [pixels(outdir / "samples" / f"{i:05}.png") for i in range(10)]
    for i in range(4):
        assert np.array_equal(first[i], first[i + 4])
    assert not np.array_equal(first[0], first[8])
    assert not np.array_equal(first[0], first[2])  # a new start code for every iteration


def test_png_parameters_in_web_ui_format(repeated_runs, ckpt):
    outdir, _ = repeated_runs
    prompt, negative, fields = parse_infotext(parameters(outdir / "samples" / "00003.png"))
    assert (prompt, negative) == ("a red circle", "")
    assert fields["Steps"] == "2" and fields["Sampler"] == "DDIM" and fields["CFG scale"] == "7.5"
    assert fields["Seed"] == "42" and fields["Size"] == "64x64"
    assert fields["Batch size"] == "2" and fields["Batch pos"] == "1" and fields["Iteration"] == "1"
    assert fields["Model hash"] == hashlib.sha256(ckpt.read_bytes()).hexdigest()[:10]
    assert parse_infotext(parameters(outdir / "samples" / "00008.png"))[2]["Seed"] == "43"
    assert parse_infotext(parameters(outdir / "grid-0000.png"))[2]["Grid"] == "4"


def test_offline_safety_checker_is_reported_once_and_the_run_goes_on(repeated_runs):
    _, runs = repeated_runs
    assert runs[0].stderr.count("safety checker") == 1
    assert "NOT checked" in runs[0].stderr


def _original_txt2img(ckpt, seed: int, fixed_code: bool, n_iter: int = 2, n_samples: int = 2) -> list[np.ndarray]:
    """The sampling loop of the original CompVis scripts/txt2img.py, on the CPU, as it draws its noise;
    on one thread, as the scripts run in these tests, so that float sums add up in the same order."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _original_loop(ckpt, seed, fixed_code, n_iter, n_samples)
    finally:
        torch.set_num_threads(threads)


def _original_loop(ckpt, seed: int, fixed_code: bool, n_iter: int, n_samples: int) -> list[np.ndarray]:
    from pytorch_lightning import seed_everything

    from ldm import accel
    from ldm.checkpoint import load_model_from_config
    from ldm.models.diffusion.ddim import DDIMSampler

    seed_everything(seed)
    # The script's layers (ldm.accel's, unless LDM_ACCEL=0), so that only the order of the draws is compared.
    model = accel.optimize(load_model_from_config(str(TINY_SD_CONFIG), str(ckpt)), "cpu")
    sampler = DDIMSampler(model)
    start_code = torch.randn([n_samples, 4, 8, 8]) if fixed_code else None
    images = []
    with torch.no_grad(), nullcontext(), model.ema_scope():
        for _ in range(n_iter):
            uc = model.get_learned_conditioning(n_samples * [""])
            c = model.get_learned_conditioning(n_samples * ["a red circle"])
            samples, _ = sampler.sample(S=2, conditioning=c, batch_size=n_samples, shape=[4, 8, 8], verbose=False,
                                        unconditional_guidance_scale=7.5, unconditional_conditioning=uc, eta=0.0,
                                        x_T=start_code)
            x = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)
            images += [(255.0 * s).astype(np.uint8) for s in x.cpu().permute(0, 2, 3, 1).numpy()]
    return images


def test_noise_is_drawn_as_the_original_draws_it(repeated_runs, ckpt):
    outdir, _ = repeated_runs
    expected = _original_txt2img(ckpt, seed=42, fixed_code=False)
    for i, image in enumerate(expected):
        assert np.array_equal(pixels(outdir / "samples" / f"{i:05}.png"), image), i


def test_fixed_code_reuses_the_start_code_as_the_original(tmp, ckpt):
    outdir = tmp / "fixed"
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--prompt", "a red circle",
                     "--n_samples", "2", "--fixed_code", "--skip_grid", "--seed", "5", tmp=tmp)
    assert run.returncode == 0, run.stderr
    saved = [pixels(outdir / "samples" / f"{i:05}.png") for i in range(4)]
    assert np.array_equal(saved[0], saved[2]) and np.array_equal(saved[1], saved[3])
    for image, expected in zip(saved, _original_txt2img(ckpt, seed=5, fixed_code=True)):
        assert np.array_equal(image, expected)
    assert parse_infotext(parameters(outdir / "samples" / "00000.png"))[2]["Fixed code"] == "True"


@pytest.mark.parametrize("flags, label", [(["--plms"], "PLMS"), (["--sampler", "dpm_solver"], "DPM-Solver++ 2M"),
                                          (["--sampler", "dpmpp_2m", "--schedule", "karras"], "DPM++ 2M Karras")])
def test_every_sampler_renders(tmp, ckpt, flags, label):
    outdir = tmp / f"sampler-{label}"
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--n_samples", "1", "--n_iter", "1",
                     "--skip_grid", *flags, tmp=tmp)
    assert run.returncode == 0, run.stderr
    assert parse_infotext(parameters(outdir / "samples" / "00000.png"))[2]["Sampler"] == label
    assert pixels(outdir / "samples" / "00000.png").std() > 0


def test_from_file_batches_prompts_and_negative_prompt_is_recorded(tmp, ckpt):
    outdir, prompts = tmp / "from-file", tmp / "prompts.txt"
    prompts.write_text("a red circle\n\na blue star\na green square\n")
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--from-file", prompts,
                     "--n_samples", "2", "--n_iter", "1", "--negative_prompt", "blurry, dark", tmp=tmp)
    assert run.returncode == 0, run.stderr
    infos = [parse_infotext(parameters(outdir / "samples" / f"{i:05}.png")) for i in range(3)]
    assert [info[0] for info in infos] == ["a red circle", "a blue star", "a green square"]
    assert all(info[1] == "blurry, dark" for info in infos)
    assert [info[2]["Prompt batch"] for info in infos] == ["0", "0", "1"]
    assert sample_names(outdir) == ["00000.png", "00001.png", "00002.png"]


def test_seed_per_sample_re_renders_one_sample_from_its_seed(tmp, ckpt):
    outdir, again = tmp / "per-sample", tmp / "per-sample-again"
    base = [*FAST, "--ckpt", ckpt, "--n_iter", "1", "--skip_grid"]
    run = run_script("txt2img.py", *base, "--outdir", outdir, "--n_samples", "2", "--seed", "7",
                     "--seed_per_sample", tmp=tmp)
    assert run.returncode == 0, run.stderr
    assert parse_infotext(parameters(outdir / "samples" / "00001.png"))[2]["Seed"] == "8"
    rerun = run_script("txt2img.py", *base, "--outdir", again, "--n_samples", "1", "--seed", "8", tmp=tmp)
    assert rerun.returncode == 0, rerun.stderr
    assert np.array_equal(pixels(outdir / "samples" / "00001.png"), pixels(again / "samples" / "00000.png"))


def test_demo_takes_size_and_factor_from_the_config(tmp, ckpt):
    outdir = tmp / "demo"
    run = run_script("txt2img.py", "--demo", "--config", TINY_SD_CONFIG, "--ckpt", ckpt, "--f", "16",
                     "--ddim_steps", "2", "--n_samples", "1", "--n_iter", "1", "--outdir", outdir, tmp=tmp)
    assert run.returncode == 0, run.stderr
    assert pixels(outdir / "samples" / "00000.png").shape == (64, 64, 3)  # image_size 8 x f 8


def _watermark_bit_errors(image_path) -> int:
    with Image.open(image_path) as image:
        found = np.unpackbits(np.frombuffer(read_watermark(image), dtype=np.uint8))
    return int((found != np.unpackbits(np.frombuffer(WATERMARK, dtype=np.uint8))).sum())


def test_watermark_decodes_from_a_saved_image(tmp, ckpt):
    """dwtDct is a weak watermark: on this random model's noise-like images a few of its 136 bits flip
    (about 5 %), against half of them in an unmarked image."""
    state = load_file(ckpt)
    state["first_stage_model.decoder.conv_out.weight"] *= 0.5  # fewer saturated pixels, as in real images
    soft = tmp / "soft.safetensors"
    save_file(state, str(soft))
    errors = {}
    for flags in ([], ["--no_watermark"]):
        outdir = tmp / f"watermark{len(flags)}"
        run = run_script("txt2img.py", "--config", TINY_SD_CONFIG, "--ckpt", soft, "--H", "256", "--W", "256",
                         "--ddim_steps", "1", "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--outdir", outdir,
                         "--no_safety_checker", *flags, tmp=tmp)
        assert run.returncode == 0, run.stderr
        errors[bool(flags)] = _watermark_bit_errors(outdir / "samples" / "00000.png")
    assert errors[False] <= 14 and errors[True] >= 40, errors


def test_ctrl_c_keeps_the_images_already_saved(tmp, ckpt):
    outdir = tmp / "interrupted"
    # Output goes to files, not pipes that nobody reads until the end, and SIGINT gets its default
    # disposition in the child as under a terminal, whatever this test process inherited.
    with open(tmp / "ctrl-c.out", "w+") as out, open(tmp / "ctrl-c.err", "w+") as err:
        process = subprocess.Popen([sys.executable, str(SCRIPTS / "txt2img.py"), *FAST, "--ckpt", str(ckpt),
                                    "--outdir", str(outdir), "--n_samples", "1", "--n_iter", "500",
                                    "--no_safety_checker"], cwd=tmp, env=script_env(tmp), stdout=out, stderr=err,
                                   preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        deadline = time.monotonic() + 60
        while (not (outdir / "samples" / "00001.png").exists() and process.poll() is None
               and time.monotonic() < deadline):
            time.sleep(0.05)
        assert process.poll() is None, "the run ended before it could be interrupted"
        process.send_signal(signal.SIGINT)
        process.wait(timeout=60)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    assert process.returncode == 130, stderr[-3000:]
    assert "Traceback" not in stderr and "interrupted" in stdout
    names = sample_names(outdir)
    assert 2 <= len(names) < 500 and names == [f"{i:05}.png" for i in range(len(names))]
    for name in names:
        assert pixels(outdir / "samples" / name).shape == (64, 64, 3)


@pytest.mark.parametrize("name", ["txt2img.py", "img2img.py"])
def test_help_describes_every_flag(name):
    parser = load_script(name).build_parser()
    for action in parser._actions:
        assert action.help and len(action.help) > 10, action.option_strings


def test_original_flags_and_defaults():
    opt = load_script("txt2img.py").parse_args([])
    assert (opt.prompt, opt.outdir, opt.ddim_steps, opt.ddim_eta, opt.n_iter, opt.H, opt.W, opt.C, opt.f,
            opt.n_samples, opt.n_rows, opt.scale, opt.seed, opt.precision, opt.config, opt.ckpt, opt.sampler) == (
        "a painting of a virus monster playing guitar", "outputs/txt2img-samples", 50, 0.0, 2, 512, 512, 4, 8, 3,
        0, 7.5, 42, "autocast", "configs/stable-diffusion/v1-inference.yaml",
        "models/ldm/stable-diffusion-v1/model.ckpt", "ddim")
    laion = load_script("txt2img.py").parse_args(["--laion400m", "--dpm_solver"])
    assert (laion.config, laion.ckpt, laion.outdir, laion.sampler) == (
        "configs/latent-diffusion/txt2img-1p4B-eval.yaml", "models/ldm/text2img-large/model.ckpt",
        "outputs/txt2img-samples-laion400m", "dpm_solver")
    img = load_script("img2img.py").parse_args(["--init-img", "x.png"])
    assert (img.outdir, img.scale, img.strength, img.n_iter, img.n_samples, img.ddim_steps) == (
        "outputs/img2img-samples", 5.0, 0.75, 1, 2, 50)


@pytest.mark.parametrize("precision", ["autocast", "bf16"])
def test_embedding_path_loads_a_textual_inversion_embedding(tmp, ckpt, precision):
    embedding, outdir = tmp / "star.pt", tmp / f"embedding-{precision}"
    torch.save({"string_to_token": {"*": 265}, "string_to_param": {"*": torch.randn(1, 32)}}, embedding)
    run = run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", outdir, "--n_samples", "1", "--n_iter", "1",
                     "--prompt", "a photo of *", "--embedding_path", embedding, "--no_safety_checker",
                     "--precision", precision, tmp=tmp)
    assert run.returncode == 0, run.stderr
    assert "*" in run.stderr
    assert parse_infotext(parameters(outdir / "samples" / "00000.png"))[2]["Embeddings"] == "star.pt"


def test_stable_txt2img_is_txt2img(tmp):
    run = run_script("stable_txt2img.py", "--help", tmp=tmp)
    assert run.returncode == 0 and "--embedding_path" in run.stdout and "--laion400m" in run.stdout
