"""The original LDM inpainting script's `--indir` mode (CompVis/latent-diffusion `scripts/inpaint.py`; the
model of Rombach et al. 2022, sec. 4.5, `models/ldm/inpainting_big`): every `NAME.png` of a directory with its
`NAME_mask.png` (white = repaint), inpainted by the concat-conditioned LDM and written to `OUTDIR/NAME.png`.

As the original: the mask is binarised at half brightness, the masked image is `(1 - mask) * image`, the
conditioning is the first stage's (pre-codebook) latent of the masked image concatenated with the mask resized
to the latent by nearest-neighbour interpolation, DDIM runs `steps` steps with eta 0 under the EMA weights, and
the decoded prediction is composited into the mask over the input. Unlike the original, the pixels outside the
mask keep the input's exact values (the original's float round trip and truncation lowered 63 of the 256 levels
by one there), every input is checked before the model loads, and no existing file is overwritten.
"""
from __future__ import annotations

import argparse
import logging
import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np
from PIL import Image, UnidentifiedImageError

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = "models/ldm/inpainting_big/config.yaml"
DEFAULT_CKPT = "models/ldm/inpainting_big/last.ckpt"
DEFAULT_STEPS = 50
MASK_SUFFIX = "_mask.png"
WEIGHTS_HINT = ("download the weights of the original's README: wget -O models/ldm/inpainting_big/last.ckpt "
                "'https://heibox.uni-heidelberg.de/f/4d9ac7ea40c64582b7c9/?dl=1'")


@dataclass(frozen=True)
class InpaintPair:
    """An image, its mask and the name of its output file (the image's file name, as the original)."""

    image: Path
    mask: Path

    @property
    def name(self) -> str:
        return self.image.name


def find_pairs(indir: str | os.PathLike) -> list[InpaintPair]:
    """The image/mask pairs of `indir` in the original's order (masks sorted by path): `NAME_mask.png` are the
    masks, the other `.png` files the images. An image without its mask, a mask without its image, or no pair
    at all is refused."""
    directory = Path(indir)
    if not directory.is_dir():
        what = "is a file, not a directory" if directory.exists() else "not found"
        raise UserInputError(f"--indir {directory} {what}; give the directory of NAME.png and NAME_mask.png pairs")
    files = sorted(path for path in directory.iterdir() if path.name.endswith(".png") and path.is_file())
    masks = [path for path in files if path.name.endswith(MASK_SUFFIX)]
    images = {path.name: path for path in files if not path.name.endswith(MASK_SUFFIX)}
    pairs = []
    for mask in masks:
        image_name = mask.name[:-len(MASK_SUFFIX)] + ".png"
        image = images.pop(image_name, None)
        if image is None:
            raise UserInputError(f"mask {mask} has no image {image_name} in {directory}; add the image or move the "
                                 "mask out of --indir")
        pairs.append(InpaintPair(image=image, mask=mask))
    if images:
        first = next(iter(images.values()))
        more = f" (and {len(images) - 1} more images)" if len(images) > 1 else ""
        raise UserInputError(f"image {first} has no mask {first.stem}{MASK_SUFFIX}{more}; add a mask (white where "
                             "the image is repainted) or move the image out of --indir")
    if not pairs:
        raise UserInputError(f"--indir {directory} has no NAME.png with its NAME_mask.png; put the image-mask "
                             "pairs there (white in the mask marks what to repaint)")
    return pairs


