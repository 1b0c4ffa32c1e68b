"""What a latent diffusion config says about image sizes, read without building the model."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ldm.checkpoint import model_config_section


@dataclass(frozen=True)
class ModelGeometry:
    """Autoencoder factor, latent channels, size multiple, T, training size, and the widths that set how much
    memory a pixel costs: the UNet's first level and the decoder's last (full-resolution) level."""

    factor: int
    latent_channels: int
    size_multiple: int
    num_timesteps: int
    image_size: int  # the training resolution in pixels: the latent image_size times the factor
    unet_channels: int = 320
    decoder_channels: int = 128


def read_geometry(config: Mapping[str, Any]) -> ModelGeometry:
    """The geometry of a latent diffusion config (entries it lacks fall back to Stable Diffusion's)."""
    params = model_config_section(config).get("params", {}) or {}
    first_stage = (params.get("first_stage_config", {}) or {}).get("params", {}) or {}
    ddconfig = first_stage.get("ddconfig", {}) or {}
    ch_mult = ddconfig.get("ch_mult", [1, 2, 4, 4])
    unet = (params.get("unet_config", {}) or {}).get("params", {}) or {}
    channel_mult = unet.get("channel_mult", [1, 2, 4, 4])
    factor = 2 ** (len(ch_mult) - 1)
    return ModelGeometry(factor=factor, latent_channels=int(params.get("channels", 4)),
                         size_multiple=factor * 2 ** (len(channel_mult) - 1),
                         num_timesteps=int(params.get("timesteps", 1000)),
                         image_size=factor * int(params.get("image_size", 64)),
                         unet_channels=int(unet.get("model_channels", 320)) * int(channel_mult[0]),
                         decoder_channels=int(ddconfig.get("ch", 128)) * int(ch_mult[0]))
