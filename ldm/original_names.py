"""Which original (CompVis) state-dict key each diffusers key comes from, read off diffusers' own conversion
functions (`diffusers.loaders.single_file_utils`) instead of hand-written tables.

The conversions move tensors from key to key (and squeeze a few 1x1 convolutions into linear weights); feeding
them stand-in tensors that carry their key's index shows where every key goes. Importing diffusers' conversion code
takes seconds, more than a LoRA merge itself, so each mapping is kept on disk
($XDG_CACHE_HOME/latent-diffusion-sd/original-names-*.json), keyed by the model's keys, the conversion and the
installed diffusers version, and traced again only when one of them changes (`cached_json`, which also keeps the
conversion plans of diffusers folders, ldm.diffusers_format).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence, TypeVar

import torch

logger = logging.getLogger(__name__)

ConvertFn = Callable[[dict[str, torch.Tensor]], Mapping[str, torch.Tensor]]
T = TypeVar("T")


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


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def _write_json(path: Path, value: Any) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", encoding="utf-8", dir=path.parent, suffix=".partial",
                                         delete=False) as handle:
            json.dump(value, handle)
        os.replace(handle.name, path)
    except OSError as error:
        logger.debug("cannot keep %s: %s", path, error)


def cached_json(kind: str, identity: Any, compute: Callable[[], Any], parse: Callable[[Any], T]) -> T:
    """`parse(compute())`, where `compute()`'s JSON value is kept on disk as `kind`-<digest>.json in `cache_dir()` and
    read back while `identity` (JSON-able) and the installed diffusers version stay the same. A file that is
    unreadable, or whose value `parse` refuses (raising ValueError, KeyError or TypeError: damaged, or written by
    other code), is computed and written again."""
    digest = hashlib.sha256(json.dumps([kind, identity, _diffusers_version()]).encode()).hexdigest()[:16]
    path = cache_dir() / f"{kind}-{digest}.json"
    kept = _read_json(path)
    if kept is not None:
        try:
            return parse(kept)
        except (ValueError, KeyError, TypeError):
            logger.debug("tracing again: %s is damaged", path)
    value = compute()
    _write_json(path, value)
    return parse(value)


def cached_trace(kind: str, params: Any, key_ndims: Mapping[str, int],
                 make_convert: Callable[[], ConvertFn]) -> dict[str, str]:
    """`trace_conversion(make_convert(), key_ndims)`, from the disk cache when the same conversion (`kind`,
    `params`) of the same keys was traced under the same diffusers version."""
    def parse(names: Any) -> dict[str, str]:
        if not (isinstance(names, dict) and all(isinstance(k, str) and v in key_ndims for k, v in names.items())):
            raise ValueError("not a mapping onto the model's keys")
        return names

    return cached_json(f"original-names-{kind}", [params, sorted(key_ndims.items())],
                       lambda: trace_conversion(make_convert(), key_ndims), parse)


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
