"""The LDM inpainting model (Rombach et al. 2022, sec. 4.5; the original's models/ldm/inpainting_big) and the
original scripts/inpaint.py --indir mode: the VQ first stage (van den Oord et al. 2017; Esser et al. 2021),
ADM's self-attention block, the original's state-dict layout, and run_indir on tiny random weights."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from PIL import Image

from ldm import accel
from ldm.cli import inpaint_indir
from ldm.cli.inpaint_indir import find_pairs, run_indir
from ldm.errors import UserInputError
from ldm.models.autoencoder import VQModelInterface
from ldm.modules.diffusionmodules.openaimodel import AttentionBlock, QKVAttention, QKVAttentionLegacy
from ldm.modules.vqvae.quantize import VectorQuantizer2
from tests.model_factory import REPO_DIR, TESTS_DIR, random_tiny_model

TINY_CONFIG = TESTS_DIR / "configs" / "tiny-ldm-inpainting.yaml"
FULL_CONFIG = REPO_DIR / "models" / "ldm" / "inpainting_big" / "config.yaml"
SIZE = 16


@pytest.fixture(scope="module")
def model() -> torch.nn.Module:
    tiny = random_tiny_model(0, OmegaConf.load(TINY_CONFIG))
    tiny.model_ema = type(tiny.model_ema)(tiny.model)  # EMA of the random weights, not of the zero-initialised ones
    return tiny


@pytest.fixture(scope="module")
def checkpoint(model: torch.nn.Module, tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("ckpt") / "last.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    return path


# --- the model's layout ---------------------------------------------------------------------------------------


def test_full_config_builds_the_original_layout() -> None:
    """The original config builds (on meta, no weights) with the original's module names and widths."""
    from ldm.checkpoint import no_weight_init
    from ldm.util import instantiate_from_config

    with no_weight_init():
        full = instantiate_from_config(OmegaConf.load(FULL_CONFIG).model)
    shapes = {key: tuple(value.shape) for key, value in full.state_dict().items()}
    assert shapes["first_stage_model.quantize.embedding.weight"] == (8192, 3)
    assert shapes["first_stage_model.quant_conv.weight"] == (3, 3, 1, 1)
    assert shapes["first_stage_model.post_quant_conv.weight"] == (3, 3, 1, 1)
    assert shapes["first_stage_model.encoder.conv_out.weight"] == (3, 512, 3, 3)  # double_z false: z_channels
    assert shapes["model.diffusion_model.input_blocks.0.0.weight"] == (256, 7, 3, 3)
    assert shapes["model.diffusion_model.out.2.weight"] == (3, 256, 3, 3)
    assert shapes["model.diffusion_model.middle_block.1.qkv.weight"] == (3 * 1024, 1024, 1)
    assert not any(".attn_1." in key for key in shapes)  # attn_type: none
    unet = full.model.diffusion_model
    heads = {type(block.attention) for block in unet.modules() if isinstance(block, AttentionBlock)}
    assert heads == {QKVAttentionLegacy}
    assert {block.num_heads for block in unet.modules() if isinstance(block, AttentionBlock)} == {8}
    assert full.model.conditioning_key == "concat" and full.cond_stage_model is full.first_stage_model
    unet_params = sum(math.prod(shape) for key, shape in shapes.items() if key.startswith("model.diffusion_model."))
    assert round(unet_params / 1e6, 1) == 387.2


