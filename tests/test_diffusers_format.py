"""Diffusers folders both ways (ldm.diffusers_format, scripts/convert_to_diffusers.py, convert_from_diffusers.py) and
`--ckpt FOLDER`: bit-exact round trips, the folder as diffusers and transformers load it (outputs, tokenizer ids,
schedule), the SD v1 key set, the sampling scripts on a folder, and what is refused."""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from safetensors.torch import load_file, save_file

from ldm.cli.common import run_cli
from ldm.cli.hashing import sha256_folder
from ldm.cli.memory import checkpoint_bytes
from ldm.diffusers_format import from_diffusers, plan_conversion, to_diffusers, to_half
from ldm.diffusers_loading import default_config, read_diffusers_folder
from ldm.inpainting_checkpoint import checkpoint_input_channels
from ldm.util import instantiate_from_config
from tests.cli_support import FAST, load_script, pixels, script_env, write_tiny_checkpoint
from tests.model_factory import DATA_DIR, REPO_DIR, TESTS_DIR, TINY_SD_CONFIG, random_tiny_model, randomize_

diffusers = pytest.importorskip("diffusers")
transformers = pytest.importorskip("transformers")

TINY_INPAINTING_CONFIG = TESTS_DIR / "configs" / "tiny-sd-inpainting.yaml"
TINY_BERT_CONFIG = TESTS_DIR / "configs" / "tiny-ldm-bert.yaml"
SD_V1_KEYS = json.loads((DATA_DIR / "sd-v1-state-dict.json").read_text())["tensors"]
TOKEN_CASES = json.loads((DATA_DIR / "clip-vit-l14-tokens.json").read_text())["cases"]


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def convert(script: str, *args: object) -> int:
    return run_cli(load_script(script).main, [str(arg) for arg in args])


def one_error_line(capsys) -> str:
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture(scope="module")
def tmp(tmp_path_factory):
    return tmp_path_factory.mktemp("diffusers")


@pytest.fixture(scope="module")
def ckpt(tmp):
    return write_tiny_checkpoint(tmp / "tiny.safetensors", seed=3)


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=3)


@pytest.fixture(scope="module")
def folder(tmp, ckpt):
    assert convert("convert_to_diffusers.py", ckpt, tmp / "tiny-diffusers", "--config", TINY_SD_CONFIG) == 0
    return tmp / "tiny-diffusers"


@pytest.fixture
def copy_of(folder, tmp_path):
    """A fresh copy of the converted folder, to break."""
    return Path(shutil.copytree(folder, tmp_path / "copy"))


def test_state_dict_round_trip_is_bit_exact(model):
    plan = plan_conversion(TINY_SD_CONFIG)
    state = model.state_dict()
    back = from_diffusers(to_diffusers(state, plan), plan)
    assert list(back) == list(state)
    assert all(torch.equal(back[key], state[key]) and back[key].dtype == state[key].dtype for key in state)


def test_folder_round_trip_through_the_scripts_is_bit_exact(tmp, ckpt, folder):
    assert sorted(p.name for p in folder.iterdir()) == ["model_index.json", "scheduler", "text_encoder", "tokenizer",
                                                        "unet", "vae"]
    assert not list(tmp.glob(".tiny-diffusers.*"))
    out = tmp / "back.safetensors"
    assert convert("convert_from_diffusers.py", folder, out, "--config", TINY_SD_CONFIG) == 0
    original, back = load_file(str(ckpt)), load_file(str(out))
    assert list(back) == list(original)
    assert all(torch.equal(back[key], original[key]) for key in original)


def test_the_conversion_plan_is_kept_so_a_folder_reads_without_diffusers(tmp, folder, ckpt, tmp_path):
    cache = tmp_path / "cache"
    script = (f"import sys; from ldm.diffusers_loading import read_diffusers_folder; "
              f"state = read_diffusers_folder({str(folder)!r}, {str(TINY_SD_CONFIG)!r}); "
              "print(len(state), 'diffusers' in sys.modules)")

    def read_in_a_fresh_process() -> str:
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO_DIR,
                              env=script_env(tmp_path, XDG_CACHE_HOME=str(cache)), timeout=300)
        assert done.returncode == 0, done.stderr
        return done.stdout.split()

    count, imported = read_in_a_fresh_process()
    assert imported == "True" and int(count) == len(load_file(str(ckpt)))
    assert [path.name.split("-")[:2] for path in (cache / "latent-diffusion-sd").iterdir()] == [["diffusers", "plan"]]
    assert read_in_a_fresh_process() == [count, "False"]


