"""Stable Diffusion v1 weights between this package's layout (the keys of the original CompVis checkpoints) and the
diffusers layout, both ways, through diffusers' own conversion code.

Original -> diffusers: diffusers ships the functions behind its `from_single_file` in
`diffusers.loaders.single_file_utils`: `create_unet_diffusers_config_from_ldm` and
`create_vae_diffusers_config_from_ldm` turn our config into the UNet's and the autoencoder's diffusers configs;
`convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint` and `convert_ldm_clip_checkpoint` rename the tensors.
They are called as they are.

Diffusers -> original: diffusers ships no inverse, and this module writes no key table of its own. The forward
functions only move tensors: they rename keys and, for the autoencoder's attention, drop the trailing 1x1 of a
convolution kernel (`conv_attn_to_linear`: [C, C, 1, 1] -> [C, C]); they never compute with the values. So the
forward conversion is run once on a stand-in for the model's state dict, built from the config on the meta device,
in which every tensor has its real shape and one constant value, its own index (a zero-stride expanded scalar:
no memory). Every tensor the conversion puts out still carries the index of the tensor it came from, which gives,
for each diffusers key, our key, our shape and the diffusers shape (`ConversionPlan.table`). The table must be
one-to-one and cover every UNet, autoencoder and text-encoder tensor of the model, or the conversion is refused
rather than guessed. Going back, each tensor is reshaped to our shape, a view that leaves the values untouched:
the round trip is bit-exact. The table and the two configs are kept on disk per config and diffusers version
(`original_names.cached_json`), so reading a diffusers folder imports diffusers only the first time.

What a diffusers folder does not hold comes from the config: the noise-schedule buffers that the original
checkpoints carry (`betas`, `alphas_cumprod`, ...) are the model's own, computed from `linear_start`, `linear_end`
and `timesteps` as in training; a `scale_factor` buffer (models trained with `scale_by_std`) is the autoencoder's
`scaling_factor`.
"""
from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any, Mapping, Optional, Sequence

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from ldm.checkpoint import model_config_section, no_weight_init, normalize_state_dict, read_state_dict
from ldm.errors import CheckpointError, UserInputError
from ldm.original_names import cached_json
from ldm.schedule_buffers import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

PART_PREFIXES = {"unet": "model.diffusion_model.", "vae": "first_stage_model.",
                 "text_encoder": "cond_stage_model.transformer."}
TEXT_MODEL_PREFIX = "text_model."
EMA_PREFIX = "model_ema."
SCALE_FACTOR_KEY = "scale_factor"
SCHEDULE_TYPE = "scaled_linear"  # diffusers' name for the original's "linear" schedule (linear in sqrt(beta))
CLIP_EMBEDDER = "ldm.modules.encoders.modules.FrozenCLIPEmbedder"
KL_AUTOENCODER = "ldm.models.autoencoder.AutoencoderKL"
DIFFUSION_MODELS = ("ldm.models.diffusion.ddpm.LatentDiffusion", "ldm.models.diffusion.ddpm.LatentInpaintDiffusion")
TEXT_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
               "max_position_embeddings", "hidden_act")
MAX_KEYS_IN_MESSAGE = 3


@dataclass(frozen=True)
class Correspondence:
    """Where one diffusers tensor comes from: our key, our shape, and its shape in the diffusers layout."""

    ours: str
    our_shape: tuple[int, ...]
    shape: tuple[int, ...]


@dataclass
class ConversionPlan:
    """Everything a conversion of one config's model needs: the model built on the meta device (its keys, shapes
    and real schedule buffers), the diffusers configs of its UNet and autoencoder, the text encoder's config and,
    per part, diffusers key -> `Correspondence`."""

    section: dict[str, Any]
    template: nn.Module
    unet_config: dict[str, Any]
    vae_config: dict[str, Any]
    text_config: dict[str, Any]
    table: dict[str, dict[str, Correspondence]]

    @property
    def params(self) -> dict[str, Any]:
        return self.section.get("params") or {}

    @property
    def in_channels(self) -> int:
        return int(self.unet_config["in_channels"])


def _plain(section: Any) -> dict[str, Any]:
    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section)


