"""Textual inversion end to end (Gal et al. 2022): main.py trains a placeholder on a tiny model and a
handful of generated images; only the embedding changes, the loss goes down, the file reloads with the
same conditioning and changes what txt2img renders for "*" only; several vectors and a multi-token
initializer word; bad input exits with code 2 and one line."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image, ImageDraw

from ldm.checkpoint import load_model_from_config
from ldm.data.personalized import PersonalizedBase
from ldm.modules.embedding_manager import attach_embeddings, read_embedding_file
from tests.cli_support import pixels, run_script, script_env
from tests.model_factory import REPO_DIR, TESTS_DIR, TINY_SD_CONFIG, random_tiny_model

TINY_TI = TESTS_DIR / "configs" / "tiny-textual-inversion.yaml"


def run_main(tmp: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO_DIR / "main.py"), "--base", str(TINY_SD_CONFIG), str(TINY_TI),
                           "-t", *args], cwd=tmp, env=script_env(tmp), capture_output=True, text=True, timeout=240)


def make_images(root: Path) -> Path:
    root.mkdir()
    for index, colour in enumerate(["red", "orange", "gold"]):
        image = Image.new("RGB", (80, 64), "navy")
        ImageDraw.Draw(image).ellipse((10 + 3 * index, 8, 60, 56), fill=colour)
        image.save(root / f"{index}.png")
    (root / "notes.txt").write_text("not an image")
    return root


def checkpoints(tmp: Path) -> Path:
    (run,) = (tmp / "logs").iterdir()
    return run / "checkpoints"


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One run of the original command (paths aside) on the tiny model."""
    tmp = tmp_path_factory.mktemp("ti")
    torch.save({"state_dict": random_tiny_model().state_dict()}, tmp / "init.ckpt")
    images = make_images(tmp / "images")
    result = run_main(tmp, "--actual_resume", "init.ckpt", "-n", "concept", "--data_root", str(images),
                      "--init_word", "sculpture")
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp, checkpoints(tmp)


def tiny_ti_model(ckpt: Path):
    config = OmegaConf.merge(OmegaConf.load(TINY_SD_CONFIG), OmegaConf.load(TINY_TI))
    model = load_model_from_config(config, ckpt)
    model.embedding_manager.initialize_from_embedder()
    return model


@torch.no_grad()
def fixed_loss(model, images: Path) -> float:
    """The training loss of the concept's images over fixed noise and timesteps."""
    data = PersonalizedBase(str(images), size=64, set="val", flip_p=0.0)
    x = torch.stack([torch.from_numpy(data[i]["image"]) for i in range(len(data))]).permute(0, 3, 1, 2)
    generator = torch.Generator().manual_seed(0)
    z = model.get_first_stage_encoding(model.encode_first_stage(x).mode()).repeat(16, 1, 1, 1)
    t = torch.randint(0, model.num_timesteps, (z.shape[0],), generator=generator)
    noise = torch.randn(z.shape, generator=generator)
    c = model.get_learned_conditioning(["a photo of a *"] * z.shape[0])
    return model.p_losses(z, c, t, noise=noise)[1]["val/loss_simple"].item()


def test_training_learns_only_the_embedding_and_lowers_the_loss(trained):
    tmp, ckpts = trained
    assert {p.name for p in ckpts.glob("embeddings*.pt")} >= {"embeddings.pt", "embeddings_gs-5.pt", "embeddings_gs-10.pt"}
    state = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert state and all(key.startswith("embedding_manager.") for key in state)
    learned = read_embedding_file(ckpts / "embeddings.pt")
    assert list(learned) == ["*"] and learned["*"].shape == (1, 32)
    model = tiny_ti_model(tmp / "init.ckpt")
    initial = model.embedding_manager.string_to_param_dict["*"].detach().clone()
    assert not torch.allclose(learned["*"], initial)
    before = fixed_loss(model, tmp / "images")
    model.embedding_manager.load(ckpts / "embeddings.pt")
    assert fixed_loss(model, tmp / "images") < before


def test_saved_embeddings_reload_with_the_same_conditioning(trained):
    tmp, ckpts = trained
    model = tiny_ti_model(tmp / "init.ckpt")
    state = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    model.load_state_dict(state, strict=False)
    plain = load_model_from_config(TINY_SD_CONFIG, tmp / "init.ckpt")
    assert attach_embeddings(plain, [str(ckpts / "embeddings.pt")]) == ["*"]
    prompts = ["a photo of *", "a photo of a cat"]
    with torch.no_grad():
        torch.testing.assert_close(plain.get_learned_conditioning(prompts), model.get_learned_conditioning(prompts))


