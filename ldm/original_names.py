"""Which original (CompVis) state-dict key each diffusers key comes from, read off diffusers' own conversion
functions (`diffusers.loaders.single_file_utils`) instead of hand-written tables.

The conversions move tensors from key to key (and squeeze a few 1x1 convolutions into linear weights); feeding
them stand-in tensors that carry their key's index shows where every key goes.
"""
from __future__ import annotations

from typing import Callable, Mapping, Sequence

import torch

ConvertFn = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]


def trace_conversion(convert: ConvertFn, key_ndims: Mapping[str, int]) -> dict[str, str]:
    """converted key -> original key, for a conversion `convert` of a state dict with `key_ndims` (key -> number
    of dimensions of its tensor)."""
    keys = list(key_ndims)
    tagged = {key: torch.full((1,) * ndim, float(index), dtype=torch.float64)
              for index, (key, ndim) in enumerate(key_ndims.items())}
    converted = convert(tagged)
    return {new: keys[int(value.reshape(-1)[0].item())] for new, value in converted.items()
            if isinstance(value, torch.Tensor) and value.numel() == 1}


def unet_names(key_ndims: Mapping[str, int], layers_per_block: int) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> the full original key (`model.diffusion_model.…`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    return trace_conversion(lambda state: convert_ldm_unet_checkpoint(state, {"layers_per_block": layers_per_block}),
                            key_ndims)


def text_encoder_names(key_ndims: Mapping[str, int]) -> dict[str, str]:
    """transformers CLIPTextModel key (`text_model.…`) -> the original key (`cond_stage_model.transformer.…`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

    return trace_conversion(convert_ldm_clip_checkpoint, key_ndims)


def vae_names(key_ndims: Mapping[str, int], levels: int) -> dict[str, str]:
    """diffusers AutoencoderKL key -> the original autoencoder key (`encoder.…`, `decoder.…`, `quant_conv.…`), for
    an autoencoder of `levels` resolutions (the length of its `ch_mult`)."""
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

    config = {"down_block_types": ["DownEncoderBlock2D"] * levels, "up_block_types": ["UpDecoderBlock2D"] * levels}
    return trace_conversion(lambda state: convert_ldm_vae_checkpoint(state, config), key_ndims)


def ndims(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> dict[str, int]:
    """key -> number of dimensions, for `keys` of `state_dict` (all of them by default)."""
    return {key: state_dict[key].ndim for key in (keys if keys is not None else state_dict)}
