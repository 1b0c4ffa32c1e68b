"""Device and precision selection, model geometry checks and model loading for the sampling scripts."""
from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import shutil
import sys
from typing import Any, ContextManager, Mapping, Optional, Sequence

import torch

from ldm.checkpoint import load_model_from_config
from ldm.cli.common import DECODE_OVERLAP, DECODE_TILE
from ldm.cli.geometry import ModelGeometry, read_geometry
from ldm.config_files import read_plain_config
from ldm.errors import UserInputError

logger = logging.getLogger(__name__)


def select_device(name: str) -> torch.device:
    """'auto' is CUDA, then MPS, then CPU; an explicit device must be usable."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise UserInputError(f"--device {name!r} is not a device; use auto, cpu, cuda, cuda:N or mps") from error
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserInputError(f"--device {name}: CUDA is not available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserInputError(f"--device {name}: there are only {torch.cuda.device_count()} CUDA devices")
    elif device.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"--device {name}: MPS is not available on this machine; use --device cpu")
    elif device.type not in ("cpu", "cuda", "mps"):
        raise UserInputError(f"--device {name}: use auto, cpu, cuda, cuda:N or mps")
    return device


def precision_context(precision: str, device: torch.device) -> ContextManager:
    """The context the model runs in: 'autocast' is fp16 autocast on CUDA (as the original) and fp32
    elsewhere, 'fp16' fp16 autocast (CUDA only), 'bf16' bf16 autocast, 'full' fp32."""
    if precision == "full" or (precision == "autocast" and device.type != "cuda"):
        return contextlib.nullcontext()
    if precision in ("autocast", "fp16"):
        if device.type != "cuda":
            raise UserInputError(f"--precision fp16 needs a CUDA device, not {device.type}; use full or bf16")
        return torch.autocast("cuda", dtype=torch.float16)
    if precision == "bf16":
        if device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise UserInputError("--precision bf16: this GPU does not support bfloat16; use autocast")
        if device.type not in ("cuda", "cpu"):
            raise UserInputError(f"--precision bf16 is supported on CUDA and CPU, not {device.type}; use full")
        return torch.autocast(device.type, dtype=torch.bfloat16)
    raise UserInputError(f"unknown --precision {precision!r}")


def load_checked_config(opt: argparse.Namespace) -> tuple[dict[str, Any], ModelGeometry]:
    """Read --config and check --C, --f and --ddim_steps against the model it describes; with --demo,
    --f and --C are taken from the config instead."""
    config = read_plain_config(opt.config)
    if "model" not in config:
        raise UserInputError(f"config {opt.config} has no 'model' section")
    geometry = read_geometry(config)
    if opt.demo:
        opt.f, opt.C = geometry.factor, geometry.latent_channels
    if opt.f != geometry.factor:
        raise UserInputError(f"--f {opt.f} does not match the model of {opt.config}, whose autoencoder "
                             f"downsamples by {geometry.factor}")
    if opt.C != geometry.latent_channels:
        raise UserInputError(f"--C {opt.C} does not match the model of {opt.config}, which has "
                             f"{geometry.latent_channels} latent channels")
    if opt.ddim_steps > geometry.num_timesteps:
        raise UserInputError(f"--ddim_steps must be at most {geometry.num_timesteps} (the model's timesteps), "
                             f"got {opt.ddim_steps}")
    return config, geometry


def check_image_size(geometry: ModelGeometry, H: int, W: int) -> None:
    """H and W must be positive multiples of what the model's autoencoder and UNet downsample by."""
    for name, value in (("H", H), ("W", W)):
        if value < geometry.size_multiple or value % geometry.size_multiple:
            raise UserInputError(f"--{name} must be a multiple of {geometry.size_multiple} for this model, got "
                                 f"{value}")