def check_convertible(section: Mapping[str, Any]) -> None:
    """Refuse (UserInputError) a config whose model has no diffusers `StableDiffusionPipeline` counterpart: the LDM
    text2img-large model (BERT text encoder), VQ autoencoders, other schedules or parameterisations."""
    params = section.get("params") or {}
    text_target = (params.get("cond_stage_config") or {}).get("target")
    if text_target != CLIP_EMBEDDER:
        raise UserInputError(f"the config's model has the text encoder {text_target}, not CLIP (the LDM text2img-large "
                             "BERT model?); diffusers' StableDiffusionPipeline holds Stable Diffusion v1 models only")
    checks = ((section.get("target") in DIFFUSION_MODELS, f"the model {section.get('target')}"),
              ((params.get("first_stage_config") or {}).get("target") == KL_AUTOENCODER, "a non-KL autoencoder"),
              (params.get("parameterization", "eps") == "eps", f"parameterization {params.get('parameterization')}"),
              (params.get("beta_schedule", "linear") == "linear", f"beta_schedule {params.get('beta_schedule')}"),
              (params.get("conditioning_key") in ("crossattn", "hybrid"),
               f"conditioning_key {params.get('conditioning_key')}"))
    for fits, what in checks:
        if not fits:
            raise UserInputError(f"the config's model has {what}; only Stable Diffusion v1 models (and their "
                                 "9-channel inpainting variant) convert to and from diffusers folders")


def _markers(shapes: Mapping[str, tuple[int, ...]]) -> dict[str, torch.Tensor]:
    """Stand-in tensors: each of its shape, every element the tensor's index, with no memory behind them."""
    return {key: torch.tensor(float(index)).expand(shape) for index, (key, shape) in enumerate(shapes.items())}


def _single_file_utils() -> Any:
    from diffusers.loaders import single_file_utils

    return single_file_utils


def _convert(state: Mapping[str, torch.Tensor], unet_config: Mapping[str, Any], vae_config: Mapping[str, Any]
             ) -> dict[str, dict[str, torch.Tensor]]:
    """diffusers' own conversion of an original-layout state dict, part by part."""
    utils = _single_file_utils()
    return {"unet": utils.convert_ldm_unet_checkpoint(state, dict(unet_config)),
            "vae": utils.convert_ldm_vae_checkpoint(state, dict(vae_config)),
            "text_encoder": utils.convert_ldm_clip_checkpoint(state)}


def _describe(keys: Sequence[str]) -> str:
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return ", ".join(list(keys)[:MAX_KEYS_IN_MESSAGE]) + (f" and {more} more" if more > 0 else "")


def _check_table(table: Mapping[str, Mapping[str, Correspondence]], shapes: Mapping[str, tuple[int, ...]]) -> None:
    """Refuse (CheckpointError) a table that is not a bijection onto the model's tensors, each moved whole."""
    used: set[str] = set()
    for entries in table.values():
        for entry in entries.values():
            if (entry.ours not in shapes or entry.ours in used or entry.our_shape != tuple(shapes[entry.ours])
                    or math.prod(entry.shape) != math.prod(entry.our_shape)):
                raise CheckpointError(f"diffusers' conversion does not move {entry.ours} as one tensor; it cannot be "
                                      "inverted for this config")
            used.add(entry.ours)
    left_out = [key for key in shapes if key not in used]
    if left_out:
        raise CheckpointError(f"diffusers' conversion leaves out {len(left_out)} tensors of the model "
                              f"({_describe(left_out)}); this config's model cannot be stored as a diffusers folder")


def _read_table(converted: Mapping[str, Mapping[str, Optional[torch.Tensor]]],
                shapes: Mapping[str, tuple[int, ...]]) -> dict[str, dict[str, Correspondence]]:
    """Read the markers back out of a conversion of `_markers(shapes)`; refuse anything but a bijection."""
    keys = list(shapes)
    table: dict[str, dict[str, Correspondence]] = {}
    for part, tensors in converted.items():
        table[part] = {}
        for key, tensor in tensors.items():
            if tensor is None:
                raise CheckpointError(f"diffusers' conversion asks for a {part} tensor the model lacks (for {key}); "
                                      "the config does not build a Stable Diffusion v1 model")
            ours = keys[int(tensor[(0,) * tensor.ndim])]
            table[part][key] = Correspondence(ours=ours, our_shape=tuple(shapes[ours]), shape=tuple(tensor.shape))
    _check_table(table, shapes)
    return table


