"""A VAE file replaces the model's autoencoder exactly, in every key layout (full model, bare autoencoder keys
with a training checkpoint's extras, diffusers' AutoencoderKL), as .ckpt and .safetensors; a VAE of another
shape, or a file that is no VAE, is one clear UserInputError."""
from __future__ import annotations

import copy

import pytest
import torch
from safetensors.torch import save_file

from ldm.errors import UserInputError
from ldm.vae_files import load_vae
from tests.model_factory import random_tiny_model, tiny_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")


@pytest.fixture(scope="module")
def base():
    return random_tiny_model(seed=3)


@pytest.fixture(scope="module")
def donor():
    """Another model, whose autoencoder the VAE files hold."""
    return random_tiny_model(seed=11)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def _save(path, tensors):
    tensors = {key: value.contiguous() for key, value in tensors.items()}
    if path.suffix == ".safetensors":
        save_file(tensors, str(path))
    else:
        torch.save({"state_dict": tensors, "global_step": 840000}, path)
    return path


def _layout(donor, layout: str) -> dict[str, torch.Tensor]:
    autoencoder = donor.first_stage_model.state_dict()
    if layout == "full model":
        return donor.state_dict()
    if layout == "bare":
        return {**autoencoder, "loss.logvar": torch.zeros(()), "model_ema.decay": torch.tensor(0.9999),
                "model_ema.encoderconv_inweight": torch.ones(1)}
    config = single_file.create_vae_diffusers_config_from_ldm(dict(tiny_config()), donor.state_dict(), image_size=64)
    return single_file.convert_ldm_vae_checkpoint(donor.state_dict(), config)


@pytest.mark.parametrize("suffix", [".safetensors", ".ckpt"])
@pytest.mark.parametrize("layout", ["full model", "bare", "diffusers"])
def test_each_layout_swaps_the_autoencoder_exactly(model, donor, tmp_path, layout, suffix):
    path = _save(tmp_path / f"vae{suffix}", _layout(donor, layout))
    unet_before = {key: value.clone() for key, value in model.model.state_dict().items()}
    load_vae(model, path)
    ours, theirs = model.first_stage_model.state_dict(), donor.first_stage_model.state_dict()
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[key], theirs[key]) for key in theirs)
    assert all(torch.equal(value, unet_before[key]) for key, value in model.model.state_dict().items())


def test_weights_keep_the_model_dtype(model, donor, tmp_path):
    model.half()
    load_vae(model, _save(tmp_path / "vae.safetensors", _layout(donor, "bare")))
    ours, theirs = model.first_stage_model.state_dict(), donor.first_stage_model.state_dict()
    assert all(ours[key].dtype == torch.float16 and torch.equal(ours[key], theirs[key].half()) for key in theirs)


def _refused(model, path) -> str:
    before = {key: value.clone() for key, value in model.first_stage_model.state_dict().items()}
    with pytest.raises(UserInputError) as error:
        load_vae(model, path)
    assert all(torch.equal(value, before[key]) for key, value in model.first_stage_model.state_dict().items())
    assert "\n" not in str(error.value)
    return str(error.value)


def test_a_vae_of_another_shape_is_refused(model, tmp_path):
    config = tiny_config()  # 16 latent channels, as SD 3's and Flux's autoencoders have
    config.model.params.first_stage_config.params.embed_dim = 16
    config.model.params.first_stage_config.params.ddconfig.z_channels = 16
    other = random_tiny_model(seed=4, config=config)
    message = _refused(model, _save(tmp_path / "other.safetensors", other.first_stage_model.state_dict()))
    assert "does not fit this model" in message and "in the file" in message


def test_a_file_without_the_autoencoder_is_refused(model, donor, tmp_path):
    message = _refused(model, _save(tmp_path / "unet.safetensors", donor.model.state_dict()))
    assert "is not an autoencoder for this model" in message and "missing" in message


def test_a_damaged_vae_is_refused(model, donor, tmp_path):
    tensors = dict(donor.first_stage_model.state_dict())
    tensors["decoder.conv_out.weight"] = tensors["decoder.conv_out.weight"].clone()
    tensors["decoder.conv_out.weight"][0, 0, 0, 0] = float("inf")
    assert "decoder.conv_out.weight" in _refused(model, _save(tmp_path / "inf.safetensors", tensors))
    cut = tmp_path / "cut.ckpt"
    _save(cut, donor.first_stage_model.state_dict())
    cut.write_bytes(cut.read_bytes()[:1000])
    assert "truncated" in _refused(model, cut)
