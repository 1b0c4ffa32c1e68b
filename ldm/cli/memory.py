"""Whether an image size fits the device, estimated before the model loads.

A sampling run's peak is the checkpoint's weights plus the larger of two activation peaks: the UNet's (its
widest level holds `model_channels` features per latent pixel, for every row of the guided batch) and the
autoencoder decoder's (its last level holds `ch` features per image pixel, for every sample). Both grow
linearly with the pixels: the attention is scaled-dot-product attention, which never holds the scores. The
per-channel factors below were measured on Stable Diffusion v1's UNet and decoder (docs/sampling.md); they
scale with the widths of the configured model and with the activations' element size.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

import torch

from ldm.cli.geometry import ModelGeometry
from ldm.diffusers_folder import inspect_folder, is_diffusers_folder
from ldm.errors import CheckpointError, UserInputError

UNET_ELEMENTS_PER_LATENT_PIXEL_PER_CHANNEL = 26  # per row of the UNet's batch (a guided sample is two rows)
DECODER_ELEMENTS_PER_PIXEL_PER_CHANNEL = 5  # per sample, for a decode of the whole image at once
GIB = 2 ** 30


@dataclass(frozen=True)
class SizeRequest:
    """What a run asks of the device: an image size, a batch and how it is computed."""

    height: int
    width: int
    n_samples: int
    guided: bool  # classifier-free guidance doubles the UNet's batch
    element_size: int  # bytes of one activation: 4 in float32, 2 in fp16/bf16
    decode_tile_pixels: Optional[int] = None  # image pixels of one decoder tile with --tiled_decode


def activation_bytes_per_pixel(request: SizeRequest, geometry: ModelGeometry) -> tuple[float, float]:
    """(UNet bytes per image pixel, decoder bytes per image pixel) of the whole batch."""
    rows = request.n_samples * (2 if request.guided else 1)
    unet = (UNET_ELEMENTS_PER_LATENT_PIXEL_PER_CHANNEL * geometry.unet_channels * rows * request.element_size
            / geometry.factor ** 2)
    decoder = (DECODER_ELEMENTS_PER_PIXEL_PER_CHANNEL * geometry.decoder_channels * request.n_samples
               * request.element_size)
    return unet, decoder


def peak_bytes(request: SizeRequest, pixels: int, geometry: ModelGeometry, weight_bytes: int) -> float:
    """Estimated peak memory of a run at `pixels` image pixels."""
    unet, decoder = activation_bytes_per_pixel(request, geometry)
    decoded = pixels if request.decode_tile_pixels is None else min(pixels, request.decode_tile_pixels)
    return weight_bytes + max(unet * pixels, decoder * decoded)


def largest_pixels(request: SizeRequest, available: int, geometry: ModelGeometry, weight_bytes: int) -> int:
    """The most image pixels whose estimated peak fits in `available` bytes (0 if none does)."""
    unet, decoder = activation_bytes_per_pixel(request, geometry)
    room = available - weight_bytes
    if room <= 0:
        return 0
    if request.decode_tile_pixels is None:
        return int(room / max(unet, decoder))
    if decoder * request.decode_tile_pixels > room:
        return int(room / decoder)
    return int(room / unet)


def available_bytes(device: torch.device) -> Optional[int]:
    """Memory a run on `device` can use now, or None where this cannot be read."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    if device.type == "mps":
        recommended = getattr(getattr(torch, "mps", None), "recommended_max_memory", None)
        return int(recommended()) if callable(recommended) else None
    return _host_available_bytes()


def _host_available_bytes() -> Optional[int]:
    """MemAvailable plus free swap (Linux); otherwise psutil's figure when it is installed."""
    try:
        with open("/proc/meminfo", encoding="ascii") as meminfo:
            fields = {line.split(":")[0]: int(line.split()[1]) * 1024 for line in meminfo if line.strip()}
        return fields["MemAvailable"] + fields.get("SwapFree", 0)
    except (OSError, KeyError, ValueError, IndexError):
        pass
    try:
        import psutil
    except ImportError:
        return None
    memory = psutil.virtual_memory()
    return int(memory.available + psutil.swap_memory().free)


def check_size_fits(request: SizeRequest, geometry: ModelGeometry, max_pixels: Optional[int], device: torch.device,
                    available: Optional[int], weight_bytes: int) -> None:
    """Refuse an image larger than `max_pixels`, or, when that is None, than the device's `available` memory
    holds by the estimate; the message gives the largest square size that fits."""
    pixels = request.height * request.width
    asked = f"--H {request.height} --W {request.width}"
    if max_pixels is not None:
        if pixels > max_pixels:
            raise UserInputError(f"{asked} is {pixels:,} pixels, more than --max_pixels {max_pixels:,}; "
                                 f"{_square_hint(max_pixels, geometry.size_multiple)}")
        return
    if available is None:
        return
    limit = largest_pixels(request, available, geometry, weight_bytes)
    if pixels <= limit:
        return
    need = peak_bytes(request, pixels, geometry, weight_bytes)
    remedies = "lower --n_samples" if request.n_samples > 1 else ""
    if request.decode_tile_pixels is None:
        remedies += (", " if remedies else "") + "add --tiled_decode"
    raise UserInputError(
        f"{asked} with --n_samples {request.n_samples} needs about {need / GIB:,.1f} GiB and the {device.type} has "
        f"{available / GIB:.1f} GiB free: {_square_hint(limit, geometry.size_multiple)}"
        f"{'; or ' + remedies if remedies else ''}; --max_pixels N overrides this estimate")


def _square_hint(pixels: int, multiple: int) -> str:
    side = math.isqrt(max(pixels, 0)) // multiple * multiple
    if side < multiple:
        return "not even the smallest image fits"
    return f"the largest square image that fits is --H {side} --W {side} ({pixels:,} pixels in all)"


def checkpoint_bytes(path: str) -> int:
    """The size of a checkpoint file, or of a diffusers folder's weight files: what the weights take once loaded,
    give or take their dtype."""
    try:
        return inspect_folder(path).weight_bytes() if is_diffusers_folder(path) else os.path.getsize(path)
    except (OSError, CheckpointError):
        return 0