def _traced_plan(section: Mapping[str, Any], shapes: Mapping[str, tuple[int, ...]]) -> dict[str, Any]:
    """diffusers' configs of the UNet and the autoencoder, and the table read off its conversion of stand-in
    tensors, as the JSON value that `original_names.cached_json` keeps (`_plan_parts` reads it)."""
    markers = _markers(shapes)
    utils = _single_file_utils()
    whole = {"model": section}
    latent_size = int((section.get("params") or {}).get("image_size", 64))
    unet_config = utils.create_unet_diffusers_config_from_ldm(whole, markers)
    unet_config["sample_size"] = latent_size
    vae_config = utils.create_vae_diffusers_config_from_ldm(whole, markers)
    vae_config["sample_size"] = latent_size * 2 ** (len(vae_config["block_out_channels"]) - 1)
    table = _read_table(_convert(markers, unet_config, vae_config), shapes)
    plan = {"unet_config": unet_config, "vae_config": vae_config,
            "table": {part: {key: [entry.ours, entry.our_shape, entry.shape] for key, entry in entries.items()}
                      for part, entries in table.items()}}
    return json.loads(json.dumps(plan))  # as a later run reads it back: lists, not tuples


def _plan_parts(value: Any, shapes: Mapping[str, tuple[int, ...]]
                ) -> tuple[dict[str, Any], dict[str, Any], dict[str, dict[str, Correspondence]]]:
    """The UNet's and the autoencoder's diffusers configs and the checked table of a `_traced_plan` value; raises
    ValueError (a table that does not fit `shapes`), KeyError or TypeError for anything else."""
    table = {part: {key: Correspondence(ours=ours, our_shape=tuple(our_shape), shape=tuple(shape))
                    for key, (ours, our_shape, shape) in value["table"][part].items()}
             for part in PART_PREFIXES}
    try:
        _check_table(table, shapes)
    except CheckpointError as error:
        raise ValueError(str(error)) from error
    unet_config, vae_config = value["unet_config"], value["vae_config"]
    if not (isinstance(unet_config, dict) and isinstance(vae_config, dict)):
        raise TypeError("the configs are not objects")
    return unet_config, vae_config, table


def _text_config(template: nn.Module) -> dict[str, Any]:
    config = template.cond_stage_model.transformer.config
    return {name: getattr(config, name) for name in (*TEXT_FIELDS, "layer_norm_eps")}


def plan_conversion(config: Any) -> ConversionPlan:
    """The `ConversionPlan` of the model that `config` (a path, a whole config or its `model` section) builds.

    What diffusers' conversion says for this config is kept on disk (`original_names.cached_json`), so only the first
    run for a config imports diffusers' conversion code (seconds); reading a diffusers folder then needs no
    diffusers at all."""
    section = _plain(model_config_section(config))
    check_convertible(section)
    with no_weight_init():
        template = instantiate_from_config(section)
    shapes = {key: tuple(value.shape) for key, value in template.state_dict().items()
              if key.startswith(tuple(PART_PREFIXES.values()))}
    unet_config, vae_config, table = cached_json("diffusers-plan", [section, sorted(shapes.items())],
                                                 lambda: _traced_plan(section, shapes),
                                                 lambda value: _plan_parts(value, shapes))
    return ConversionPlan(section=section, template=template, unet_config=unet_config, vae_config=vae_config,
                          text_config=_text_config(template), table=table)


def scaling_factor(state: Mapping[str, torch.Tensor], plan: ConversionPlan) -> float:
    """The latent scale: the state dict's `scale_factor` buffer (scale_by_std models), else the config's."""
    if SCALE_FACTOR_KEY in state:
        return float(state[SCALE_FACTOR_KEY])
    return float(plan.params.get("scale_factor", 1.0))


