"""--tiled_decode, --lowvram and --compile: the library mechanisms on the tiny model, and the flags end to end."""
from __future__ import annotations

import argparse
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from ldm.cli.common import OriginalDefaults, add_original_sampling_arguments
from ldm.cli.outputs import parse_infotext
from ldm.cli.runtime import compile_unet, enable_tiled_decode
from ldm.errors import UserInputError
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.offload import enable_offload
from tests.cli_support import load_script, parameters, pixels, run_script, write_tiny_checkpoint
from tests.model_factory import TINY_SD_CONFIG, random_tiny_model, tiny_config

PARTS = ("cond_stage_model", "model.diffusion_model", "first_stage_model")
CPU = torch.device("cpu")
# A device the test never computes on: every .to() of the model and its parts is intercepted and recorded.
FAKE_GPU = torch.device("cuda")


class Locations:
    """Where the offloader has sent each part of `model` (by intercepting `.to`), and, at every forward pass of
    a part, where all of them were at that moment."""

    def __init__(self, model: torch.nn.Module, monkeypatch: pytest.MonkeyPatch):
        self.model = model
        self.parts = {path: model.get_submodule(path) for path in PARTS}
        self.where = {path: CPU for path in PARTS}
        self.moves: Counter = Counter()
        self.events: list[tuple[str, dict[str, torch.device]]] = []
        self.rest_moved_to: list[tuple[torch.device, bool]] = []
        for path, part in self.parts.items():
            monkeypatch.setattr(part, "to", self._recorder(path, part))
        monkeypatch.setattr(model, "to", self._record_rest)
        probes = {"cond_stage_model": [self.parts["cond_stage_model"]],
                  "model.diffusion_model": [self.parts["model.diffusion_model"]],
                  "first_stage_model": [self.parts["first_stage_model"].encoder,
                                        self.parts["first_stage_model"].decoder]}
        for path, modules in probes.items():
            for module in modules:
                module.register_forward_pre_hook(lambda *_, path=path: self.events.append((path, dict(self.where))))

    def _recorder(self, path: str, part: torch.nn.Module):
        def to(device):
            device = torch.device(device)
            if device != self.where[path]:
                self.moves[path, device.type] += 1
            self.where[path] = device
            return part
        return to

    def _record_rest(self, device):
        model = self.model
        parts_detached = (model.cond_stage_model, model.model.diffusion_model, model.first_stage_model) == 3 * (None,)
        self.rest_moved_to.append((torch.device(device), parts_detached))
        return model


def test_offload_keeps_one_part_at_a_time_on_the_device(monkeypatch):
    model = random_tiny_model()
    locations = Locations(model, monkeypatch)
    offloader = enable_offload(model, FAKE_GPU)
    assert locations.rest_moved_to == [(FAKE_GPU, True)]  # the rest went to the device without the parts
    assert all(model.get_submodule(path) is part for path, part in locations.parts.items())
    assert set(locations.where.values()) == {CPU} and offloader.resident is None

    with torch.no_grad():
        c = model.get_learned_conditioning(["a red circle", "a blue star"])
        uc = model.get_learned_conditioning(["", ""])
        samples, _ = DDIMSampler(model).sample(S=3, conditioning=c, batch_size=2, shape=[4, 8, 8], verbose=False,
                                               unconditional_guidance_scale=7.5, unconditional_conditioning=uc)
        model.decode_first_stage(samples)
        model.encode_first_stage(torch.zeros(1, 3, 64, 64))
        model.get_learned_conditioning(["again"])

    phases = [path for path, _ in locations.events]
    assert phases == (2 * ["cond_stage_model"] + 3 * ["model.diffusion_model"] + 2 * ["first_stage_model"]
                      + ["cond_stage_model"])
    for active, where in locations.events:
        assert where == {path: FAKE_GPU if path == active else CPU for path in PARTS}, (active, where)
    # Each part crosses over once per phase, not once per call: the UNet stays for all three steps.
    assert locations.moves == {("cond_stage_model", "cuda"): 2, ("cond_stage_model", "cpu"): 1,
                               ("model.diffusion_model", "cuda"): 1, ("model.diffusion_model", "cpu"): 1,
                               ("first_stage_model", "cuda"): 1, ("first_stage_model", "cpu"): 1}
    assert offloader.resident == "cond_stage_model"


def test_offload_leaves_the_ema_weights_off_the_device(monkeypatch):
    config = tiny_config()
    config.model.params.use_ema = True
    model = random_tiny_model(config=config)
    ema = model.model_ema
    ema_present_when_the_rest_moved = []
    monkeypatch.setattr(model, "to", lambda device: ema_present_when_the_rest_moved.append(model.model_ema))
    enable_offload(model, FAKE_GPU)
    assert ema_present_when_the_rest_moved == [None] and model.model_ema is ema


def test_offload_on_the_cpu_changes_nothing():
    reference, offloaded = random_tiny_model(), random_tiny_model()
    enable_offload(offloaded, CPU)
    latents = []
    for model in (reference, offloaded):
        torch.manual_seed(0)
        with torch.no_grad():
            c = model.get_learned_conditioning(["a red circle"])
            samples, _ = DDIMSampler(model).sample(S=2, conditioning=c, batch_size=1, shape=[4, 8, 8], verbose=False)
            latents.append(model.get_first_stage_encoding(model.encode_first_stage(model.decode_first_stage(samples))))
    assert torch.equal(*latents)
    assert all(p.device == CPU for p in offloaded.parameters())


