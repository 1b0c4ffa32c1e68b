"""LoRA files merged into our model give what diffusers' `load_lora_weights` gives on the converted model (kohya
and PEFT layouts, linear layers, 1x1 and 3x3 convolutions, the text encoder); removal is bit-exact; LoRAs stack;
ldm.accel's caches follow the merge; bad files are one clear UserInputError."""
from __future__ import annotations

import copy
import json
import logging

import pytest
import torch
from safetensors.torch import save_file

from ldm import accel
from ldm.errors import UserInputError
from ldm.lora import apply_lora, read_lora, remove_lora
from tests.model_factory import random_tiny_model, tiny_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

# diffusers module names: attention linears, a 1x1 proj_in/proj_out, LoCon 3x3 convolutions (a resnet's and an
# upsampler's), the mid block; and CLIP text-encoder linears.
UNET_MODULES = (
    "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q",
    "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k",
    "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0",
    "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.0.proj",
    "mid_block.attentions.0.transformer_blocks.0.attn2.to_v",
    "down_blocks.1.attentions.0.proj_in",
    "up_blocks.1.attentions.0.proj_out",
    "down_blocks.0.resnets.0.conv1",
    "up_blocks.0.upsamplers.0.conv",
)
TEXT_MODULES = (
    "text_model.encoder.layers.0.self_attn.q_proj",
    "text_model.encoder.layers.1.self_attn.out_proj",
    "text_model.encoder.layers.1.mlp.fc1",
)
RANK = 4


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def base():
    return random_tiny_model(seed=3)


@pytest.fixture
def model(base):
    return copy.deepcopy(base)


def _transformers_text_encoder(model):
    """transformers' CLIPTextModel with our text encoder's weights (as in tests/test_parity_diffusers.py)."""
    transformers = pytest.importorskip("transformers")
    config = model.cond_stage_model.transformer.config
    hf_model = transformers.CLIPTextModel(transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act="quick_gelu"))
    prefix = "text_model." if any(key.startswith("text_model.") for key in hf_model.state_dict()) else ""
    ours = model.cond_stage_model.transformer.state_dict()
    hf_model.load_state_dict({prefix + key.removeprefix("text_model."): value for key, value in ours.items()},
                             strict=False)
    return hf_model


def _pipeline(model):
    """diffusers' StableDiffusionPipeline holding `model`'s weights (converted by diffusers' own functions)."""
    state = model.state_dict()
    original = dict(tiny_config())
    config = single_file.create_unet_diffusers_config_from_ldm(original, state, image_size=64)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, config), strict=True)
    vae_config = single_file.create_vae_diffusers_config_from_ldm(original, state, image_size=64)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    text_encoder = _transformers_text_encoder(model)
    pipe = diffusers.StableDiffusionPipeline(
        vae=vae.eval(), text_encoder=text_encoder.eval(), tokenizer=None, unet=unet.eval(),
        scheduler=diffusers.DDIMScheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    return pipe


def _module_name(root: torch.nn.Module, name: str) -> str:
    """`name` as `root` spells it: transformers 5's CLIPTextModel has no `text_model.` level."""
    try:
        root.get_submodule(name)
    except AttributeError:
        return name.removeprefix("text_model.")
    return name


def _shape(root: torch.nn.Module, name: str) -> tuple[int, int, tuple[int, ...]]:
    weight = root.get_submodule(_module_name(root, name)).weight
    return weight.shape[0], weight.shape[1], tuple(weight.shape[2:])


def _matrices(out: int, inp: int, kernel: tuple[int, ...], generator: torch.Generator):
    down = torch.randn(RANK, inp, *kernel, generator=generator) * 0.3
    up = torch.randn(out, RANK, *(1 for _ in kernel), generator=generator) * 0.3
    return down, up


def kohya_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """A kohya / web-UI LoRA with random non-zero up weights and an alpha per layer."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, root, modules in (("lora_unet_", pipe.unet, UNET_MODULES),
                                  ("lora_te_", pipe.text_encoder, TEXT_MODULES)):
        for module in modules:
            name = prefix + module.replace(".", "_")
            down, up = _matrices(*_shape(root, module), generator)
            tensors[f"{name}.lora_down.weight"], tensors[f"{name}.lora_up.weight"] = down, up
            tensors[f"{name}.alpha"] = torch.tensor(float(RANK) / 2)
    return tensors


def peft_lora(pipe, seed: int) -> dict[str, torch.Tensor]:
    """A diffusers/PEFT LoRA (`unet.….lora_A.weight`, `text_encoder.….lora_B.weight`)."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for prefix, root, modules in (("unet.", pipe.unet, UNET_MODULES),
                                  ("text_encoder.", pipe.text_encoder, TEXT_MODULES)):
        for module in map(lambda name: _module_name(root, name), modules):
            down, up = _matrices(*_shape(root, module), generator)
            tensors[f"{prefix}{module}.lora_A.weight"], tensors[f"{prefix}{module}.lora_B.weight"] = down, up
    return tensors