def check_fits_device(opt: argparse.Namespace, geometry: ModelGeometry, H: int, W: int) -> None:
    """Refuse an image the device cannot hold at this batch, or one above --max_pixels, before the model loads."""
    from ldm.cli.memory import SizeRequest, available_bytes, check_size_fits, checkpoint_bytes

    device = select_device(opt.device)
    half = opt.precision in WEIGHT_DTYPES or (opt.precision == "autocast" and device.type == "cuda")
    tile_side = DECODE_TILE * geometry.factor
    request = SizeRequest(height=H, width=W, n_samples=1 if opt.seed_per_sample else opt.n_samples,
                          guided=opt.scale != 1.0, element_size=2 if half else 4,
                          decode_tile_pixels=tile_side ** 2 if opt.tiled_decode else None)
    on_device_weights = not (opt.lowvram and device.type != "cpu")
    check_size_fits(request, geometry, opt.max_pixels, device,
                    None if opt.max_pixels is not None else available_bytes(device),
                    checkpoint_bytes(opt.ckpt) if on_device_weights else 0)


WEIGHT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def load_model(config: Mapping[str, Any], ckpt: str, device: torch.device,
               embedding_paths: Optional[Sequence[str]] = None, precision: str = "full") -> Any:
    """The model of `config` with the weights of `ckpt` on `device`, with textual-inversion embeddings attached.
    With precision 'fp16' or 'bf16' the weights are stored in that type (the noise schedule stays float32);
    otherwise in float32, as the original keeps them under autocast. `ckpt` may be a diffusers folder, converted
    in memory (ldm.diffusers_loading)."""
    logger.info("loading model from %s", ckpt)
    weights: Any = ckpt
    if os.path.isdir(ckpt):
        from ldm.diffusers_loading import read_diffusers_folder

        weights = read_diffusers_folder(ckpt, config, config_name="the model of --config")
    model = load_model_from_config(config, weights, device=device, dtype=WEIGHT_DTYPES.get(precision))
    if embedding_paths:
        try:
            from ldm.modules.embedding_manager import attach_embeddings
        except ImportError as error:
            raise UserInputError("--embedding_path is not available: this installation has no "
                                 f"ldm.modules.embedding_manager.attach_embeddings ({error})") from error
        placeholders = attach_embeddings(model, list(embedding_paths))
        logger.info("textual-inversion embeddings loaded; the prompt may use %s", ", ".join(placeholders))
    return model


def check_compile_available(device: torch.device) -> None:
    """torch.compile's code generator for `device` must be installed: a C++ compiler for the CPU, Triton for CUDA."""
    if device.type == "cpu":
        compiler = os.environ.get("CXX") or {"win32": "cl", "darwin": "clang++"}.get(sys.platform, "g++")
        if shutil.which(compiler) is None:
            raise UserInputError(f"--compile on the CPU needs a C++ compiler and {compiler!r} is not on the PATH; "
                                 "install one (or name it in $CXX), or leave out --compile")
    elif device.type == "cuda" and importlib.util.find_spec("triton") is None:
        raise UserInputError("--compile on CUDA needs Triton (pip install triton), or leave out --compile")


def compile_unet(model: Any) -> None:
    """Compile the UNet in place with torch.compile; the compilation itself happens at the first sampling step."""
    try:
        model.model.diffusion_model.compile()
    except RuntimeError as error:
        raise UserInputError(f"--compile: torch.compile is not available here: {error}") from error
    logger.info("the UNet compiles at the first sampling step: expect a few minutes before it starts")


def enable_tiled_decode(model: Any) -> None:
    """Decode latents in overlapping tiles of DECODE_TILE latent pixels, so large images decode in the memory
    of a 512x512 decode."""
    first_stage = model.first_stage_model
    if not callable(getattr(first_stage, "enable_tiling", None)):
        raise UserInputError(f"--tiled_decode: this model's autoencoder ({type(first_stage).__name__}) cannot "
                             "decode in tiles")
    first_stage.enable_tiling(tile_size=DECODE_TILE, overlap=DECODE_OVERLAP)
