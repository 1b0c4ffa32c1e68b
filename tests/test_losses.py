"""Autoencoder losses: the PatchGAN discriminator, the adaptive adversarial weight, and LPIPS when its
pretrained weights cannot be had (a clear error that names the file and the way out)."""
from __future__ import annotations

import urllib.error

import pytest
import torch

from ldm.errors import UserInputError
from ldm.modules.distributions.distributions import DiagonalGaussianDistribution
from ldm.modules.losses import LPIPSWithDiscriminator
from ldm.modules.losses.discriminator import NLayerDiscriminator, hinge_d_loss


def test_patch_discriminator_layout_and_output():
    discriminator = NLayerDiscriminator(input_nc=3, ndf=8, n_layers=3)
    assert [name for name, _ in discriminator.named_parameters()][:2] == ["main.0.weight", "main.0.bias"]
    assert discriminator(torch.randn(2, 3, 64, 64)).shape == (2, 1, 6, 6)
    assert hinge_d_loss(torch.full((2,), 2.0), torch.full((2,), -2.0)).item() == 0.0


def test_loss_before_and_after_disc_start():
    torch.manual_seed(0)
    loss = LPIPSWithDiscriminator(disc_start=5, perceptual_weight=0.0, disc_num_layers=2, disc_weight=0.5)
    last_layer = torch.nn.Parameter(torch.randn(3, 3))
    inputs = torch.randn(2, 3, 32, 32)
    reconstructions = inputs + 0.1 * torch.randn(2, 3, 32, 32) + (last_layer.sum() * 0.01)
    posterior = DiagonalGaussianDistribution(torch.randn(2, 8, 8, 8))
    before, logs = loss(inputs, reconstructions, posterior, 0, global_step=0, last_layer=last_layer)
    assert logs["train/disc_factor"].item() == 0.0 and not loss.discriminator_active(0)
    after, logs = loss(inputs, reconstructions, posterior, 0, global_step=5, last_layer=last_layer)
    assert loss.discriminator_active(5) and logs["train/d_weight"].item() > 0
    d_loss, d_logs = loss(inputs, reconstructions, posterior, 1, global_step=5)
    assert d_loss.requires_grad and "train/logits_real" in d_logs
    assert torch.isfinite(before) and torch.isfinite(after)


def test_lpips_without_its_weights_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)

    def offline(*args, **kwargs):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr("urllib.request.urlopen", offline)
    with pytest.raises(UserInputError, match="perceptual_weight: 0"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    assert not list(tmp_path.rglob("*.part")), "no partial download is left behind"


def test_lpips_linear_weights_come_from_the_lpips_package(monkeypatch):
    from ldm.modules.losses import lpips as ours

    monkeypatch.delenv("LDM_LPIPS_WEIGHTS", raising=False)
    path = ours.lpips_weights_path()
    assert path.parts[-4:] == ("lpips", "weights", "v0.1", "vgg.pth")
    assert ours._file_digest(path, "md5") == ours.LPIPS_VGG_MD5, "the same file as taming-transformers' vgg.pth"
    weights = torch.load(path, map_location="cpu", weights_only=True)
    assert [tuple(weights[f"lin{k}.model.1.weight"].shape) for k in range(5)] == [
        (1, c, 1, 1) for c in ours.CHANNELS]


def test_lpips_refuses_a_wrong_linear_weight_file_before_any_download(tmp_path, monkeypatch):
    wrong = tmp_path / "vgg.pth"
    torch.save({"lin0.model.1.weight": torch.zeros(1, 64, 1, 1)}, wrong)
    monkeypatch.setenv("LDM_LPIPS_WEIGHTS", str(wrong))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))

    def no_download(*args, **kwargs):
        raise AssertionError("nothing may be downloaded for a wrong weight file")

    monkeypatch.setattr("urllib.request.urlopen", no_download)
    with pytest.raises(UserInputError, match="LDM_LPIPS_WEIGHTS"):
        LPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