def test_a_damaged_or_foreign_plan_on_disk_is_traced_again(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = plan_conversion(TINY_SD_CONFIG)
    [kept] = (tmp_path / "latent-diffusion-sd").glob("diffusers-plan-*.json")
    value = json.loads(kept.read_text())
    some_key = next(iter(value["table"]["vae"]))
    value["table"]["vae"][some_key][0] = value["table"]["vae"][next(k for k in value["table"]["vae"] if k != some_key)][0]
    for damage in (json.dumps(value), "{truncated", json.dumps({"table": {}})):
        kept.write_text(damage)
        again = plan_conversion(TINY_SD_CONFIG)
        assert again.table == first.table and again.unet_config == first.unet_config
        assert json.loads(kept.read_text())["table"]["vae"][some_key][0] == first.table["vae"][some_key].ours


def test_the_inverse_is_read_off_diffusers_and_gives_every_sd_v1_key_with_its_shape():
    plan = plan_conversion(REPO_DIR / "configs" / "stable-diffusion" / "v1-inference.yaml")
    reshaped = sorted(entry.ours for table in plan.table.values() for entry in table.values()
                      if entry.shape != entry.our_shape)
    assert reshaped == sorted(f"first_stage_model.{side}.mid.attn_1.{name}.weight" for side in ("decoder", "encoder")
                              for name in ("k", "proj_out", "q", "v"))  # conv_attn_to_linear, nothing else
    stand_ins = {part: {key: torch.zeros(()).expand(entry.shape) for key, entry in table.items()}
                 for part, table in plan.table.items()}
    back = from_diffusers(stand_ins, plan)
    assert {key: list(value.shape) for key, value in back.items()} == SD_V1_KEYS


def test_pipeline_loads_the_folder_and_computes_what_our_model_computes(folder, model):
    pipe = diffusers.StableDiffusionPipeline.from_pretrained(folder)
    assert pipe.safety_checker is None and type(pipe.scheduler).__name__ == "PNDMScheduler"
    generator = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10, 731])
    context = torch.randn(2, 77, 32, generator=generator)
    z = torch.randn(1, 4, 8, 8, generator=generator)
    prompts = ["a photograph of an astronaut riding a horse", ""]
    with torch.no_grad():
        unet = pipe.unet(x, t, encoder_hidden_states=context).sample
        assert relative_error(model.model.diffusion_model(x, t, context=context), unet) < 1e-4
        assert relative_error(model.first_stage_model.decode(z), pipe.vae.decode(z).sample) < 1e-4
        ids = pipe.tokenizer(prompts, padding="max_length", max_length=77, return_tensors="pt").input_ids
        assert relative_error(model.cond_stage_model(prompts), pipe.text_encoder(ids)[0]) < 1e-4
    assert pipe.vae.config.scaling_factor == pytest.approx(model.scale_factor)
    assert torch.allclose(pipe.scheduler.betas, model.betas.float(), rtol=1e-5)


def test_tokenizer_files_reproduce_the_clip_fixture(folder, model):
    tokenizer = transformers.CLIPTokenizer.from_pretrained(folder / "tokenizer")
    assert len(tokenizer) == 49408
    assert [tokenizer(case["prompt"]).input_ids for case in TOKEN_CASES] == [case["ids"] for case in TOKEN_CASES]
    prompts = [case["prompt"] for case in TOKEN_CASES]
    padded = tokenizer(prompts, padding="max_length", max_length=77, truncation=True).input_ids
    assert padded == model.cond_stage_model.token_ids(prompts)