def _read(path: Path, mode: str, what: str) -> np.ndarray:
    """The pixels of `path` converted to `mode` ('RGB' or 'L', as the original: no EXIF orientation, alpha
    dropped), as uint8; an unreadable file is refused."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                return np.array(image.convert(mode))
    except (UnidentifiedImageError, Image.DecompressionBombError, Image.DecompressionBombWarning, OSError,
            SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read {what} {path}: it is not an image PIL can open ({error}); replace or "
                             "remove it") from error


def read_pair(pair: InpaintPair, size_multiple: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """The image (H, W, 3 uint8) and its mask (H, W floats in {0, 1}, 1 = repaint, binarised at 0.5 as the
    original); masks of another size than their image, and sizes the model cannot take, are refused."""
    image = _read(pair.image, "RGB", "image")
    mask = _read(pair.mask, "L", "mask")
    if image.shape[:2] != mask.shape:
        raise UserInputError(f"mask {pair.mask} is {mask.shape[1]}x{mask.shape[0]} but its image {pair.image} is "
                             f"{image.shape[1]}x{image.shape[0]}; make the mask the image's size")
    height, width = mask.shape
    if height % size_multiple or width % size_multiple:
        raise UserInputError(f"image {pair.image} is {width}x{height}; this model needs sides that are multiples "
                             f"of {size_multiple}: crop or resize the image and its mask")
    binary = (mask.astype(np.float32) / 255.0 >= 0.5).astype(np.float32)
    return image, binary


def make_batch(image: np.ndarray, mask: np.ndarray, device: Any) -> dict[str, Any]:
    """The original's batch: image, mask and masked image `(1 - mask) * image`, as [1, C, H, W] in [-1, 1]."""
    import torch

    pixels = torch.from_numpy(image.astype(np.float32)[None].transpose(0, 3, 1, 2) / 255.0)
    mask_tensor = torch.from_numpy(mask[None, None].copy())
    batch = {"image": pixels, "mask": mask_tensor, "masked_image": (1 - mask_tensor) * pixels}
    return {key: value.to(device=device) * 2.0 - 1.0 for key, value in batch.items()}


def inpaint(model: Any, sampler: Any, image: np.ndarray, mask: np.ndarray, steps: int,
            generator: Optional[Any] = None) -> np.ndarray:
    """One inpainted image (H, W, 3 uint8): the original's conditioning, sampling and compositing; pixels outside
    the mask are the input's."""
    import torch
    import torch.nn.functional as F

    batch = make_batch(image, mask, model.device)
    c = model.cond_stage_model.encode(batch["masked_image"])
    c = torch.cat((c, F.interpolate(batch["mask"], size=c.shape[-2:])), dim=1)
    shape = (c.shape[1] - 1, *c.shape[2:])
    samples, _ = sampler.sample(S=steps, conditioning=c, batch_size=c.shape[0], shape=shape, eta=0.0,
                                verbose=False, generator=generator)
    predicted = torch.clamp((model.decode_first_stage(samples) + 1.0) / 2.0, min=0.0, max=1.0)
    source = torch.clamp((batch["image"] + 1.0) / 2.0, min=0.0, max=1.0)
    repaint = torch.clamp((batch["mask"] + 1.0) / 2.0, min=0.0, max=1.0)
    inpainted = (1 - repaint) * source + repaint * predicted
    pixels = (inpainted.float().cpu().numpy().transpose(0, 2, 3, 1)[0] * 255).astype(np.uint8)
    return np.where(mask[..., None] > 0, pixels, image)


def check_model_config(config: Mapping[str, Any], path: str) -> None:
    """The config must describe a concat-conditioned LDM whose conditioning stage is its first stage."""
    params = config.get("params", {}) or {}
    unet = (params.get("unet_config", {}) or {}).get("params", {}) or {}
    channels = int(params.get("channels", 4))
    in_channels = unet.get("in_channels")
    concat = params.get("conditioning_key", "concat" if params.get("concat_mode", True) else "crossattn")
    if (params.get("cond_stage_config") != "__is_first_stage__" or concat != "concat"
            or in_channels != 2 * channels + 1):
        raise UserInputError(f"config {path} is not an LDM inpainting model (cond_stage_config __is_first_stage__, "
                             f"concat conditioning, UNet in_channels 2 * channels + 1); use {DEFAULT_CONFIG}")


def _check_outputs(pairs: list[InpaintPair], outdir: Path) -> None:
    from ldm.cli.common import check_writable_dir

    check_writable_dir(outdir)
    taken = [outdir / pair.name for pair in pairs if (outdir / pair.name).exists()]
    if taken:
        more = f" (and {len(taken) - 1} more)" if len(taken) > 1 else ""
        raise UserInputError(f"{taken[0]} already exists{more}; nothing is overwritten: choose another --outdir or "
                             "move the old results away")


