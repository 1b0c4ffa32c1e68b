"""ldm.accel: one call swaps in the fast layers, the switch turns it off, and the accelerated model computes what
the plain model and diffusers compute on inputs that reach every fast path, in float32 and bfloat16."""
from __future__ import annotations

import copy
import pickle

import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf

from ldm import accel
from ldm.accel import attention, banded, chunks, conv, cpu
from ldm.models.diffusion.ddim import DDIMSampler
from tests.model_factory import random_tiny_model, tiny_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")

BF16_TOLERANCE = 3e-2  # bfloat16 keeps 8 bits of mantissa: a UNet or decoder output within 3 % of float32's


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.float() - theirs.float()).norm() / theirs.float().norm()).item()


def wide_config():
    """The tiny test model, wide enough (64 and 128 channels, heads of 8) that the fast paths apply once their
    size thresholds are lowered (`low_thresholds`)."""
    config = tiny_config()
    unet = config.model.params.unet_config.params
    unet.model_channels, unet.num_heads = 64, 8
    return config


@pytest.fixture
def low_thresholds(monkeypatch):
    """The thresholds that pick a fast path, lowered to the wide test model's sizes: every path runs on a 16x16
    latent (Winograd F(4x4) at 16x16 and F(2x2) at 8x8, the GEMM convolution for the stride-2 downsampling, the
    fused upsampling, padded heads, chunked feed-forward, banded decoding). Returns the paths taken."""
    taken: set[str] = set()
    for name, value in (("WINOGRAD_MIN_IN_CHANNELS", 64), ("WINOGRAD_MIN_OUT_CHANNELS", 64),
                        ("WINOGRAD_F4_MIN_PIXELS", 16 * 16), ("WINOGRAD_F2_MIN_PIXELS", 8 * 8),
                        ("GEMM_CONV_MIN_CHANNELS", 64), ("GEMM_CONV_MAX_PIXELS", 16 * 16),
                        ("PHASE_CONV_MIN_PIXELS", 8 * 8)):
        monkeypatch.setattr(conv, name, value)
    monkeypatch.setattr(attention, "HEAD_PADDING_MIN_KEYS", 64)
    monkeypatch.setattr(chunks, "CHUNK_BYTES", 64 << 10)

    def spy(module, name, label):
        original = getattr(module, name)

        def recorded(*args, **kwargs):
            taken.add(label(*args, **kwargs) if callable(label) else label)
            return original(*args, **kwargs)

        monkeypatch.setattr(module, name, recorded)

    spy(conv, "winograd_conv3x3", lambda x, weight, bias, tile: f"winograd F({tile}x{tile})")
    spy(conv, "_gemm_conv3x3", "gemm conv")
    spy(conv, "_upsampled_conv3x3", "upsampling by phases")
    spy(conv, "_upsampled_gemm_conv3x3", "upsampling gemm")
    spy(banded, "banded_norm_swish_conv3x3", "banded decoding")
    spy(cpu, "onednn_linear_primitive", "onednn linear")
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(attention.F, "scaled_dot_product_attention", lambda *args, **kwargs: (
        taken.add("padded heads") if "scale" in kwargs else None) or sdpa(*args, **kwargs))
    return taken


@pytest.fixture(scope="module")
def models():
    """(plain, accelerated) copies of one wide random model, and diffusers' UNet and VAE of the same weights."""
    plain = random_tiny_model(seed=5, config=wide_config())
    fast = accel.optimize(copy.deepcopy(plain))
    original = OmegaConf.to_container(wide_config(), resolve=True)
    state = plain.state_dict()
    unet_config = single_file.create_unet_diffusers_config_from_ldm(original, state, image_size=16)
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = single_file.create_vae_diffusers_config_from_ldm(original, state, image_size=128)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    return plain, fast, unet.eval(), vae.eval()


def guided_inputs(batch: int = 2, side: int = 16) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(11)
    latents = torch.randn(batch, 4, side, side, generator=generator)
    t = torch.full((batch,), 601)
    context = torch.randn(2 * batch, 77, 32, generator=generator)  # [unconditional, conditional]
    return torch.cat([latents, latents]), torch.cat([t, t]), context


def test_optimize_swaps_classes_and_keeps_every_weight(models):
    plain, fast, _, _ = models
    assert accel.is_optimized(fast) and not accel.is_optimized(plain)
    assert type(fast.model.diffusion_model) is accel.FastUNetModel
    assert type(fast.first_stage_model.quant_conv) is torch.nn.Conv2d  # outside the networks: left alone
    assert list(fast.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(fast.state_dict().values(), plain.state_dict().values()))
    again = pickle.loads(pickle.dumps(fast))
    assert accel.is_optimized(again) and not accel.is_optimized(accel.restore(copy.deepcopy(fast)))
    with pytest.raises(ValueError, match="inference"):
        accel.optimize(copy.deepcopy(plain).train())