def test_inpainting_model_becomes_an_inpainting_pipeline_and_comes_back(tmp_path):
    torch.manual_seed(0)
    inpainting = randomize_(instantiate_from_config(OmegaConf.load(TINY_INPAINTING_CONFIG).model), 5).eval()
    state = inpainting.state_dict()
    ckpt = tmp_path / "inpainting.safetensors"
    save_file({key: value.contiguous() for key, value in state.items()}, str(ckpt))
    out = tmp_path / "inpainting"
    assert convert("convert_to_diffusers.py", ckpt, out, "--config", TINY_INPAINTING_CONFIG, "--half") == 0
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionInpaintPipeline"
    assert checkpoint_input_channels(out) == 9 and default_config(9).endswith("v1-inpainting-inference.yaml")
    pipe = diffusers.StableDiffusionInpaintPipeline.from_pretrained(out)
    assert pipe.unet.config.in_channels == 9
    stored = load_file(str(out / "unet" / "diffusion_pytorch_model.safetensors"))
    assert {value.dtype for value in stored.values()} == {torch.float16}
    back = tmp_path / "back.safetensors"
    assert convert("convert_from_diffusers.py", out, back, "--config", TINY_INPAINTING_CONFIG) == 0
    restored, expected = load_file(str(back)), to_half(state)
    assert restored.keys() == expected.keys() and restored["betas"].dtype == torch.float32
    assert all(torch.equal(restored[key], value) and restored[key].dtype == value.dtype
               for key, value in expected.items())


def test_txt2img_takes_the_folder_as_ckpt_and_draws_the_same_image(tmp, ckpt, folder):
    """The same weights give the same pixels. --no_accel: ldm.accel's CPU kernels round differently with the
    weights' memory alignment, which differs between two files (and a copy in memory) holding equal tensors."""
    images = []
    for source, name in ((ckpt, "from-file"), (folder, "from-folder")):
        args = [*FAST, "--ckpt", str(source), "--outdir", str(tmp / name), "--prompt", "a red circle",
                "--n_samples", "1", "--n_iter", "1", "--skip_grid", "--no_safety_checker", "--no_accel"]
        assert run_cli(load_script("txt2img.py").main, args) == 0
        images.append(pixels(tmp / name / "samples" / "00000.png"))
    assert (images[0] == images[1]).all()


def test_a_folder_is_sized_and_hashed_by_its_weight_files(folder):
    files = [folder / "unet" / "diffusion_pytorch_model.safetensors",
             folder / "vae" / "diffusion_pytorch_model.safetensors", folder / "text_encoder" / "model.safetensors"]
    assert checkpoint_bytes(str(folder)) == sum(file.stat().st_size for file in files)
    assert len(sha256_folder(folder)) == 64