def test_compile_unet_routes_the_unet_through_torch_compile(monkeypatch):
    model = random_tiny_model()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), torch.randn(2, 77, 32)
    with torch.no_grad():
        eager = model.apply_model(x, t, context)
    compiled_calls = []

    def fake_compile(function, *args, **kwargs):
        def call(*call_args, **call_kwargs):
            compiled_calls.append(function)
            return function(*call_args, **call_kwargs)
        return call

    monkeypatch.setattr(torch, "compile", fake_compile)
    compile_unet(model)
    with torch.no_grad():
        assert torch.equal(model.apply_model(x, t, context), eager)
    assert len(compiled_calls) == 1


def test_compile_unet_without_torch_compile_is_a_user_error(monkeypatch):
    def unsupported(*args, **kwargs):
        raise RuntimeError("torch.compile is not supported on this Python")

    monkeypatch.setattr(torch, "compile", unsupported)
    with pytest.raises(UserInputError, match="--compile: torch.compile is not available here"):
        compile_unet(random_tiny_model())


def test_tiled_decode_sets_latent_tiles_of_64_with_overlap_16():
    model = random_tiny_model()
    enable_tiled_decode(model)
    assert model.first_stage_model.decode_tile == (64, 16)
    with pytest.raises(UserInputError, match="cannot decode in tiles"):
        enable_tiled_decode(SimpleNamespace(first_stage_model=torch.nn.Identity()))


def test_original_flags_helper_rejects_unknown_names():
    with pytest.raises(ValueError, match="not flags of the original scripts"):
        add_original_sampling_arguments(argparse.ArgumentParser(), OriginalDefaults(1, 1, 1.0, "x", {"H": "y"}))


@pytest.mark.parametrize("name", ["txt2img.py", "img2img.py"])
def test_both_scripts_have_the_performance_flags(name):
    parser = load_script(name).build_parser()
    flags = {option: action for action in parser._actions for option in action.option_strings}
    for flag in ("--tiled_decode", "--lowvram", "--compile"):
        assert flags[flag].default is False and len(flags[flag].help) > 40


# End to end: one sample of 2 steps, 64x576 (a latent 72 wide: two decode tiles), no watermark.
RUN = ["--config", TINY_SD_CONFIG, "--ckpt", "tiny.safetensors", "--ddim_steps", "2", "--n_samples", "1",
       "--n_iter", "1", "--skip_grid", "--no_safety_checker", "--no_watermark", "--prompt", "a red circle"]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    root = tmp_path_factory.mktemp("performance-flags")
    write_tiny_checkpoint(root / "tiny.safetensors")
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 256, (64, 576, 3), dtype=np.uint8)).save(root / "init.png")
    return root


@pytest.fixture(scope="module")
def render(tmp):
    """render(script, *flags): the path of the one image a run with `flags` saves (each run done once)."""
    done = {}

    def run(script: str, *flags: str):
        if (script, flags) not in done:
            outdir = tmp / f"{script}-{len(done)}"
            size = ["--H", "64", "--W", "576"] if script == "txt2img.py" else ["--init-img", "init.png"]
            result = run_script(script, *RUN, *size, "--outdir", outdir, *flags, tmp=tmp)
            assert result.returncode == 0, result.stderr
            done[script, flags] = outdir / "samples" / "00000.png"
        return done[script, flags]

    return run


@pytest.mark.parametrize("script", ["txt2img.py", "img2img.py"])
def test_lowvram_gives_the_same_pixels(render, script):
    assert np.array_equal(pixels(render(script)), pixels(render(script, "--lowvram")))


def test_tiled_decode_renders_nearly_the_whole_image_decode(render):
    whole, tiled = pixels(render("txt2img.py")), pixels(render("txt2img.py", "--tiled_decode"))
    difference = np.abs(whole.astype(int) - tiled)
    assert whole.shape == tiled.shape == (64, 576, 3)
    assert difference.max() > 0  # two tiles really were decoded apart ...
    assert difference.mean() < 3 and difference.max() < 64  # ... and cross-faded into nearly the same image
    assert parse_infotext(parameters(render("txt2img.py", "--tiled_decode")))[2]["Tiled decode"] == "True"


def test_compile_without_a_cpp_compiler_is_one_line_and_exit_2(tmp):
    outdir = tmp / "never"
    run = run_script("txt2img.py", *RUN, "--H", "64", "--W", "64", "--device", "cpu", "--compile", "--outdir",
                     outdir, tmp=tmp, CXX=str(tmp / "no-such-compiler"))
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr
    assert lines[-1].startswith("txt2img.py: error: --compile on the CPU needs a C++ compiler"), run.stderr
    assert sum("error" in line for line in lines) == 1 and "Traceback" not in run.stderr and not outdir.exists()


def test_bf16_precision_keeps_the_weights_in_bf16_and_renders_close_to_fp32(tmp, render):
    from ldm.cli.runtime import load_model

    model = load_model(tiny_config(), str(tmp / "tiny.safetensors"), CPU, precision="bf16")
    assert model.model.diffusion_model.out[2].weight.dtype == torch.bfloat16
    assert model.alphas_cumprod.dtype == torch.float32
    assert load_model(tiny_config(), str(tmp / "tiny.safetensors"), CPU, precision="autocast").model.diffusion_model \
        .out[2].weight.dtype == torch.float32
    full = pixels(render("txt2img.py", "--precision", "full")).astype(int)
    half = pixels(render("txt2img.py", "--precision", "bf16")).astype(int)
    assert np.abs(full - half).mean() < 4