PEFT_METADATA = {"lora_adapter_metadata": json.dumps({
    "unet.lora_alpha": 8, "unet.r": RANK, "unet.alpha_pattern": {"proj_in": 2},
    "unet.target_modules": list(UNET_MODULES),
    "text_encoder.lora_alpha": 2, "text_encoder.r": RANK,
    "text_encoder.target_modules": [m.removeprefix("text_model.") for m in TEXT_MODULES]})}


def _save(tmp_path, name, tensors, metadata=None):
    path = tmp_path / name
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path), metadata=metadata)
    return path


@torch.no_grad()
def _outputs_ours(model):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 731])
    context = torch.randn(2, 77, 32, generator=generator)
    ids = torch.randint(0, 49408, (2, 77), generator=generator)
    eps = model.model.diffusion_model(x, t, context=context)
    text = model.cond_stage_model.transformer(input_ids=ids)
    return (x, t, context, ids), eps, text


@pytest.mark.parametrize("layout", ["kohya", "peft"])
def test_merged_lora_matches_diffusers_load_lora_weights(model, tmp_path, layout):
    pipe = _pipeline(model)
    if layout == "kohya":
        path = _save(tmp_path, "style.safetensors", kohya_lora(pipe, seed=1))
    else:
        path = _save(tmp_path, "style.safetensors", peft_lora(pipe, seed=2), PEFT_METADATA)
    (x, t, context, ids), eps_before, text_before = _outputs_ours(model)
    handle = apply_lora(model, path, weight=0.7)
    assert len(handle.changed) == len(UNET_MODULES) + len(TEXT_MODULES)
    _, eps, text = _outputs_ours(model)
    pipe.load_lora_weights(str(path), adapter_name="style")
    pipe.set_adapters(["style"], adapter_weights=[0.7])
    with torch.no_grad():
        eps_theirs = pipe.unet(x, t, encoder_hidden_states=context).sample
        text_theirs = pipe.text_encoder(input_ids=ids).last_hidden_state
    assert relative_error(eps, eps_before) > 1e-2 and relative_error(text, text_before) > 1e-2  # it did something
    assert relative_error(eps, eps_theirs) < 1e-4
    assert relative_error(text, text_theirs) < 1e-4


