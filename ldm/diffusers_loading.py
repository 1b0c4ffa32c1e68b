"""A diffusers folder loaded as our state dict, in memory (what `--ckpt FOLDER` and
scripts/convert_from_diffusers.py read): the folder checked part by part (ldm.diffusers_folder), its configs
compared with the model our config builds, its weights read weights-only and memory-mapped and renamed by
`ldm.diffusers_format.from_diffusers`.
"""
from __future__ import annotations

import json
import logging
import os
from typing import Any, Mapping, Optional, Sequence

import torch

from ldm.checkpoint import read_state_dict
from ldm.demo import REPO_DIR
from ldm.diffusers_folder import DiffusersFolder, inspect_folder
from ldm.diffusers_format import (SCALE_FACTOR_KEY, SCHEDULE_TYPE, TEXT_FIELDS, ConversionPlan, from_diffusers,
                                  plan_conversion)
from ldm.errors import CheckpointError
from ldm.inpainting_checkpoint import DEFAULT_CONFIG, INPAINTING_CHANNELS, inpainting_config_beside

logger = logging.getLogger(__name__)

# The fields of a folder's configs that decide the tensors' shapes, compared with what our config builds.
UNET_FIELDS = ("in_channels", "out_channels", "block_out_channels", "layers_per_block", "cross_attention_dim",
               "attention_head_dim", "down_block_types", "up_block_types", "use_linear_projection")
VAE_FIELDS = ("in_channels", "out_channels", "block_out_channels", "latent_channels", "layers_per_block")


def _differences(theirs: Mapping[str, Any], ours: Mapping[str, Any], fields: Sequence[str]) -> list[str]:
    def plain(value: Any) -> Any:
        return list(value) if isinstance(value, (list, tuple)) else value

    return [f"{name} {plain(theirs[name])} (the config's model: {plain(ours[name])})" for name in fields
            if theirs.get(name) is not None and ours.get(name) is not None and plain(theirs[name]) != plain(ours[name])]


def check_folder_fits(folder: DiffusersFolder, plan: ConversionPlan, config_name: str = "the config") -> None:
    """Refuse (CheckpointError) a folder whose parts another config describes, naming the first differences."""
    for part, ours, fields in (("unet", plan.unet_config, UNET_FIELDS), ("vae", plan.vae_config, VAE_FIELDS),
                               ("text_encoder", plan.text_config, TEXT_FIELDS)):
        differences = _differences(folder.configs[part], ours, fields)
        if differences:
            hint = ("it is an inpainting model: leave --config out to have the inpainting config chosen, or give "
                    f"{default_config(INPAINTING_CHANNELS)}" if folder.in_channels == INPAINTING_CHANNELS else
                    "give the --config this model was made with")
            raise CheckpointError(f"the {part} of {folder.path} does not fit {config_name}: "
                                  f"{'; '.join(differences[:2])}; {hint}")


def _warn_on_other_constants(folder: DiffusersFolder, plan: ConversionPlan) -> None:
    """The folder's latent scale and noise schedule are not weights: the config's are used, with a warning where
    they differ."""
    latent_scale = folder.configs["vae"].get("scaling_factor")
    keeps_scale = SCALE_FACTOR_KEY in plan.template.state_dict()
    if latent_scale is not None and not keeps_scale and latent_scale != plan.params.get("scale_factor", 1.0):
        logger.warning("the vae of %s has scaling_factor %s: the model is sampled with the config's scale_factor %s",
                       folder.path, latent_scale, plan.params.get("scale_factor", 1.0))
    scheduler = folder.path / "scheduler" / "scheduler_config.json"
    if not scheduler.is_file():
        return
    try:
        theirs = json.loads(scheduler.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return
    ours = {"beta_start": plan.params.get("linear_start"), "beta_end": plan.params.get("linear_end"),
            "num_train_timesteps": plan.params.get("timesteps", 1000), "beta_schedule": SCHEDULE_TYPE}
    differences = _differences(theirs, ours, tuple(ours))
    if differences:
        logger.warning("the scheduler of %s has %s: the model is sampled with the config's noise schedule",
                       folder.path, "; ".join(differences))


def read_part(files: Sequence[os.PathLike]) -> dict[str, torch.Tensor]:
    """The tensors of one part's weight files (shards merged), read weights-only and memory-mapped."""
    tensors: dict[str, torch.Tensor] = {}
    for file in files:
        tensors.update(read_state_dict(file))
    return tensors


def read_diffusers_folder(path: str | os.PathLike, config: Any, config_name: Optional[str] = None
                          ) -> dict[str, torch.Tensor]:
    """The weights of the diffusers folder `path` as our state dict for the model of `config`, in memory: the
    checkpoint a `.ckpt` of this model would hold."""
    folder = inspect_folder(path)
    plan = plan_conversion(config)
    name = config_name or (str(config) if isinstance(config, (str, os.PathLike)) else "the config")
    check_folder_fits(folder, plan, name)
    _warn_on_other_constants(folder, plan)
    parts = {part: read_part(files) for part, files in folder.weights.items()}
    return from_diffusers(parts, plan, folder.configs["vae"].get("scaling_factor"), source=str(folder.path))


def default_config(in_channels: Optional[int]) -> str:
    """The repository's SD v1 inference config, or its inpainting config for a 9-channel UNet."""
    config = REPO_DIR / DEFAULT_CONFIG
    return inpainting_config_beside(config) if in_channels == INPAINTING_CHANNELS else str(config)
