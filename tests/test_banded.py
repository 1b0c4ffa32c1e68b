"""GroupNorm -> swish -> 3x3 convolution a band of rows at a time (ldm/accel/banded.py)."""
import pytest
import torch
import torch.nn.functional as F

from ldm import accel
from ldm.accel import banded, chunks
from ldm.accel.autoencoder import FastResnetBlock
from ldm.accel.conv import FastConv2d
from ldm.modules.diffusionmodules.util import GroupNorm32


def reference(norm: torch.nn.GroupNorm, conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(silu(norm(x))) in float64."""
    h = F.silu(F.group_norm(x.double(), norm.num_groups, norm.weight.double(), norm.bias.double(), norm.eps))
    return F.conv2d(h, conv.weight.double(), conv.bias.double(), padding=1)


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs).norm() / theirs.norm()).item()


@torch.no_grad()
@pytest.mark.parametrize("bytes_per_band", [1, 3 * 8 * 13 * 4, 1 << 30])  # one row, three rows, the whole map
def test_banded_equals_norm_swish_conv(monkeypatch, bytes_per_band):
    norm, conv = GroupNorm32(4, 8, eps=1e-6), FastConv2d(8, 5, 3, padding=1)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    torch.nn.init.normal_(norm.bias, 0.0, 0.3)
    x = (torch.randn(2, 8, 11, 13) * 4 + 3).contiguous(memory_format=torch.channels_last)  # mean far from 0
    monkeypatch.setattr(chunks, "CHUNK_BYTES", bytes_per_band)
    out = banded.banded_norm_swish_conv3x3(norm, conv, x)
    assert out.shape == (2, 5, 11, 13) and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, reference(norm, conv, x)) < 1e-5


@torch.no_grad()
def test_group_statistics_match_group_norm():
    norm = torch.nn.GroupNorm(4, 8, affine=False)
    x = torch.randn(3, 8, 7, 9).contiguous(memory_format=torch.channels_last) * 5 - 2
    scale, shift = banded.group_norm_affine(norm, x)
    expected = F.group_norm(x.double(), 4, eps=norm.eps)
    assert relative_error(x * scale[:, :, None, None] + shift[:, :, None, None], expected) < 1e-5


def test_bands_only_for_large_maps_in_inference(monkeypatch):
    norm, conv = GroupNorm32(4, 8), FastConv2d(8, 8, 3, padding=1)
    small = torch.randn(1, 8, 16, 16).contiguous(memory_format=torch.channels_last)
    large = torch.randn(1, 8, 64, 64).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", small.numel() * small.element_size())
    with torch.no_grad():
        assert banded._bandable(norm, conv, large, None) and not banded._bandable(norm, conv, small, None)
        assert not banded._bandable(norm, conv, large.contiguous(), None)
        assert not banded._bandable(norm, FastConv2d(8, 8, 1), large, None)
        assert not banded._bandable(norm, conv, large, torch.nn.Dropout(0.5).train())
    assert not banded._bandable(norm, conv, large, None)  # autograd records: the plain layers


def test_resnet_block_in_bands_equals_the_recorded_forward(monkeypatch):
    """Inference (bands, residual sum in place) and training-style forward agree, and gradients still flow."""
    block = FastResnetBlock(in_channels=32, out_channels=64, temb_channels=0).eval()
    x = torch.randn(1, 32, 24, 20).contiguous(memory_format=torch.channels_last)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 32 * 20 * 4 * 5)  # bands of five rows, then of two
    recorded = block(x.requires_grad_(True))
    recorded.square().sum().backward()
    assert x.grad is not None and block.conv1.weight.grad is not None
    with torch.no_grad():
        banded_out = block(x)
    assert relative_error(banded_out, recorded.detach().double()) < 1e-5


def test_the_decoder_hands_freed_memory_back_before_each_upsampling_in_inference(monkeypatch):
    from ldm.modules.diffusionmodules.model import Decoder

    chunks.release_freed_memory()  # runs (or does nothing) on this platform
    calls = []
    monkeypatch.setattr(chunks, "release_freed_memory", lambda: calls.append(True))
    decoder = accel.optimize(Decoder(ch=32, out_ch=3, ch_mult=(1, 1, 1), num_res_blocks=1, attn_resolutions=[],
                                     in_channels=3, resolution=16, z_channels=4).eval())
    z = torch.randn(1, 4, 4, 4)
    with torch.no_grad():
        decoder(z)
    assert len(calls) == 2  # two upsamplings
    calls.clear()
    decoder(z)  # training: autograd records, nothing to trim between levels
    assert calls == []
