"""The CPU fast paths compute what the plain layers compute, and the tiled VAE decode blends tiles without seams."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from ldm.models.tiled_decode import tile_layout, tiled_decode
from ldm import accel
from ldm.accel import attention, chunks, cpu, winograd
from ldm.accel import conv as fast_conv
from ldm.accel.attention import FastFeedForward
from tests.model_factory import random_tiny_model


requires_cpu_bf16 = pytest.mark.skipif(
    not cpu.cpu_has_bf16(), reason="this CPU has no bfloat16 instructions (AVX-512 BF16 or AMX) that oneDNN can use")


def relative_error(ours: torch.Tensor, reference: torch.Tensor) -> float:
    return ((ours.float() - reference.float()).norm() / reference.float().norm()).item()


def reference_conv(conv: torch.nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    return F.conv2d(x.double(), conv.weight.double(), conv.bias.double(), stride=conv.stride,
                    padding=conv.padding).float()


@torch.no_grad()
@pytest.mark.parametrize("weight_layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("stride", [1, 2])
def test_wide_conv_on_a_small_map_runs_as_one_gemm_with_the_same_result(monkeypatch, weight_layout, stride):
    gemm, used = fast_conv._gemm_conv3x3, []
    monkeypatch.setattr(fast_conv, "_gemm_conv3x3", lambda *args: used.append(args[3]) or gemm(*args))
    conv = fast_conv.FastConv2d(fast_conv.GEMM_CONV_MIN_CHANNELS, 8, 3, stride=stride, padding=1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=weight_layout)
    x = torch.randn(2, fast_conv.GEMM_CONV_MIN_CHANNELS, 5, 4).contiguous(memory_format=torch.channels_last)
    out = conv(x)
    assert used == [stride] and out.shape == reference_conv(conv, x).shape
    assert relative_error(out, reference_conv(conv, x)) < 1e-5


@torch.no_grad()
@requires_cpu_bf16
def test_wide_bf16_conv_on_a_small_map_runs_as_one_gemm(monkeypatch):
    gemm, used = fast_conv._gemm_conv3x3, []
    monkeypatch.setattr(fast_conv, "_gemm_conv3x3", lambda *args: used.append(args[0].dtype) or gemm(*args))
    conv = fast_conv.FastConv2d(fast_conv.GEMM_CONV_MIN_CHANNELS, 8, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, conv.in_channels, 4, 4).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = conv(x)
    assert used == [torch.bfloat16] and out.dtype == torch.bfloat16
    assert relative_error(out, reference_conv(conv, x)) < 1e-2


@torch.no_grad()
@pytest.mark.parametrize("side", [4, 64])  # below and above PHASE_CONV_MIN_PIXELS
def test_upsampled_conv_equals_nearest_upsampling_then_conv(side):
    conv = fast_conv.FastConv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, side, side + 2)
    reference = reference_conv(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))
    out = conv.upsampled(x)
    assert out.shape == reference.shape
    assert relative_error(out, reference) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("bf16_instructions,expected_path", [pytest.param(True, "gemm", marks=requires_cpu_bf16),
                                                             (False, "phases")])
def test_bf16_upsampling_of_a_mid_size_map_is_one_gemm_with_bf16_instructions_and_phases_without(
        monkeypatch, bf16_instructions, expected_path):
    used = []
    phase_conv, gemm = fast_conv._upsampled_conv3x3, fast_conv._upsampled_gemm_conv3x3
    if not bf16_instructions:
        monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)  # as on a CPU without them
    monkeypatch.setattr(fast_conv, "_upsampled_conv3x3", lambda *args: used.append("phases") or phase_conv(*args))
    monkeypatch.setattr(fast_conv, "_upsampled_gemm_conv3x3", lambda *args: used.append("gemm") or gemm(*args))
    conv = fast_conv.FastConv2d(6, 5, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(1, 6, 64, 65).to(torch.bfloat16)  # between PHASE_CONV_MIN_PIXELS and its bf16 threshold
    out = conv.upsampled(x)
    assert used == [expected_path] and out.dtype == torch.bfloat16 and out.shape == (1, 5, 128, 130)
    assert relative_error(out, reference_conv(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))) < 1e-2


@requires_cpu_bf16
@pytest.mark.parametrize("side", [3, 8])
def test_bf16_upsampling_gemm_follows_the_weight_and_stays_off_autograd(monkeypatch, side):
    builds, build = [], fast_conv.phase_matrix
    monkeypatch.setattr(fast_conv, "phase_matrix", lambda weight: builds.append(1) or build(weight))
    conv = fast_conv.FastConv2d(4, 3, 3, padding=1).to(torch.bfloat16)
    x = torch.randn(2, 4, side, side + 1).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)

    def error() -> float:
        with torch.no_grad():
            out = conv.upsampled(x)
        return relative_error(out, reference_conv(conv, F.interpolate(x, scale_factor=2.0, mode="nearest")))

    assert error() < 1e-2 and error() < 1e-2 and len(builds) == 1  # built once, then kept
    with torch.no_grad():
        conv.weight.mul_(-2)  # in place, as load_state_dict does
    assert error() < 1e-2
    conv.weight = torch.nn.Parameter(torch.randn_like(conv.weight))  # replaced, as load_state_dict(assign=True)
    assert error() < 1e-2
    conv.float().bfloat16()
    assert error() < 1e-2 and len(builds) == 4
    conv.weight.data = torch.randn_like(conv.weight)  # new data in the same parameter
    assert error() < 1e-2 and len(builds) == 5
    assert pickle.loads(pickle.dumps(conv)).upsampled(x).shape == copy.deepcopy(conv).upsampled(x).shape
    out = conv.upsampled(x)  # with gradients: the differentiable path
    out.float().sum().backward()
    assert conv.weight.grad is not None and conv.weight.grad.abs().sum() > 0


@torch.no_grad()
def test_upsampled_conv_in_bands_of_rows_equals_the_whole(monkeypatch):
    conv = fast_conv.FastConv2d(6, 5, 3, padding=1)
    x = torch.randn(2, 6, 33, 35).contiguous(memory_format=torch.channels_last)
    whole = fast_conv._upsampled_conv3x3(x, conv.weight, conv.bias)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 1)  # one input row per band
    banded = fast_conv._upsampled_conv3x3(x, conv.weight, conv.bias)
    assert torch.equal(banded, whole)
    assert relative_error(banded, reference_conv(conv, F.interpolate(x, scale_factor=2.0, mode="nearest"))) < 1e-5


@torch.no_grad()
@pytest.mark.parametrize("tile", winograd.TILE_SIZES)
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("images_per_chunk", [0, 2])  # 0: one row of tiles per chunk
@pytest.mark.parametrize("weight_layout", [torch.contiguous_format, torch.channels_last])
def test_winograd_conv_equals_the_direct_convolution(monkeypatch, tile, channels_last, images_per_chunk,
                                                     weight_layout):
    conv = fast_conv.FastConv2d(6, 5, 3, padding=1)
    conv.weight.data = conv.weight.data.contiguous(memory_format=weight_layout)
    x = torch.randn(3, 6, 11, 14)  # sides that are not multiples of the tile; the last chunk of images is short
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    tile_rows = -(-x.shape[2] // tile)
    monkeypatch.setattr(chunks, "rows_per_chunk", lambda bytes_per_row: max(1, images_per_chunk * tile_rows))
    for bias in (conv.bias, None):
        reference = F.conv2d(x.double(), conv.weight.double(), None if bias is None else bias.double(), padding=1)
        out = winograd.winograd_conv3x3(x, conv.weight, bias, tile)
        assert out.shape == reference.shape
        assert relative_error(out, reference) < 1e-5


@pytest.mark.parametrize("out_channels,widest,widths", [
    (1280, 204, [160] * 8),  # the widest multiple of 16 that divides the channels
    (320, 121, [80] * 4),
    (100, 30, [25] * 4),  # no multiple of 16 divides them: an even split
    (12, 5, [4] * 3),
    (7, 7, [7])])
def test_winograd_output_blocks_are_even_and_within_the_budget(monkeypatch, out_channels, widest, widths):
    monkeypatch.setattr(chunks, "CHUNK_BYTES", widest * 1000)
    blocks = winograd._output_blocks(out_channels, 1000)
    assert [block.stop - block.start for block in blocks] == widths
    assert blocks[0].start == 0 and blocks[-1].stop == out_channels
    assert all(a.stop == b.start for a, b in zip(blocks, blocks[1:]))


@torch.no_grad()
@pytest.mark.parametrize("out_channels,chunk_bytes,kernel_blocks,tile_chunks", [
    (48, 1 << 30, 1, 1),  # everything in one piece
    (48, 86400, 6, 1),  # kernels by blocks of output channels, all 75 tiles in one chunk
    (80, 28800, 10, 3),  # a chunk of tiles per image, each multiplied by every block of kernels
    (48, 28800, 1, 15)])  # kept, the transformed tiles would outgrow the kernels: kernels transformed whole
def test_winograd_in_blocks_of_output_channels_equals_the_direct_convolution(monkeypatch, out_channels, chunk_bytes,
                                                                            kernel_blocks, tile_chunks):
    calls = {"kernels": 0, "chunks": 0}
    transform_kernel, transformed_tiles = winograd.transform_kernel, winograd._transformed_tiles

    def counted(name, fn):
        return lambda *args: calls.__setitem__(name, calls[name] + 1) or fn(*args)

    monkeypatch.setattr(winograd, "transform_kernel", counted("kernels", transform_kernel))
    monkeypatch.setattr(winograd, "_transformed_tiles", counted("chunks", transformed_tiles))
    monkeypatch.setattr(chunks, "CHUNK_BYTES", chunk_bytes)
    weight, bias = torch.randn(out_channels, 8, 3, 3), torch.randn(out_channels)
    x = torch.randn(3, 8, 18, 19)  # 3 x 5 x 5 tiles of 4 x 4
    out = winograd.winograd_conv3x3(x, weight, bias, tile=4)
    assert relative_error(out, F.conv2d(x.double(), weight.double(), bias.double(), padding=1)) < 1e-5
    assert calls == {"kernels": kernel_blocks, "chunks": tile_chunks}


@torch.no_grad()
@pytest.mark.parametrize("in_channels", [fast_conv.WINOGRAD_MIN_IN_CHANNELS, fast_conv.GEMM_CONV_MIN_CHANNELS])
@pytest.mark.parametrize("side,tile", [(16, 2), (32, 4)])
def test_wide_conv_on_a_large_map_runs_by_winograd(monkeypatch, in_channels, side, tile):
    used = []

    def recording(x, weight, bias, tile):
        used.append(tile)
        return winograd.winograd_conv3x3(x, weight, bias, tile)

    monkeypatch.setattr(fast_conv, "winograd_conv3x3", recording)
    conv = fast_conv.FastConv2d(in_channels, fast_conv.WINOGRAD_MIN_OUT_CHANNELS, 3, padding=1)
    x = torch.randn(1, conv.in_channels, side, side).contiguous(memory_format=torch.channels_last)
    assert relative_error(conv(x), reference_conv(conv, x)) < 1e-5
    assert used == [tile]
    fast_conv.FastConv2d(conv.in_channels, 3, 3, padding=1)(x)  # too few output channels to gain: the direct kernel
    assert used == [tile]
    with torch.enable_grad():  # training: autograd through the direct kernel
        x.requires_grad_(True)
        conv(x).sum().backward()
    assert used == [tile] and x.grad is not None


@pytest.mark.parametrize("glu", [True, False])
def test_feed_forward_in_token_chunks_equals_the_whole(monkeypatch, glu):
    feed_forward = FastFeedForward(8, glu=glu)
    x = torch.randn(2, 13, 8, requires_grad=True)
    expected = feed_forward(x)
    (expected_grad,) = torch.autograd.grad(expected.square().sum(), x)
    calls = []
    feed_forward.net.register_forward_hook(lambda module, inputs, output: calls.append(inputs[0].shape[0]))
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 5 * feed_forward.widest * x.element_size())
    out = feed_forward(x)
    (grad,) = torch.autograd.grad(out.square().sum(), x)
    assert calls == [5, 5, 5, 5, 5, 1]  # 26 tokens, at most 5 at a time
    assert out.shape == expected.shape
    assert relative_error(out, expected) < 1e-6 and relative_error(grad, expected_grad) < 1e-6


@torch.no_grad()
@pytest.mark.parametrize("keys,padded_width", [(64, 48), (16, 40)])
def test_fp32_attention_over_many_keys_pads_heads_with_the_same_result(monkeypatch, keys, padded_width):
    monkeypatch.setattr(attention, "HEAD_PADDING_MIN_KEYS", 64)
    sdpa, widths = F.scaled_dot_product_attention, []
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda q, *args, **kw: widths.append(q.shape[-1])
                        or sdpa(q, *args, **kw))
    q, k, v = torch.randn(2, 70, 8 * 40), torch.randn(2, keys, 8 * 40), torch.randn(2, keys, 8 * 40)
    out = attention.multi_head_attention(q, k, v, heads=8)
    heads = [t.unflatten(-1, (8, 40)).transpose(1, 2) for t in (q, k, v)]
    reference = sdpa(*heads).transpose(1, 2).reshape(2, 70, -1)
    assert widths == [padded_width] and relative_error(out, reference) < 1e-6


@torch.no_grad()
@pytest.mark.skipif(cpu.onednn_linear_primitive() is None, reason="this torch build has no oneDNN linear primitive")
@requires_cpu_bf16
def test_bf16_linear_and_1x1_conv_go_through_onednn_with_the_same_result(monkeypatch):
    onednn_linear, calls = cpu.onednn_linear_primitive(), []
    spy = lambda *args: calls.append(args[0].shape) or onednn_linear(*args)  # noqa: E731
    monkeypatch.setattr(cpu, "onednn_linear_primitive", lambda: spy)
    linear = fast_conv.FastLinear(64, 48).to(torch.bfloat16)
    x = torch.randn(2, 5, 64).to(torch.bfloat16)
    out = linear(x)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, F.linear(x.double(), linear.weight.double(), linear.bias.double())) < 4e-3
    conv = fast_conv.FastConv2d(64, 48, 1).to(torch.bfloat16)
    image = torch.randn(2, 64, 3, 5).to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
    out = conv(image)
    assert out.shape == (2, 48, 3, 5) and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out, reference_conv(conv, image)) < 4e-3
    assert calls == [x.shape, (2, 3, 5, 64)]


@requires_cpu_bf16
def test_bf16_linear_with_gradients_stays_on_autograd(monkeypatch):
    monkeypatch.setattr(cpu, "onednn_linear_primitive", lambda: pytest.fail("oneDNN's linear has no backward"))
    linear = fast_conv.FastLinear(16, 8).to(torch.bfloat16)
    linear(torch.randn(3, 16).to(torch.bfloat16)).float().sum().backward()
    assert linear.weight.grad is not None and linear.weight.grad.dtype == torch.bfloat16


@torch.no_grad()
def test_bf16_group_norm_on_the_cpu_equals_float32_rounded_to_bf16():
    norm = fast_conv.FastGroupNorm32(4, 16).to(torch.bfloat16)
    torch.nn.init.normal_(norm.weight, 1.0, 0.3)
    x = (torch.randn(2, 16, 12, 12) * 3 + 1).to(torch.bfloat16)
    out = norm(x)
    expected = F.group_norm(x.float(), 4, norm.weight.float(), norm.bias.float(), norm.eps).to(torch.bfloat16)
    assert out.dtype == torch.bfloat16
    assert torch.allclose(out.float(), expected.float(), rtol=2 ** -7, atol=2 ** -7)  # within bf16 rounding


@torch.no_grad()
def test_bf16_on_a_cpu_without_bf16_runs_in_fp32_and_returns_bf16(monkeypatch):
    monkeypatch.setattr(cpu, "cpu_has_bf16", lambda: False)
    conv, linear = fast_conv.FastConv2d(4, 4, 3, padding=1), fast_conv.FastLinear(4, 3)
    x = torch.randn(1, 4, 8, 8)
    for layer, inputs in ((conv, x), (linear, x.flatten(2).transpose(1, 2))):
        expected = layer(inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = layer(inputs)
        assert out.dtype == torch.bfloat16
        assert relative_error(out, expected) < 1e-2
        out = layer.to(torch.bfloat16)(inputs.bfloat16())
        assert out.dtype == torch.bfloat16 and relative_error(out, expected) < 2e-2
        layer.float()


def test_tiles_cover_the_latent_with_the_overlap():
    assert tile_layout(48, 64, 16) == ([0], 48)
    # A 1024-pixel image: three tiles of 54 latent pixels per side, not three of 64 (or a thin last one).
    assert tile_layout(128, 64, 16) == ([0, 37, 74], 54)
    for length in range(17, 300):
        for tile, overlap in ((64, 16), (32, 8), (16, 4), (24, 23)):
            starts, size = tile_layout(length, tile, overlap)
            assert size <= tile and starts[0] == 0 and starts[-1] + size == length
            assert all(overlap <= a + size - b for a, b in zip(starts, starts[1:]))
            # The fewest tiles: one fewer could not cover the length with this overlap.
            assert len(starts) == 1 or (len(starts) - 1) * (tile - overlap) + overlap < length


def test_blending_of_a_local_decoder_is_exact():
    """A decoder without global operations (1x1 convolution, 8x upsampling) is tiled without any error, so the
    cross-fade weights sum to one everywhere and every tile lands where it belongs."""
    weight = torch.randn(3, 4, 1, 1)

    def decode(z):
        return F.interpolate(F.conv2d(z, weight), scale_factor=8.0, mode="nearest")

    z = torch.randn(2, 4, 40, 56)
    assert relative_error(tiled_decode(decode, z, tile_size=16, overlap=6), decode(z)) < 1e-6


@pytest.fixture(scope="module")
def autoencoder():
    return random_tiny_model(seed=4).first_stage_model


@torch.no_grad()
def test_tiled_decode_of_the_autoencoder(autoencoder):
    z = torch.randn(1, 4, 48, 48, generator=torch.Generator().manual_seed(0))
    plain = autoencoder.decode(z)
    autoencoder.enable_tiling(tile_size=48, overlap=16)
    try:
        assert torch.equal(autoencoder.decode(z), plain)  # one tile: the plain decode
        autoencoder.enable_tiling(tile_size=24, overlap=8)
        tiled = autoencoder.decode(z)
    finally:
        autoencoder.disable_tiling()
    assert tiled.shape == plain.shape
    # Each tile normalises (GroupNorm) and attends over itself only, as in diffusers' tiled VAE: with random
    # weights that moves the image by ~15% (relative L2); trained weights on a natural image move it far less.
    assert relative_error(tiled, plain) < 0.3
    # No seams: across the tile borders the image changes from column to column (and row to row) about as much
    # as the plain decode does; a seam would show as a spike at a border.
    for dim in (-1, -2):
        steps_tiled = tiled.diff(dim=dim).abs().mean(dim=tuple(d for d in range(4) if d != dim % 4))
        steps_plain = plain.diff(dim=dim).abs().mean(dim=tuple(d for d in range(4) if d != dim % 4))
        assert (steps_tiled / steps_plain).max() < 1.3


@torch.no_grad()
def test_tiled_decode_runs_at_a_size(autoencoder):
    autoencoder.enable_tiling(tile_size=32, overlap=8)
    try:
        image = autoencoder.decode(torch.randn(1, 4, 96, 80))
    finally:
        autoencoder.disable_tiling()
    assert image.shape == (1, 3, 768, 640)
    assert torch.isfinite(image).all()


@pytest.mark.parametrize("guided_pair,grad", [(True, False), (False, False), (True, True)])
def test_a_guided_step_runs_the_layers_before_cross_attention_once_with_the_same_result(guided_pair, grad):
    """The caller marks a guided step (the same latents and timesteps under two contexts); the accelerated UNet
    then runs the layers before the first cross-attention at half the batch, where autograd records nothing."""
    unet = accel.optimize(random_tiny_model()).model.diffusion_model
    generator = torch.Generator().manual_seed(3)
    latents = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 700])
    context = torch.randn(4, 5, 32, generator=generator)  # [unconditional, conditional]
    batches = []
    unet.input_blocks[0].register_forward_hook(lambda module, inputs, output: batches.append(inputs[0].shape[0]))
    with torch.set_grad_enabled(grad):
        out = unet(torch.cat([latents, latents]), torch.cat([t, t]), context=context, guided_pair=guided_pair)
    with torch.no_grad():
        reference = torch.cat([unet(latents, t, context=context[:2]), unet(latents, t, context=context[2:])])
    assert batches[0] == (2 if guided_pair and not grad else 4)
    assert out.shape == reference.shape and relative_error(out, reference) < 1e-5
