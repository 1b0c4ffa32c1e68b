"""Which original (CompVis) state-dict key each diffusers key comes from, read off diffusers' own conversion
functions (`diffusers.loaders.single_file_utils`) instead of hand-written tables.

The conversions move tensors from key to key (and squeeze a few 1x1 convolutions into linear weights); feeding
them stand-in tensors that carry their key's index shows where every key goes. Importing diffusers' conversion code
takes seconds, more than a LoRA merge itself, so each mapping is kept on disk
($XDG_CACHE_HOME/latent-diffusion-sd/original-names-*.json), keyed by the model's keys, the conversion and the
installed diffusers version, and traced again only when one of them changes.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import torch

logger = logging.getLogger(__name__)

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


def cache_dir() -> Path:
    """$XDG_CACHE_HOME (or ~/.cache)/latent-diffusion-sd, beside the checkpoint hashes."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "latent-diffusion-sd"


def _diffusers_version() -> Optional[str]:
    try:
        return version("diffusers")
    except PackageNotFoundError:
        return None


def _read_names(path: Path, key_ndims: Mapping[str, int]) -> Optional[dict[str, str]]:
    try:
        names = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(names, dict) or not all(isinstance(k, str) and v in key_ndims for k, v in names.items()):
        return None
    return names


def _write_names(path: Path, names: Mapping[str, str]) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".partial",
                                         delete=False) as handle:
            json.dump(names, handle)
        os.replace(handle.name, path)
    except OSError as error:
        logger.debug("cannot keep the traced names in %s: %s", path, error)


def cached_trace(kind: str, params: Any, key_ndims: Mapping[str, int],
                 make_convert: Callable[[], ConvertFn]) -> dict[str, str]:
    """`trace_conversion(make_convert(), key_ndims)`, from the disk cache when the same conversion (`kind`,
    `params`) of the same keys was traced under the same diffusers version."""
    identity = json.dumps([kind, params, sorted(key_ndims.items()), _diffusers_version()])
    path = cache_dir() / f"original-names-{kind}-{hashlib.sha256(identity.encode()).hexdigest()[:16]}.json"
    names = _read_names(path, key_ndims)
    if names is None:
        names = trace_conversion(make_convert(), key_ndims)
        _write_names(path, names)
    return names


def unet_names(key_ndims: Mapping[str, int], layers_per_block: int) -> dict[str, str]:
    """diffusers UNet2DConditionModel key -> the full original key (`model.diffusion_model.…`)."""
    def make_convert() -> ConvertFn:
        from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

        return lambda state: convert_ldm_unet_checkpoint(state, {"layers_per_block": layers_per_block})

    return cached_trace("unet", layers_per_block, key_ndims, make_convert)


def text_encoder_names(key_ndims: Mapping[str, int]) -> dict[str, str]:
    """transformers CLIPTextModel key (`text_model.…`) -> the original key (`cond_stage_model.transformer.…`)."""
    def make_convert() -> ConvertFn:
        from diffusers.loaders.single_file_utils import convert_ldm_clip_checkpoint

        return convert_ldm_clip_checkpoint

    return cached_trace("text", None, key_ndims, make_convert)


def vae_names(key_ndims: Mapping[str, int], levels: int) -> dict[str, str]:
    """diffusers AutoencoderKL key -> the original autoencoder key (`encoder.…`, `decoder.…`, `quant_conv.…`), for
    an autoencoder of `levels` resolutions (the length of its `ch_mult`)."""
    def make_convert() -> ConvertFn:
        from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint

        config = {"down_block_types": ["DownEncoderBlock2D"] * levels,
                  "up_block_types": ["UpDecoderBlock2D"] * levels}
        return lambda state: convert_ldm_vae_checkpoint(state, config)

    return cached_trace("vae", levels, key_ndims, make_convert)


def ndims(state_dict: Mapping[str, torch.Tensor], keys: Sequence[str] | None = None) -> dict[str, int]:
    """key -> number of dimensions, for `keys` of `state_dict` (all of them by default)."""
    return {key: state_dict[key].ndim for key in (keys if keys is not None else state_dict)}
