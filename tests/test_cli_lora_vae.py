"""--lora and --vae on the sampling scripts, as subprocesses against a tiny random checkpoint: they change the
image, the PNG text records them with the web UIs' names and hashes, and bad input is one line, exit code 2,
nothing written."""
from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import save_file

from ldm.cli.common import lora_argument
from ldm.cli.hashing import lora_short_hash
from ldm.cli.outputs import parse_infotext
from tests.cli_support import FAST, parameters, pixels, run_script, snapshot, write_tiny_checkpoint
from tests.model_factory import random_tiny_model

# kohya names of layers of the tiny model (tests/configs/tiny-sd.yaml) -> (out, in) of their weights
LORA_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": (32, 32),
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn2_to_v": (64, 32),
    "lora_te_text_model_encoder_layers_0_self_attn_q_proj": (32, 32),
}


def _lora(seed: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, (out, inp) in LORA_LAYERS.items():
        tensors[f"{name}.lora_down.weight"] = torch.randn(4, inp, generator=generator)
        tensors[f"{name}.lora_up.weight"] = torch.randn(out, 4, generator=generator)
        tensors[f"{name}.alpha"] = torch.tensor(4.0)
    return tensors


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lora-vae")
    ckpt = write_tiny_checkpoint(tmp / "tiny.safetensors")
    lora = tmp / "my,style.safetensors"
    save_file(_lora(1), str(lora))
    vae = tmp / "vae-ft-test.safetensors"
    save_file({k: v.contiguous() for k, v in random_tiny_model(seed=11).first_stage_model.state_dict().items()},
              str(vae))
    return tmp, ckpt, lora, vae


def _run(files, outdir, *extra):
    tmp, ckpt, _, _ = files
    return run_script("txt2img.py", *FAST, "--ckpt", ckpt, "--outdir", tmp / outdir, "--prompt", "a red circle",
                      "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_watermark", *extra, tmp=tmp)


@pytest.fixture(scope="module")
def runs(files):
    tmp, _, lora, vae = files
    plain = _run(files, "plain")
    with_files = _run(files, "with", "--lora", f"{lora}:0.8", "--vae", vae)
    for run in (plain, with_files):
        assert run.returncode == 0, run.stderr
    return tmp / "plain" / "samples" / "00000.png", tmp / "with" / "samples" / "00000.png"


def test_lora_and_vae_change_the_image(runs):
    plain, with_files = runs
    assert (pixels(plain) != pixels(with_files)).any()


def test_png_text_records_lora_and_vae(runs, files):
    _, _, lora, vae = files
    data = lora.read_bytes()
    addnet = hashlib.sha256(data[8 + int.from_bytes(data[:8], "little"):]).hexdigest()
    _, _, fields = parse_infotext(parameters(runs[1]))
    assert fields["Lora hashes"] == f"mystyle: {addnet[:12]}"
    assert fields["Lora weights"] == "mystyle: 0.8"
    assert fields["VAE"] == "vae-ft-test.safetensors"
    assert fields["VAE hash"] == hashlib.sha256(vae.read_bytes()).hexdigest()[:10]
    assert not {"Lora hashes", "VAE"} & set(parse_infotext(parameters(runs[0]))[2])


def test_sdxl_lora_exits_2_in_one_line_and_writes_nothing(files):
    tmp = files[0]
    xl = tmp / "xl.safetensors"
    save_file({"lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(4, 768),
               "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, 4)}, str(xl))
    run = _run(files, "xl", "--lora", xl)
    assert run.returncode == 2
    assert run.stderr.strip().splitlines()[-1].startswith("txt2img.py: error: LoRA") and "SDXL" in run.stderr
    assert snapshot(tmp / "xl") == {}


@pytest.mark.parametrize("flag, value, expected", [
    ("--lora", "missing.safetensors", "LoRA file not found"),
    ("--lora", "LORA:nan", "must be a finite number"),
    ("--vae", "missing.ckpt", "VAE file not found"),
])
def test_bad_files_are_refused_before_the_model_loads(files, flag, value, expected):
    tmp, _, lora, _ = files
    run = _run(files, "bad", flag, value.replace("LORA", str(lora)))
    assert run.returncode == 2
    assert len(run.stderr.strip().splitlines()) == 1 and expected in run.stderr
    assert "loading model" not in run.stderr
    assert snapshot(tmp / "bad") == {}


def test_a_vae_of_another_shape_exits_2(files):
    tmp = files[0]
    wrong = tmp / "wrong-vae.safetensors"
    state = random_tiny_model(seed=11).first_stage_model.state_dict()
    state["decoder.conv_in.weight"] = torch.zeros(8, 4, 3, 3)
    save_file({k: v.contiguous() for k, v in state.items()}, str(wrong))
    run = _run(files, "wrong", "--vae", wrong)
    assert run.returncode == 2
    assert "does not fit this model" in run.stderr.strip().splitlines()[-1]
    assert snapshot(tmp / "wrong") == {}


@pytest.mark.parametrize("text, parsed", [
    ("style.safetensors", ("style.safetensors", 1.0)),
    ("style.safetensors:0.6", ("style.safetensors", 0.6)),
    ("style.safetensors:-1", ("style.safetensors", -1.0)),
    ("C:\\loras\\style.safetensors", ("C:\\loras\\style.safetensors", 1.0)),
    ("C:\\loras\\style.safetensors:1.5", ("C:\\loras\\style.safetensors", 1.5)),
    ("dir:with:colons/style.pt", ("dir:with:colons/style.pt", 1.0)),
])
def test_lora_argument_splits_only_a_numeric_weight(text, parsed):
    assert lora_argument(text) == parsed


@pytest.mark.parametrize("script", ["txt2img.py", "img2img.py", "inpaint.py", "stable_txt2img.py"])
def test_every_sampling_script_takes_the_flags(files, script):
    run = run_script(script, "--help", tmp=files[0])
    assert run.returncode == 0 and "--lora PATH[:WEIGHT]" in run.stdout and "--vae PATH" in run.stdout


def test_the_ldm_indir_inpainting_mode_refuses_them(files):
    tmp, _, lora, _ = files
    run = run_script("inpaint.py", "--indir", tmp, "--outdir", tmp / "indir", "--lora", lora, tmp=tmp)
    assert run.returncode == 2 and "--lora" in run.stderr and len(run.stderr.strip().splitlines()) == 1
    assert snapshot(tmp / "indir") == {}


def test_lora_hash_prefers_the_recorded_one_and_hashes_pickles_whole(files, monkeypatch):
    tmp = files[0]
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp / "hash-cache"))
    assert lora_short_hash(files[2], {"sshs_model_hash": "0123456789abcdef"}) == "0123456789ab"
    pickled = tmp / "style.pt"
    torch.save(_lora(2), pickled)
    assert lora_short_hash(pickled, {}) == hashlib.sha256(pickled.read_bytes()).hexdigest()[:12]