def test_state_dict_keys_follow_the_original(model: torch.nn.Module) -> None:
    """torch lists a shared submodule under each of its names: with `__is_first_stage__` the original's state dict
    has every first-stage tensor twice, as first_stage_model.* and cond_stage_model.*; so does ours."""
    state = model.state_dict()
    first = {key[len("first_stage_model."):] for key in state if key.startswith("first_stage_model.")}
    cond = {key[len("cond_stage_model."):] for key in state if key.startswith("cond_stage_model.")}
    assert first == cond
    assert {"quantize.embedding.weight", "quant_conv.weight", "quant_conv.bias", "post_quant_conv.weight",
            "post_quant_conv.bias", "encoder.conv_in.weight", "decoder.conv_out.weight"} <= first
    assert not any(key.startswith(("loss.", "quantize.used")) for key in first)  # DummyLoss; no remap buffer
    assert {key.split(".")[0] for key in state} >= {"model", "model_ema", "first_stage_model", "cond_stage_model",
                                                    "betas"}
    attention = {key for key in state if key.startswith("model.diffusion_model.middle_block.1.")}
    assert attention == {f"model.diffusion_model.middle_block.1.{name}.{kind}" for name in ("norm", "qkv", "proj_out")
                         for kind in ("weight", "bias")}


# --- the VQ first stage -----------------------------------------------------------------------------------------


def test_quantizer_picks_the_nearest_codebook_entry() -> None:
    torch.manual_seed(0)
    quantizer = VectorQuantizer2(n_e=12, e_dim=3, beta=0.25)
    with torch.no_grad():
        quantizer.embedding.weight.normal_()
    z = torch.randn(2, 3, 5, 4, requires_grad=True)
    z_q, loss, (_, _, indices) = quantizer(z)

    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 3)
    codebook = quantizer.embedding.weight.detach()
    expected = ((rows[:, None, :] - codebook[None]) ** 2).sum(-1).argmin(1)
    assert torch.equal(indices, expected)
    nearest = codebook[expected].reshape(2, 5, 4, 3).permute(0, 3, 1, 2)
    torch.testing.assert_close(z_q, nearest)
    torch.testing.assert_close(loss, 1.25 * ((nearest - z.detach()) ** 2).mean())
    z_q.sum().backward()  # straight-through: the gradient reaches z unchanged
    torch.testing.assert_close(z.grad, torch.ones_like(z))
    torch.testing.assert_close(quantizer.get_codebook_entry(indices, shape=(2, 5, 4, 3)), nearest)

    sane = VectorQuantizer2(12, 3, 0.25, sane_index_shape=True)
    sane.load_state_dict(quantizer.state_dict())
    assert sane(z)[2][2].shape == (2, 5, 4)


@pytest.mark.parametrize("legacy", [True, False])
def test_quantizer_beta_weights_the_terms_as_the_original(legacy: bool) -> None:
    """legacy=True (the original's default) puts beta on the codebook term, legacy=False on the commitment term."""
    torch.manual_seed(1)
    quantizer = VectorQuantizer2(n_e=8, e_dim=2, beta=0.25, legacy=legacy)
    z = torch.randn(1, 2, 3, 3, requires_grad=True)
    _, loss, (_, _, indices) = quantizer(z)
    loss.backward()
    e = quantizer.embedding.weight.detach()[indices].reshape(1, 3, 3, 2).permute(0, 3, 1, 2)
    n = z.numel()
    z_weight, codebook_weight = (1.0, 0.25) if legacy else (0.25, 1.0)
    torch.testing.assert_close(z.grad, z_weight * 2 * (z.detach() - e) / n)
    used = quantizer.embedding.weight.grad.abs().sum(1) > 0
    assert used.sum() == indices.unique().numel()
    code = indices[0]
    rows = z.detach().permute(0, 2, 3, 1).reshape(-1, 2)[indices == code]
    expected = codebook_weight * 2 * (e.permute(0, 2, 3, 1).reshape(-1, 2)[indices == code] - rows).sum(0) / n
    torch.testing.assert_close(quantizer.embedding.weight.grad[code], expected)


def test_quantizer_refuses_remap() -> None:
    with pytest.raises(ValueError, match="remap"):
        VectorQuantizer2(8, 2, 0.25, remap="used_codes.npy")