@pytest.mark.parametrize("breakage,message", [
    (lambda f: (f / "vae" / "config.json").unlink(), "has no vae (vae/config.json is missing)"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").unlink(), "has no weights for its unet"),
    (lambda f: (f / "model_index.json").unlink(), "not a diffusers folder"),
    (lambda f: (f / "text_encoder_2").mkdir(), "SDXL"),
    (lambda f: (f / "text_encoder" / "config.json").write_text(json.dumps({"hidden_size": 1024})),
     "Stable Diffusion 2"),
    (lambda f: (f / "unet" / "diffusion_pytorch_model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{"),
     "cannot read"),
])
def test_a_broken_or_foreign_folder_is_refused_in_one_line(capsys, copy_of, tmp_path, breakage, message):
    breakage(copy_of)
    out = tmp_path / "out.safetensors"
    assert convert("convert_from_diffusers.py", copy_of, out, "--config", TINY_SD_CONFIG) == 2
    assert message in one_error_line(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.safetensors.*"))


def test_a_folder_of_another_model_names_the_difference(capsys, folder, tmp_path):
    assert convert("convert_from_diffusers.py", folder, tmp_path / "out.safetensors") == 2
    line = one_error_line(capsys)
    assert "does not fit" in line and "block_out_channels [32, 64]" in line


def test_existing_outputs_are_never_overwritten(capsys, ckpt, folder, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    assert convert("convert_to_diffusers.py", ckpt, taken, "--config", TINY_SD_CONFIG) == 2
    assert "exists" in one_error_line(capsys) and sorted(p.name for p in taken.iterdir()) == ["keep.txt"]
    existing = tmp_path / "existing.safetensors"
    existing.write_bytes(b"mine")
    assert convert("convert_from_diffusers.py", folder, existing, "--config", TINY_SD_CONFIG) == 2
    assert "exists" in one_error_line(capsys) and existing.read_bytes() == b"mine"


@pytest.mark.parametrize("config,message", [(TINY_SD_CONFIG, "cannot read"), (TINY_BERT_CONFIG, "BERT")])
def test_a_corrupt_checkpoint_or_the_bert_model_is_refused(capsys, tmp_path, ckpt, config, message):
    source = ckpt
    if message == "cannot read":
        source = tmp_path / "truncated.safetensors"
        source.write_bytes(ckpt.read_bytes()[:1000])
    out = tmp_path / "out"
    assert convert("convert_to_diffusers.py", source, out, "--config", config) == 2
    assert message in one_error_line(capsys)
    assert not out.exists() and not list(tmp_path.glob(".out.*"))


def test_txt2img_refuses_a_folder_missing_a_part_before_loading(capsys, copy_of, tmp_path):
    shutil.rmtree(copy_of / "text_encoder")
    outdir = tmp_path / "outputs"
    assert run_cli(load_script("txt2img.py").main, [*FAST, "--ckpt", str(copy_of), "--outdir", str(outdir)]) == 2
    assert "has no text_encoder" in one_error_line(capsys)
    assert not outdir.exists()


@pytest.mark.slow
def test_full_size_sd_v1_round_trip_is_bit_exact(tmp_path):
    """A random full-size SD v1 model (~1.07 B parameters, in float16 as the released pruned checkpoints: half the
    memory and time of float32, the same renaming) to a folder and back, through the scripts."""
    plan = plan_conversion(REPO_DIR / "configs" / "stable-diffusion" / "v1-inference.yaml")
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(value.shape, generator=generator).half() if value.is_meta else value)
             for key, value in plan.template.state_dict().items()}
    ckpt = tmp_path / "sd-v1-random.safetensors"
    save_file(state, str(ckpt))
    assert convert("convert_to_diffusers.py", ckpt, tmp_path / "folder", "--half") == 0
    pipeline = diffusers.StableDiffusionPipeline.from_pretrained(tmp_path / "folder", torch_dtype=torch.float16)
    assert pipeline.unet.config.in_channels == 4
    del pipeline
    assert convert("convert_from_diffusers.py", tmp_path / "folder", tmp_path / "back.safetensors", "--half") == 0
    back = load_file(str(tmp_path / "back.safetensors"))
    assert {key: list(value.shape) for key, value in back.items()} == SD_V1_KEYS
    assert all(torch.equal(back[key], state[key]) for key in state)


def test_a_folder_with_another_schedule_or_latent_scale_loads_with_a_warning(caplog, copy_of, ckpt):
    for path, key, value in (("scheduler/scheduler_config.json", "beta_end", 0.02),
                             ("vae/config.json", "scaling_factor", 0.13025)):
        config = json.loads((copy_of / path).read_text())
        (copy_of / path).write_text(json.dumps({**config, key: value}))
    with caplog.at_level("WARNING", logger="ldm"):
        state = read_diffusers_folder(copy_of, TINY_SD_CONFIG)
    assert "beta_end 0.02 (the config's model: 0.012)" in caplog.text and "scaling_factor 0.13025" in caplog.text
    assert all(torch.equal(state[key], value) for key, value in load_file(str(ckpt)).items())


def test_outputs_get_the_usual_permissions(folder, tmp_path):
    """Built under temporary names (tempfile makes them private), they end with the modes mkdir and open give."""
    umask = os.umask(0o022)
    os.umask(umask)
    out = tmp_path / "out.safetensors"
    assert convert("convert_from_diffusers.py", folder, out, "--config", TINY_SD_CONFIG) == 0
    assert folder.stat().st_mode & 0o777 == 0o777 & ~umask
    assert out.stat().st_mode & 0o777 == 0o666 & ~umask
