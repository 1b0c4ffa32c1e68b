"""The names a LoRA file may give each layer of our model, mapped to the parameter it changes.

LoRA files name layers after the module they adapt: kohya / web-UI files flatten the module path with `_`
(`lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`, diffusers' UNet names for SD v1;
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`, transformers' CLIP names), diffusers/PEFT files keep the
dots (`unet.down_blocks.0.…`, `text_encoder.text_model.…`). Our model keeps the original CompVis names; which
original key each diffusers name stands for is read off diffusers' own checkpoint conversion
(`ldm.original_names`). Files that use the original UNet names (`lora_unet_input_blocks_1_1_proj_in`) match too.
"""
from __future__ import annotations

from torch import nn

from ldm.original_names import ndims, text_encoder_names, unet_names

UNET_PREFIX = "model.diffusion_model."
TEXT_PREFIX = "cond_stage_model.transformer."
TEXT_MODEL = "text_model."
WEIGHT = ".weight"


def _flat(module: str) -> str:
    return module.replace(".", "_")


def _module(key: str) -> str:
    return key[: -len(WEIGHT)]


def _text_model_variants(module: str) -> tuple[str, ...]:
    """A CLIP module name with and without transformers' `text_model.` (transformers 4 and 5 differ)."""
    bare = module[len(TEXT_MODEL):] if module.startswith(TEXT_MODEL) else module
    return TEXT_MODEL + bare, bare


def lora_targets(model: nn.Module) -> dict[str, str]:
    """Every layer name a LoRA file may use (without `.lora_down.weight` & co.) -> the name of the weight it
    changes in `model` (a LatentDiffusion model: `model.diffusion_model.…`, `cond_stage_model.transformer.…`)."""
    state = model.state_dict()
    weights = {key: tensor for key, tensor in state.items() if key.endswith(WEIGHT) and tensor.ndim >= 2}
    targets: dict[str, str] = {}
    unet_keys = [key for key in state if key.startswith(UNET_PREFIX)]
    if unet_keys:
        layers_per_block = model.model.diffusion_model.num_res_blocks
        for diffusers_key, ours in unet_names(ndims(state, unet_keys), layers_per_block).items():
            if ours in weights:
                targets.setdefault("lora_unet_" + _flat(_module(diffusers_key)), ours)
                targets.setdefault("unet." + _module(diffusers_key), ours)
        for ours in unet_keys:
            if ours in weights:
                targets.setdefault("lora_unet_" + _flat(_module(ours[len(UNET_PREFIX):])), ours)
    text_keys = [key for key in state if key.startswith(TEXT_PREFIX)]
    for transformers_key, ours in text_encoder_names(ndims(state, text_keys)).items():
        if ours not in weights:
            continue
        for module in _text_model_variants(_module(transformers_key)):
            targets.setdefault("lora_te_" + _flat(module), ours)
            targets.setdefault("text_encoder." + module, ours)
    return targets