def test_vq_interface_encodes_before_and_decodes_after_the_codebook(model: torch.nn.Module) -> None:
    first_stage = model.first_stage_model
    assert isinstance(first_stage, VQModelInterface)
    x = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        h = first_stage.encode(x)
        torch.testing.assert_close(h, first_stage.quant_conv(first_stage.encoder(x)))
        quantized = first_stage.quantize(h)[0]
        assert not torch.allclose(h, quantized)
        expected = first_stage.decoder(first_stage.post_quant_conv(quantized))
        torch.testing.assert_close(first_stage.decode(h), expected)
        plain = first_stage.decoder(first_stage.post_quant_conv(h))
        torch.testing.assert_close(first_stage.decode(h, force_not_quantize=True), plain)
        # LatentDiffusion (scale_factor 1): the conditioning is the pre-codebook latent; decoding quantises
        torch.testing.assert_close(model.get_learned_conditioning(x), h)
        torch.testing.assert_close(model.get_first_stage_encoding(model.encode_first_stage(x)), h)
        torch.testing.assert_close(model.decode_first_stage(h), expected)
        torch.testing.assert_close(model.decode_first_stage(h, force_not_quantize=True), plain)
    with pytest.raises(ValueError, match="predict_cids"):
        model.decode_first_stage(h, predict_cids=True)


# --- ADM's self-attention ---------------------------------------------------------------------------------------


def _reference_attention(qkv: torch.Tensor, heads: int, legacy: bool) -> torch.Tensor:
    """softmax(q^T k / sqrt(ch)) v per head, with q, k, v cut from qkv in the legacy or the new order."""
    batch, width, length = qkv.shape
    ch = width // (3 * heads)
    if legacy:
        parts = qkv.reshape(batch, heads, 3, ch, length).unbind(2)
    else:
        parts = qkv.reshape(batch, 3, heads, ch, length).unbind(1)
    q, k, v = parts
    weights = torch.softmax(torch.einsum("bhct,bhcs->bhts", q, k) / math.sqrt(ch), dim=-1)
    return torch.einsum("bhts,bhcs->bhct", weights, v).reshape(batch, heads * ch, length)


@pytest.mark.parametrize("legacy", [True, False])
def test_attention_block_matches_a_direct_computation(legacy: bool) -> None:
    torch.manual_seed(2)
    block = AttentionBlock(64, num_heads=4, use_new_attention_order=not legacy)
    with torch.no_grad():
        for param in block.parameters():
            param.add_(torch.randn_like(param) * 0.1)
    assert isinstance(block.attention, QKVAttentionLegacy if legacy else QKVAttention)
    x = torch.randn(2, 64, 4, 3)
    with torch.no_grad():
        flat = x.reshape(2, 64, -1)
        qkv = block.qkv(block.norm(flat))
        expected = (flat + block.proj_out(_reference_attention(qkv, 4, legacy))).reshape(x.shape)
        torch.testing.assert_close(block(x), expected, atol=1e-5, rtol=1e-5)
    assert AttentionBlock(64, num_heads=4, num_head_channels=16).num_heads == 4


def test_unet_heads_follow_the_original_rules() -> None:
    from ldm.modules.diffusionmodules.openaimodel import UNetModel

    def heads(**kwargs) -> list[int]:
        unet = UNetModel(image_size=8, in_channels=3, out_channels=3, model_channels=32, num_res_blocks=1,
                         attention_resolutions=[1], channel_mult=[1, 2], **kwargs)
        return [m.num_heads for m in unet.modules() if isinstance(m, AttentionBlock)]

    # input level 1 (32 ch), middle (64 ch), output level 1 x2 (32 ch): num_heads_upsample in the output blocks
    assert heads(num_heads=4, num_heads_upsample=2) == [4, 4, 2, 2]
    assert heads(num_heads=-1, num_head_channels=16) == [2, 4, 2, 2]
    with pytest.raises(ValueError, match="use_spatial_transformer"):
        heads(num_heads=4, context_dim=32)


def test_accelerated_layers_give_the_plain_result(model: torch.nn.Module) -> None:
    torch.manual_seed(3)
    x, c = torch.randn(1, 3, 4, 4), torch.randn(1, 4, 4, 4)
    image = torch.rand(1, 3, SIZE, SIZE) * 2 - 1
    with torch.no_grad():
        plain = model.apply_model(x, torch.tensor([500]), c), model.cond_stage_model.encode(image)
        accel.optimize(model)
        try:
            fast = model.apply_model(x, torch.tensor([500]), c), model.cond_stage_model.encode(image)
        finally:
            accel.restore(model)
    for a, b in zip(plain, fast):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