def test_embedding_path_changes_only_the_placeholder(trained):
    tmp, ckpts = trained
    (tmp / "prompts.txt").write_text("a photo of *\na photo of a cat\n")
    common = ["--config", str(TINY_SD_CONFIG), "--ckpt", "init.ckpt", "--from-file", "prompts.txt", "--n_samples",
              "2", "--n_iter", "1", "--H", "64", "--W", "64", "--ddim_steps", "2", "--seed", "5",
              "--no_safety_checker", "--no_watermark"]
    for outdir, extra in (("plain", []), ("learned", ["--embedding_path", str(ckpts / "embeddings.pt")])):
        result = run_script("txt2img.py", *common, "--outdir", outdir, *extra, tmp=tmp)
        assert result.returncode == 0, result.stderr[-3000:]
    placeholder = [pixels(tmp / d / "samples" / "00000.png").astype(int) for d in ("plain", "learned")]
    other = [pixels(tmp / d / "samples" / "00001.png") for d in ("plain", "learned")]
    assert np.abs(placeholder[0] - placeholder[1]).max() > 0
    np.testing.assert_array_equal(other[0], other[1])


def test_several_vectors_from_a_multi_token_word_keep_the_model_bit_identical(tmp_path):
    init = {key: value.clone() for key, value in random_tiny_model().state_dict().items()}
    torch.save({"state_dict": init}, tmp_path / "init.ckpt")
    images = make_images(tmp_path / "images")
    result = run_main(tmp_path, "-n", "multi", "--data_root", str(images), "--init_word", "teddy bear",
                      "--placeholder_string", "@",
                      "model.params.ckpt_path=init.ckpt",
                      "model.params.personalization_config.params.num_vectors_per_token=2",
                      "lightning.trainer.max_steps=3")
    assert result.returncode == 0, result.stderr[-3000:]
    ckpts = checkpoints(tmp_path)
    learned = read_embedding_file(ckpts / "embeddings.pt")
    assert list(learned) == ["@"] and learned["@"].shape == (2, 32)
    state = torch.load(ckpts / "last.ckpt", weights_only=True)["state_dict"]
    assert set(init) <= set(state)
    changed = [key for key in init if not torch.equal(init[key], state[key])]
    assert changed == [], "the UNet, autoencoder and text encoder are bit-identical after training"


@pytest.mark.parametrize("case, message", [("empty_root", "no images"),
                                           ("placeholder", "not one"),
                                           ("init_word", "cannot be encoded"),
                                           ("corrupt_embedding", "cannot read embedding file")])
def test_bad_input_exits_2_with_one_line(tmp_path, case, message):
    torch.save({"state_dict": random_tiny_model().state_dict()}, tmp_path / "init.ckpt")
    images = make_images(tmp_path / "images")
    args = ["--actual_resume", "init.ckpt", "--data_root", str(images)]
    if case == "empty_root":
        (tmp_path / "empty").mkdir()
        (tmp_path / "empty" / "readme.md").write_text("no pictures here")
        args[-1] = str(tmp_path / "empty")
    elif case == "placeholder":
        args += ["--placeholder_string", "two words"]
    elif case == "init_word":
        args += ["--init_word", "   "]
    else:
        (tmp_path / "bad.pt").write_bytes(b"PK\x03\x04 truncated")
        args += ["--embedding_manager_ckpt", "bad.pt"]
    result = run_main(tmp_path, *args)
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("main.py: error:")]
    assert len(errors) == 1 and message in errors[0], result.stderr[-3000:]


def test_textual_inversion_on_the_ldm_bert_model(tmp_path):
    """The LDM text2img-large layout (BERTEmbedder) learns a placeholder through main.py too."""
    from tests.test_bert import WORDS

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    images = make_images(tmp_path / "images")
    config = TESTS_DIR / "configs" / "tiny-ldm-bert.yaml"
    result = subprocess.run(
        [sys.executable, str(REPO_DIR / "main.py"), "--base", str(config), str(TINY_TI), "-t", "-n", "bert",
         "--data_root", str(images), "--init_word", "sculpture", "lightning.trainer.max_steps=3"],
        cwd=tmp_path, env=script_env(tmp_path, LDM_BERT_VOCAB=str(vocab)), capture_output=True, text=True,
        timeout=240)
    assert result.returncode == 0, result.stderr[-3000:]
    learned = read_embedding_file(checkpoints(tmp_path) / "embeddings.pt")
    assert list(learned) == ["*"] and learned["*"].shape[-1] == 32