@pytest.fixture(scope="module")
def lora_files(base, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("loras")
    pipe = _pipeline(base)
    return (_save(tmp, "first.safetensors", kohya_lora(pipe, seed=5)),
            _save(tmp, "second.safetensors", peft_lora(pipe, seed=6), PEFT_METADATA))


def _assert_state_equal(model, state):
    current = model.state_dict()
    assert current.keys() == state.keys()
    assert all(torch.equal(current[key], value) for key, value in state.items())


def test_removal_is_bit_exact_and_loras_stack(model, lora_files):
    original = {key: value.clone() for key, value in model.state_dict().items()}
    first = apply_lora(model, lora_files[0], 0.8)
    after_first = {key: value.clone() for key, value in model.state_dict().items()}
    second = apply_lora(model, lora_files[1], -1.3)
    target = first.changed[0]
    assert not torch.equal(model.state_dict()[target], after_first[target])
    with pytest.raises(ValueError, match="after first"):
        remove_lora(model, first)
    second.remove()
    _assert_state_equal(model, after_first)
    remove_lora(model, first)
    _assert_state_equal(model, original)


def test_stacked_loras_add_up(model, lora_files):
    reference = copy.deepcopy(model)
    apply_lora(model, lora_files[0], 0.5)
    apply_lora(model, lora_files[1], 0.25)
    apply_lora(reference, lora_files[0], 0.5, removable=False)
    apply_lora(reference, lora_files[1], 0.25, removable=False)
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[key], expected[key]) for key in state)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_weights_merge_in_float32_and_come_back(model, lora_files, dtype):
    model.to(dtype)
    reference = copy.deepcopy(model).float()  # the same rounded weights, merged in float32
    apply_lora(reference, lora_files[0], 1.0, removable=False)
    original = {key: value.clone() for key, value in model.state_dict().items()}
    handle = apply_lora(model, lora_files[0], 1.0)
    key = handle.changed[0]
    merged = model.state_dict()[key]
    assert merged.dtype == dtype
    assert torch.equal(merged, reference.state_dict()[key].to(dtype))  # one rounding, of the float32 result
    handle.remove()
    _assert_state_equal(model, original)


def test_accel_caches_follow_the_merge(model, lora_files):
    accel.optimize(model, torch.device("cpu"))
    conv = model.model.diffusion_model.output_blocks[1][2].conv  # the upsampler's 3x3 conv, a LoCon layer
    x = torch.randn(1, conv.in_channels, 64, 64, generator=torch.Generator().manual_seed(0))

    def plain() -> torch.Tensor:
        return torch.nn.functional.conv2d(torch.nn.functional.interpolate(x, scale_factor=2.0, mode="nearest"),
                                          conv.weight, conv.bias, padding=1)

    with torch.no_grad():
        before = conv.upsampled(x)  # fills the cache of transformed weights
        assert relative_error(before, plain()) < 1e-5
        handle = apply_lora(model, lora_files[0], 1.0)
        assert "model.diffusion_model.output_blocks.1.2.conv.weight" in handle.changed
        merged = conv.upsampled(x)
        assert relative_error(merged, plain()) < 1e-5 and relative_error(merged, before) > 1e-3
        handle.remove()
        assert torch.equal(conv.upsampled(x), before)


def test_older_diffusers_names_match(model, lora_files, tmp_path):
    lora = read_lora(lora_files[1])
    renamed = {}
    for key, value in lora.tensors.items():
        key = key.replace(".lora_A.weight", ".lora.down.weight").replace(".lora_B.weight", ".lora.up.weight")
        key = key.replace("attn1.to_q.lora.", "attn1.processor.to_q_lora.")
        renamed[key] = value
    reference = copy.deepcopy(model)
    apply_lora(reference, lora_files[1], removable=False)
    apply_lora(model, _save(tmp_path, "old.safetensors", renamed, PEFT_METADATA), removable=False)
    state, expected = model.state_dict(), reference.state_dict()
    assert all(torch.equal(state[key], expected[key]) for key in state)


def test_pickled_lora_reads_through_the_safe_loader(model, lora_files, tmp_path):
    tensors = read_lora(lora_files[0]).tensors
    torch.save(tensors, tmp_path / "first.pt")
    reference = copy.deepcopy(model)
    apply_lora(reference, lora_files[0], removable=False)
    apply_lora(model, tmp_path / "first.pt", removable=False)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), reference.state_dict().values()))


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


def _unchanged_after(model, action):
    state = {key: value.clone() for key, value in model.state_dict().items()}
    with pytest.raises(UserInputError) as error:
        action()
    _assert_state_equal(model, state)
    return _one_line(error)