# --- run_indir ---------------------------------------------------------------------------------------------------


def _write_pair(directory: Path, name: str, seed: int, size: tuple[int, int] = (SIZE, SIZE),
                mask_size: tuple[int, int] | None = None) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    image = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    mask_w, mask_h = mask_size or size
    mask = np.zeros((mask_h, mask_w), dtype=np.uint8)
    mask[2 + seed:9 + seed, 4:12] = 200  # above half: repainted; 100 elsewhere in the block stays
    mask[0, :] = 100
    Image.fromarray(image).save(directory / f"{name}.png")
    Image.fromarray(mask).save(directory / f"{name}_mask.png")
    return image, mask


def _original_script_result(model: torch.nn.Module, image: np.ndarray, mask: np.ndarray, steps: int,
                            seed: int) -> np.ndarray:
    """The original script's arithmetic, step by step, with the run's generator."""
    from ldm.models.diffusion.ddim import DDIMSampler

    pixels = torch.from_numpy(image.astype(np.float32)[None].transpose(0, 3, 1, 2) / 255.0)
    m = torch.from_numpy((mask.astype(np.float32) / 255.0)[None, None])
    m = (m >= 0.5).float()
    batch = {"image": pixels * 2 - 1, "mask": m * 2 - 1, "masked_image": ((1 - m) * pixels) * 2 - 1}
    with torch.no_grad(), model.ema_scope():
        c = model.cond_stage_model.encode(batch["masked_image"])
        c = torch.cat((c, F.interpolate(batch["mask"], size=c.shape[-2:])), dim=1)
        samples, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=1, shape=(3, *c.shape[2:]),
                                               verbose=False, generator=torch.Generator().manual_seed(seed))
        predicted = torch.clamp((model.decode_first_stage(samples) + 1) / 2, 0, 1)
    source = torch.clamp((batch["image"] + 1) / 2, 0, 1)
    repaint = torch.clamp((batch["mask"] + 1) / 2, 0, 1)
    out = ((1 - repaint) * source + repaint * predicted).numpy().transpose(0, 2, 3, 1)[0] * 255
    return out.astype(np.uint8)


def test_run_indir_inpaints_every_pair(tmp_path: Path, model: torch.nn.Module, checkpoint: Path,
                                       capsys: pytest.CaptureFixture) -> None:
    indir, outdir = tmp_path / "in", tmp_path / "out"
    indir.mkdir()
    pairs = {name: _write_pair(indir, name, seed) for seed, name in enumerate(["b", "a"])}
    written = run_indir(str(indir), str(outdir), steps=3, config=str(TINY_CONFIG), ckpt=str(checkpoint),
                        device="cpu", seed=7, accel=False, progress=False)
    assert written == [outdir / "a.png", outdir / "b.png"]  # the masks' sorted order
    assert f"2 inpainted images written to {outdir}" in capsys.readouterr().out.strip().splitlines()[-1]
    for index, path in enumerate(written):
        image, mask = pairs[path.stem]
        result = np.asarray(Image.open(path))
        assert result.shape == image.shape and result.dtype == np.uint8
        keep = mask < 128
        assert np.array_equal(result[keep], image[keep])  # outside the mask: the input, exactly
        assert not np.array_equal(result[~keep], image[~keep])
        reference = _original_script_result(model, image, mask, 3, 7 + index)
        assert np.array_equal(result[~keep], reference[~keep])  # inside: the original's prediction
        assert np.abs(result[keep].astype(int) - reference[keep]).max() <= 1  # the original's truncation
    assert sorted(p.name for p in outdir.iterdir()) == ["a.png", "b.png"]  # no temporary files left

    before = [path.read_bytes() for path in written]
    with pytest.raises(UserInputError, match="already exists.*nothing is overwritten"):
        run_indir(str(indir), str(outdir), steps=3, config=str(TINY_CONFIG), ckpt=str(checkpoint), device="cpu")
    assert [path.read_bytes() for path in written] == before