def read_original_checkpoint(path: str | os.PathLike, plan: ConversionPlan) -> dict[str, torch.Tensor]:
    """The tensors of our checkpoint `path` that a diffusers folder holds (the model's own weights, not an EMA copy),
    plus its `scale_factor` if it has one; a checkpoint that lacks any, or holds them in other shapes, is refused:
    a conversion initialises nothing."""
    state = normalize_state_dict(read_state_dict(path), plan.template.state_dict().keys())
    wanted = {entry.ours: entry.our_shape for table in plan.table.values() for entry in table.values()}
    missing = [key for key in wanted if key not in state]
    if missing:
        raise CheckpointError(f"{path} lacks {len(missing)} tensors of the config's model ({_describe(missing)}); "
                              "it is not a whole Stable Diffusion checkpoint, or the config does not fit it")
    misshapen = [f"{key} {tuple(state[key].shape)} vs {shape}" for key, shape in wanted.items()
                 if tuple(state[key].shape) != shape]
    if misshapen:
        raise CheckpointError(f"{path} does not fit the config's model: {len(misshapen)} tensors have other shapes, "
                              f"e.g. {_describe(misshapen)}; check that the config matches the checkpoint")
    extra = {SCALE_FACTOR_KEY: state[SCALE_FACTOR_KEY]} if SCALE_FACTOR_KEY in state else {}
    return {**{key: state[key] for key in wanted}, **extra}


def to_diffusers(state: Mapping[str, torch.Tensor], plan: ConversionPlan) -> dict[str, dict[str, torch.Tensor]]:
    """Our state dict (the keys of `plan.template`) as the diffusers parts' state dicts, by diffusers' conversion;
    contiguous tensors, ready to save."""
    missing = [entry.ours for table in plan.table.values() for entry in table.values() if entry.ours not in state]
    if missing:
        raise CheckpointError(f"the state dict lacks {len(missing)} tensors of the model: {_describe(missing)}")
    converted = _convert(state, plan.unet_config, plan.vae_config)
    return {part: {key: tensors[key].contiguous() for key in plan.table[part]} for part, tensors in converted.items()}


def _normalise_part(part: str, tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Text encoders saved by transformers 5 lack the `text_model.` prefix, and older ones carry `position_ids`."""
    if part != "text_encoder":
        return dict(tensors)
    return {(key if key.startswith(TEXT_MODEL_PREFIX) else TEXT_MODEL_PREFIX + key): value
            for key, value in tensors.items() if not key.endswith("position_ids")}


def from_diffusers(parts: Mapping[str, Mapping[str, torch.Tensor]], plan: ConversionPlan,
                   latent_scale: Optional[float] = None, source: str = "the diffusers folder"
                   ) -> dict[str, torch.Tensor]:
    """The diffusers parts' state dicts as our state dict, in the key order of the original checkpoints: every
    tensor reshaped back (a view), the schedule buffers from the config, `scale_factor` (where the model keeps one)
    from `latent_scale`. Missing, unknown or misshapen tensors raise `CheckpointError` naming a few."""
    ours: dict[str, torch.Tensor] = {}
    for part, table in plan.table.items():
        tensors = _normalise_part(part, parts[part])
        missing = [key for key in table if key not in tensors]
        unknown = [key for key in tensors if key not in table]
        if missing or unknown:
            problem = (f"lacks {len(missing)} tensors of the model: {_describe(missing)}" if missing else
                       f"has {len(unknown)} tensors the model does not: {_describe(unknown)}")
            raise CheckpointError(f"the {part} of {source} {problem}; it is not the model the config describes")
        misshapen = [f"{key} {tuple(tensors[key].shape)} vs {entry.shape}" for key, entry in table.items()
                     if tuple(tensors[key].shape) != entry.shape]
        if misshapen:
            raise CheckpointError(f"the {part} of {source} does not fit the config's model: {len(misshapen)} tensors "
                                  f"have other shapes, e.g. {_describe(misshapen)}")
        ours.update({entry.ours: tensors[key].reshape(entry.our_shape) for key, entry in table.items()})
    template = plan.template.state_dict()
    for key, value in template.items():
        if key in ours or key.startswith(EMA_PREFIX):
            continue
        if key == SCALE_FACTOR_KEY and latent_scale is not None:
            ours[key] = torch.tensor(latent_scale, dtype=torch.float32)
        elif not value.is_meta:
            ours[key] = value
        else:
            raise CheckpointError(f"{source} has nothing for {key}, and the config computes no value for it")
    return {key: ours[key] for key in template if key in ours}


def to_half(state: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Floating weights in float16; the noise schedule and `scale_factor` stay float32, as in the released files."""
    keep = {*SCHEDULE_BUFFERS, SCALE_FACTOR_KEY}
    return {key: value.half() if value.is_floating_point() and key not in keep else value
            for key, value in state.items()}