def test_keys_that_match_nothing_are_named(model, lora_files, tmp_path):
    tensors = dict(read_lora(lora_files[0]).tensors)
    for name in ("lora_unet_nowhere_block_0", "lora_unet_elsewhere_1"):
        tensors[f"{name}.lora_down.weight"] = torch.ones(RANK, 32)
        tensors[f"{name}.lora_up.weight"] = torch.ones(32, RANK)
    path = _save(tmp_path, "stray.safetensors", tensors)
    message = _unchanged_after(model, lambda: apply_lora(model, path))
    assert "2 of its" in message and "lora_unet_nowhere_block_0" in message and "lora_unet_elsewhere_1" in message


def test_sdxl_lora_by_its_names(model, tmp_path):
    path = _save(tmp_path, "xl.safetensors", {
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": torch.ones(RANK, 768),
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": torch.ones(768, RANK)})
    assert "is for SDXL, not SD v1" in _unchanged_after(model, lambda: apply_lora(model, path))


@pytest.mark.parametrize("width, family", [(1024, "SD 2.x"), (2048, "SDXL")])
def test_lora_for_wider_cross_attention_names_its_model(model, tmp_path, width, family):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    path = _save(tmp_path, "wide.safetensors", {f"{name}.lora_down.weight": torch.ones(RANK, width),
                                                f"{name}.lora_up.weight": torch.ones(32, RANK)})
    assert f"is for {family}, not SD v1" in _unchanged_after(model, lambda: apply_lora(model, path))


def test_shapes_that_do_not_fit(model, tmp_path):
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"
    path = _save(tmp_path, "odd.safetensors", {f"{name}.lora_down.weight": torch.ones(RANK, 40),
                                               f"{name}.lora_up.weight": torch.ones(32, RANK)})
    message = _unchanged_after(model, lambda: apply_lora(model, path))
    assert "does not fit this model" in message and "SD 2.x/SDXL, not SD v1" in message


def test_truncated_empty_and_non_finite_files(model, lora_files, tmp_path):
    data = lora_files[0].read_bytes()
    truncated = tmp_path / "cut.safetensors"
    truncated.write_bytes(data[: len(data) // 2])
    assert "truncated" in _unchanged_after(model, lambda: apply_lora(model, truncated))
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    assert "cannot read LoRA file" in _unchanged_after(model, lambda: apply_lora(model, garbage))
    empty = tmp_path / "empty.safetensors"
    empty.write_bytes(b"")
    assert "is empty" in _unchanged_after(model, lambda: apply_lora(model, empty))
    cut_pickle = tmp_path / "cut.pt"
    torch.save(read_lora(lora_files[0]).tensors, cut_pickle)
    cut_pickle.write_bytes(cut_pickle.read_bytes()[:200])
    assert "truncated" in _unchanged_after(model, lambda: apply_lora(model, cut_pickle))
    tensors = dict(read_lora(lora_files[0]).tensors)
    key = next(k for k in tensors if k.endswith("lora_up.weight"))
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    nan = _save(tmp_path, "nan.safetensors", tensors)
    assert key in _unchanged_after(model, lambda: apply_lora(model, nan))
    assert "not found" in _unchanged_after(model, lambda: apply_lora(model, tmp_path / "missing.safetensors"))
    assert "finite" in _unchanged_after(model, lambda: apply_lora(model, lora_files[0], float("inf")))


def test_other_adapter_kinds_are_refused(model, tmp_path):
    path = _save(tmp_path, "loha.safetensors", {"lora_unet_down_blocks_0_resnets_0_conv1.hada_w1_a": torch.ones(2, 2)})
    assert "LyCORIS" in _unchanged_after(model, lambda: apply_lora(model, path))


def test_merging_logs_what_it_changed(model, lora_files, caplog):
    with caplog.at_level(logging.INFO, logger="ldm.lora"):
        apply_lora(model, lora_files[0], 0.5, removable=False)
    assert f"{len(UNET_MODULES)} UNet and {len(TEXT_MODULES)} text-encoder weights" in caplog.text