def _refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, indir: Path, **kwargs) -> str:
    """run_indir's refusal message; the model must not have been loaded."""
    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the inputs were checked")

    monkeypatch.setattr("ldm.cli.runtime.load_model", no_load)
    options = {"steps": 3, "config": str(TINY_CONFIG), "ckpt": str(tmp_path / "missing.ckpt"), "device": "cpu"}
    options.update(kwargs)
    with pytest.raises(UserInputError) as error:
        run_indir(str(indir), str(tmp_path / "out"), **options)
    message = str(error.value)
    assert "\n" not in message
    return message


def test_run_indir_refuses_bad_inputs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    indir = tmp_path / "in"
    assert "not found" in _refused(tmp_path, monkeypatch, indir)
    indir.mkdir()
    (indir / "notes.txt").write_text("not an image")
    assert "has no NAME.png with its NAME_mask.png" in _refused(tmp_path, monkeypatch, indir)

    _write_pair(indir, "good", 0)
    Image.fromarray(np.zeros((SIZE, SIZE, 3), dtype=np.uint8)).save(indir / "lonely.png")
    message = _refused(tmp_path, monkeypatch, indir)
    assert "lonely.png has no mask lonely_mask.png" in message and "add a mask" in message
    (indir / "lonely.png").unlink()

    Image.fromarray(np.zeros((SIZE, SIZE), dtype=np.uint8)).save(indir / "orphan_mask.png")
    assert "has no image orphan.png" in _refused(tmp_path, monkeypatch, indir)
    (indir / "orphan_mask.png").unlink()

    _write_pair(indir, "sizes", 1, mask_size=(SIZE, SIZE + 8))
    message = _refused(tmp_path, monkeypatch, indir)
    assert "sizes_mask.png is 16x24 but its image" in message and "make the mask the image's size" in message
    _write_pair(indir, "sizes", 1, size=(SIZE + 4, SIZE), mask_size=(SIZE + 4, SIZE))
    assert "multiples of 8" in _refused(tmp_path, monkeypatch, indir)
    (indir / "sizes.png").unlink()
    (indir / "sizes_mask.png").unlink()

    (indir / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    _write_pair(indir, "broken_helper", 2)
    (indir / "broken_mask.png").write_bytes((indir / "broken_helper_mask.png").read_bytes())
    assert "cannot read image" in _refused(tmp_path, monkeypatch, indir)
    for name in ("broken.png", "broken_mask.png", "broken_helper.png", "broken_helper_mask.png"):
        (indir / name).unlink()

    assert "--steps must be between 1 and 1000" in _refused(tmp_path, monkeypatch, indir, steps=0)
    sd_config = str(TESTS_DIR / "configs" / "tiny-sd.yaml")
    assert "not an LDM inpainting model" in _refused(tmp_path, monkeypatch, indir, config=sd_config)
    message = _refused(tmp_path, monkeypatch, indir)
    assert "checkpoint not found" in message and "heibox" in message


def test_find_pairs_follows_the_original_glob(tmp_path: Path) -> None:
    for name in ("b", "a", "c"):
        _write_pair(tmp_path, name, 0)
    (tmp_path / "readme.txt").write_text("ignored")
    pairs = find_pairs(tmp_path)
    assert [(p.image.name, p.mask.name, p.name) for p in pairs] == [
        ("a.png", "a_mask.png", "a.png"), ("b.png", "b_mask.png", "b.png"), ("c.png", "c_mask.png", "c.png")]


def test_indir_arguments() -> None:
    import argparse

    parser = argparse.ArgumentParser()
    inpaint_indir.add_indir_arguments(parser)
    opt = parser.parse_args(["--indir", "in", "--outdir", "out"])
    assert (opt.indir, opt.outdir, opt.steps) == ("in", "out", 50)