def run_indir(indir: str | os.PathLike, outdir: str | os.PathLike, steps: int = DEFAULT_STEPS,
              config: str | os.PathLike = DEFAULT_CONFIG, ckpt: str | os.PathLike = DEFAULT_CKPT,
              device: str = "auto", seed: Optional[int] = None, use_ema: bool = True, accel: bool = True,
              progress: bool = True) -> list[Path]:
    """Inpaint every pair of `indir` (see `find_pairs`) into `outdir/NAME.png`; returns the files written.

    `steps` DDIM steps (eta 0, as the original); `device` 'auto', 'cpu', 'cuda[:N]' or 'mps'; `seed` None draws
    from torch's global generator (as the original), else pair k (in order) is sampled from a generator seeded
    `seed + k`; `use_ema` samples under the EMA weights (the original's `ema_scope`); `accel` applies
    `ldm.accel.optimize` (a no-op off the CPU or with LDM_ACCEL=0). Every input, the config, the checkpoint's
    presence and the output names are checked before the model loads; files are written atomically and never
    overwrite an existing file. Raises `UserInputError` for any problem with the inputs.
    """
    from ldm.cli.geometry import read_geometry
    from ldm.config_files import read_plain_config

    pairs = find_pairs(indir)
    config_path = str(config)
    whole = read_plain_config(config_path)
    if "model" not in whole:
        raise UserInputError(f"config {config_path} has no 'model' section")
    check_model_config(whole["model"], config_path)
    geometry = read_geometry(whole)
    if not 1 <= steps <= geometry.num_timesteps:
        raise UserInputError(f"--steps must be between 1 and {geometry.num_timesteps} (the model's timesteps), "
                             f"got {steps}")
    for pair in pairs:
        read_pair(pair, geometry.size_multiple)
    output_dir = Path(outdir)
    _check_outputs(pairs, output_dir)
    checkpoint = Path(ckpt)
    if not checkpoint.is_file():
        what = "is a directory" if checkpoint.is_dir() else "not found"
        raise UserInputError(f"checkpoint {what}: {checkpoint}; {WEIGHTS_HINT}, or pass --ckpt PATH")
    logger.info("found %d inputs in %s", len(pairs), indir)
    return _render(pairs, output_dir, steps, whole, str(checkpoint), device, seed, use_ema, accel, progress,
                   geometry.size_multiple)


def _render(pairs: list[InpaintPair], outdir: Path, steps: int, config: Mapping[str, Any], ckpt: str, device: str,
            seed: Optional[int], use_ema: bool, use_accel: bool, progress: bool, size_multiple: int) -> list[Path]:
    import contextlib

    import torch
    from tqdm.auto import tqdm

    from ldm import accel
    from ldm.cli.outputs import save_new
    from ldm.cli.runtime import load_model, select_device
    from ldm.models.diffusion.ddim import DDIMSampler

    torch_device = select_device(device)
    model = load_model(config, ckpt, torch_device)
    if use_accel:
        accel.optimize(model, torch_device)
    sampler = DDIMSampler(model)
    try:
        outdir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise UserInputError(f"cannot create output directory {outdir}: {error.strerror}") from error
    written: list[Path] = []
    scope = model.ema_scope() if use_ema else contextlib.nullcontext()
    try:
        with torch.no_grad(), scope:
            for index, pair in enumerate(tqdm(pairs, desc="Inpainting", disable=not progress)):
                image, mask = read_pair(pair, size_multiple)
                generator = None
                if seed is not None:
                    generator = torch.Generator(device=torch_device).manual_seed((seed + index) % 2 ** 64)
                pixels = inpaint(model, sampler, image, mask, steps, generator)
                target = outdir / pair.name
                try:
                    written.append(save_new(Image.fromarray(pixels), target))
                except FileExistsError as error:
                    raise UserInputError(f"{target} appeared while this run was working; nothing is overwritten: "
                                         "choose another --outdir") from error
    except KeyboardInterrupt:
        print(f"interrupted: {len(written)} of {len(pairs)} inpainted images saved in {outdir}", flush=True)
        raise
    print(f"{len(written)} inpainted image{'s' if len(written) != 1 else ''} written to {outdir}", flush=True)
    return written


def add_indir_arguments(parser: argparse.ArgumentParser) -> None:
    """The original script's flags: --indir, --outdir, --steps (for a parser of this mode alone)."""
    from ldm.cli.common import positive_int

    parser.add_argument("--indir", type=str, required=True,
                        help="dir containing image-mask pairs (`example.png` and `example_mask.png`)")
    parser.add_argument("--outdir", type=str, required=True, help="dir to write results to")
    parser.add_argument("--steps", type=positive_int, default=DEFAULT_STEPS,
                        help="number of ddim sampling steps (default: %(default)s)")