def test_the_switch_and_other_devices_leave_the_model_plain(models, monkeypatch):
    plain = copy.deepcopy(models[0])
    assert not accel.is_optimized(accel.optimize(plain, "cuda"))
    monkeypatch.setenv("LDM_ACCEL", "0")
    assert not accel.is_optimized(accel.optimize(plain))
    monkeypatch.setenv("LDM_ACCEL", "1")
    assert accel.is_optimized(accel.optimize(plain))


@torch.no_grad()
def test_fp32_accelerated_unet_and_decoder_match_plain_and_diffusers_on_every_path(models, low_thresholds):
    plain, fast, unet, vae = models
    x, t, context = guided_inputs()
    expected = plain.apply_model(x, t, context)
    out = fast.apply_model(x, t, context, guided_pair=True)
    assert relative_error(out, expected) < 1e-5
    assert relative_error(out, unet(x, t, encoder_hidden_states=context).sample) < 1e-4
    small = guided_inputs(side=8)  # level 1 at 4x4: the wide convolutions below Winograd's threshold
    assert relative_error(fast.apply_model(*small, guided_pair=True), plain.apply_model(*small)) < 1e-5
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    decoded = fast.first_stage_model.decode(z)
    assert relative_error(decoded, plain.first_stage_model.decode(z)) < 1e-5
    assert relative_error(decoded, vae.decode(z).sample) < 1e-4
    assert {"winograd F(4x4)", "winograd F(2x2)", "gemm conv", "upsampling by phases", "padded heads",
            "banded decoding"} <= low_thresholds


@torch.no_grad()
def test_bf16_accelerated_model_is_within_bf16_rounding_of_float32(models, low_thresholds):
    plain, fast, _, _ = models
    x, t, context = guided_inputs()
    expected = plain.apply_model(x, t, context)
    z = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(12))
    decoded = plain.first_stage_model.decode(z)
    fast_bf16 = accel.optimize(copy.deepcopy(plain).to(torch.bfloat16))
    plain_bf16 = copy.deepcopy(plain).to(torch.bfloat16)
    out = fast_bf16.apply_model(x.bfloat16(), t, context.bfloat16(), guided_pair=True)
    assert out.dtype == torch.bfloat16
    assert relative_error(out, expected) < BF16_TOLERANCE
    assert relative_error(plain_bf16.apply_model(x.bfloat16(), t, context.bfloat16()), expected) < BF16_TOLERANCE
    assert relative_error(fast_bf16.first_stage_model.decode(z.bfloat16()), decoded) < BF16_TOLERANCE
    if cpu.cpu_has_bf16():
        assert {"gemm conv", "upsampling gemm", "onednn linear"} <= low_thresholds


@torch.no_grad()
def test_weights_changed_in_place_reach_the_fast_paths(models, low_thresholds):
    """A LoRA merge or an edit changes the weights in place, `load_state_dict` copies into them: the cached
    transformed weights (the bf16 upsampling matrix) follow."""
    plain = copy.deepcopy(models[0]).to(torch.bfloat16)
    fast = accel.optimize(copy.deepcopy(plain))
    x, t, context = (value.bfloat16() if value.is_floating_point() else value for value in guided_inputs())
    fast.apply_model(x, t, context, guided_pair=True)  # builds the caches
    for model in (plain, fast):
        for parameter in model.model.diffusion_model.output_blocks.parameters():
            parameter.mul_(-0.5)
    assert relative_error(fast.apply_model(x, t, context), plain.apply_model(x, t, context)) < BF16_TOLERANCE
    state = {key: value * 1.5 for key, value in plain.state_dict().items()}
    plain.load_state_dict(state)
    fast.load_state_dict(state)
    assert relative_error(fast.apply_model(x, t, context), plain.apply_model(x, t, context)) < BF16_TOLERANCE


@torch.no_grad()
def test_guided_sampling_marks_its_steps_as_guided_pairs(models):
    fast = models[1]
    flags = []
    hook = fast.model.diffusion_model.register_forward_pre_hook(
        lambda module, args, kwargs: flags.append(kwargs.get("guided_pair")), with_kwargs=True)
    try:
        c = torch.randn(1, 77, 32)
        DDIMSampler(fast).sample(2, 1, (4, 8, 8), c, unconditional_guidance_scale=5.0,
                                 unconditional_conditioning=torch.zeros_like(c), verbose=False)
        DDIMSampler(fast).sample(2, 1, (4, 8, 8), c, verbose=False)
    finally:
        hook.remove()
    assert flags == [True, True, False, False]
