"""Telling a 9-channel inpainting checkpoint from a 4-channel text-to-image one, and choosing the config that fits.

The inpainting UNet of Stable Diffusion (RunwayML's sd-v1-5-inpainting, Stability's 512-inpainting-ema) has
exactly the keys of SD v1; only its first convolution, `model.diffusion_model.input_blocks.0.0.weight`, takes
9 input channels instead of 4 (the noisy latent, the mask at latent size, the masked image's latent: see
`ldm.models.diffusion.ddpm.LatentInpaintDiffusion`). That tensor's shape is read without loading the weights:
from the JSON header of a `.safetensors` file, from a memory-mapped `.ckpt`, or from a state dict.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Optional

import torch

from ldm.checkpoint import model_config_section, read_checkpoint
from ldm.diffusers_folder import inspect_folder, is_diffusers_folder
from ldm.errors import CheckpointError
from ldm.safetensors_mmap import SafetensorsFormatError, read_header

INPUT_CONV_KEY = "model.diffusion_model.input_blocks.0.0.weight"
EMA_INPUT_CONV_KEY = "model_ema.diffusion_modelinput_blocks00weight"  # LitEma's name: the key without dots
TEXT_TO_IMAGE_CHANNELS = 4
INPAINTING_CHANNELS = 9  # 4 latent + 1 mask + 4 masked-image latent
DEFAULT_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
INPAINTING_CONFIG_NAME = "v1-inpainting-inference.yaml"

Checkpoint = str | os.PathLike | Mapping[str, Any]


def _is_safetensors(path: Path) -> bool:
    """The safetensors layout: an 8-byte header length, then a JSON object."""
    with open(path, "rb") as handle:
        head = handle.read(9)
    return len(head) == 9 and head[8:9] == b"{"


def checkpoint_input_channels(ckpt: Checkpoint) -> Optional[int]:
    """Input channels of the checkpoint's UNet (4 for text-to-image, 9 for inpainting), or None when it has no
    `model.diffusion_model.input_blocks.0.0.weight` (not a Stable Diffusion checkpoint).

    `ckpt` is a path (`.safetensors`: only the header is read; `.ckpt`: unpickled weights-only and memory-mapped,
    so the weights are not read; a diffusers folder: its unet/config.json) or a state dict (a Lightning checkpoint dict with `state_dict` works too).
    Raises `CheckpointError` for a missing or unreadable file."""
    if isinstance(ckpt, Mapping):
        state = ckpt.get("state_dict", ckpt)
        tensor = state.get(INPUT_CONV_KEY) if isinstance(state, Mapping) else None
        return int(tensor.shape[1]) if isinstance(tensor, torch.Tensor) and tensor.ndim == 4 else None
    path = Path(ckpt)
    if is_diffusers_folder(path):
        return inspect_folder(path).in_channels
    if path.is_file() and path.stat().st_size > 0 and _is_safetensors(path):
        try:
            header, _, _ = read_header(path)
        except SafetensorsFormatError as error:
            raise CheckpointError(f"cannot read {path}: {error}; download it again") from error
        entry = header.get(INPUT_CONV_KEY)
        shape = entry.get("shape") if isinstance(entry, dict) else None
        return int(shape[1]) if isinstance(shape, list) and len(shape) == 4 else None
    return checkpoint_input_channels(read_checkpoint(path))


def config_input_channels(config: Any) -> Optional[int]:
    """`in_channels` of the UNet a config builds (a path, a whole config or its `model` section), or None when the
    config has no `unet_config`."""
    section = model_config_section(config)
    params = (section.get("params") or {}) if isinstance(section, Mapping) else {}
    unet = params.get("unet_config") or {}
    channels = (unet.get("params") or {}).get("in_channels")
    return int(channels) if channels is not None else None


def inpainting_config_beside(config: str | os.PathLike) -> str:
    """The inpainting config in the folder of the text-to-image config `config`
    (configs/stable-diffusion/v1-inpainting-inference.yaml beside v1-inference.yaml)."""
    return str(Path(config).with_name(INPAINTING_CONFIG_NAME))


def _mismatch_message(config_name: str, config_channels: int, ckpt_name: str, ckpt_channels: int) -> str:
    if ckpt_channels == INPAINTING_CHANNELS:
        return (f"{ckpt_name} is an inpainting checkpoint (its UNet takes {ckpt_channels} input channels: latent, "
                f"mask and masked-image latent) but the config {config_name} builds a UNet with {config_channels}; "
                f"pass --config {inpainting_config_beside(DEFAULT_CONFIG)} (or leave --config out to have it "
                "chosen)")
    if config_channels == INPAINTING_CHANNELS:
        return (f"{ckpt_name} is a text-to-image checkpoint (its UNet takes {ckpt_channels} input channels) but the "
                f"config {config_name} builds a {config_channels}-channel inpainting UNet; pass --config "
                f"{DEFAULT_CONFIG} with this checkpoint, or use an inpainting checkpoint (sd-v1-5-inpainting.ckpt) "
                "with this config")
    return (f"{ckpt_name} has a UNet with {ckpt_channels} input channels but the config {config_name} builds one "
            f"with {config_channels}; give the config that was made for this checkpoint")


def check_inpainting_config(config: Any, ckpt: Checkpoint, config_name: Optional[str] = None,
                            ckpt_name: Optional[str] = None) -> None:
    """Raise `CheckpointError` (a `UserInputError`: one line from the command lines) when the UNet of `config` and
    that of `ckpt` take different numbers of input channels (a 4-channel config with a 9-channel inpainting
    checkpoint, or the reverse), naming both and the fix. Nothing is checked when either side does not say."""
    config_channels = config_input_channels(config)
    if config_channels is None:
        return
    ckpt_channels = checkpoint_input_channels(ckpt)
    if ckpt_channels is None or ckpt_channels == config_channels:
        return
    config_name = config_name or (str(config) if isinstance(config, (str, os.PathLike)) else "the given config")
    ckpt_name = ckpt_name or (str(ckpt) if isinstance(ckpt, (str, os.PathLike)) else "the checkpoint")
    raise CheckpointError(_mismatch_message(config_name, config_channels, ckpt_name, ckpt_channels))


def select_config(config: Optional[str | os.PathLike], ckpt: Checkpoint,
                  default_config: str | os.PathLike = DEFAULT_CONFIG) -> str:
    """The config to build `ckpt`'s model with. Without an explicit `config`: `default_config`, or the inpainting
    config beside it (v1-inpainting-inference.yaml) when `ckpt` is a 9-channel inpainting checkpoint. An explicit
    `config` is returned as it is, after `check_inpainting_config` (which raises when they disagree)."""
    if config is not None:
        check_inpainting_config(config, ckpt)
        return str(config)
    if checkpoint_input_channels(ckpt) == INPAINTING_CHANNELS:
        return inpainting_config_beside(default_config)
    return str(default_config)
