#!/usr/bin/env python
"""Inpainting and outpainting with Stable Diffusion v1, and the original LDM inpainting script.

Stable Diffusion (any v1 checkpoint, or a 9-channel inpainting checkpoint, which is recognised by its weights):

    python scripts/inpaint.py --prompt "a red square on a blue background" --init-img photo.png --mask mask.png
    python scripts/inpaint.py --prompt "a mountain lake at dawn" --init-img photo.png --outpaint 0,0,256,0

The mask is white where the image is repainted (without --mask: the init image's transparent pixels). With a
text-to-image checkpoint the masked region is sampled while the rest of the latent is replaced at every step
by the init latent noised to that step (the original samplers' mask/x0, Lugmayr et al. 2022, RePaint); a
9-channel inpainting checkpoint is conditioned on the mask and the masked image instead. Either way the
pixels outside the mask are the input's (the result is composited back, feathered by --mask_blur inwards).
--outpaint grows the canvas by LEFT,TOP,RIGHT,BOTTOM pixels and repaints the new border.

The original LDM inpainting script (the model of models/ldm/inpainting_big, a VQ autoencoder and concat
conditioning): every NAME.png in --indir with its NAME_mask.png, written to --outdir:

    python scripts/inpaint.py --indir data/inpainting_examples --outdir outputs/inpainting_results --steps 50
"""
from __future__ import annotations

import argparse
import sys
from typing import Any, Optional, Sequence

from ldm.cli.common import (
    CliArgumentParser,
    OriginalDefaults,
    add_common_arguments,
    add_original_sampling_arguments,
    check_checkpoint_exists,
    check_common_arguments,
    check_writable_dir,
    configure_logging,
    non_negative_int,
    positive_int,
    read_prompt_batches,
    resolve_model_paths,
    resolve_sampler,
    run_cli,
    seed_everything,
    unit_float,
)
from ldm.demo import DEMO_INPAINTING_CHECKPOINT, DEMO_INPAINTING_CONFIG
from ldm.errors import UserInputError

DEFAULT_OUTDIR = "outputs/inpainting-samples"
LDM_INPAINTING_CONFIG = "models/ldm/inpainting_big/config.yaml"
LDM_INPAINTING_CKPT = "models/ldm/inpainting_big/last.ckpt"
SD_ONLY_FLAGS = ("init_img", "mask", "outpaint", "invert_mask", "lora", "vae")


def _add_image_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-img", type=str, nargs="?", default=None,
                        help="the image to repaint (any format PIL reads; EXIF orientation is applied)")
    parser.add_argument("--mask", type=str, default=None,
                        help="the mask: white where the image is repainted, black where it is kept (any image, "
                             "binarised at half brightness, resized to the image if needed); default: the init "
                             "image's transparent pixels")
    parser.add_argument("--invert_mask", action="store_true", help="repaint the black part of the mask instead")
    parser.add_argument("--mask_blur", type=non_negative_int, default=4, metavar="PIXELS",
                        help="feather the seam over this many pixels inside the mask; pixels outside the mask "
                             "always keep the input's values (default: %(default)s)")
    parser.add_argument("--outpaint", type=str, default=None, metavar="LEFT,TOP,RIGHT,BOTTOM",
                        help="grow the canvas by these many pixels (multiples of 8) and paint the new border")


def _add_strength_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strength", type=unit_float, default=1.0,
                        help="how much of the masked region's content is replaced: 1.0 repaints it from noise, "
                             "lower values keep its composition (the masked region is noised to step "
                             "int(strength * ddim_steps), as img2img) (default: %(default)s)")


def _add_indir_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("the original LDM inpainting script (models/ldm/inpainting_big)")
    group.add_argument("--indir", type=str, default=None,
                       help="dir containing image-mask pairs (`example.png` and `example_mask.png`); selects the "
                            "original LDM inpainting model")
    group.add_argument("--steps", type=positive_int, default=None,
                       help="number of ddim sampling steps of the --indir mode (default: 50)")


def build_parser() -> argparse.ArgumentParser:
    """The flags of txt2img/img2img where they apply, the mask and outpaint flags, and the original LDM script's."""
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OriginalDefaults(
        n_iter=1, n_samples=1, scale=7.5, outdir_help=f"dir to write results to (default: {DEFAULT_OUTDIR})",
        help={"ddim_steps": "number of sampling steps, for every sampler (default: %(default)s)"})
    add_original_sampling_arguments(parser, defaults, after={"prompt": _add_image_arguments,
                                                             "scale": _add_strength_argument})
    add_common_arguments(parser)
    _add_indir_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed and checked arguments: the --indir mode or the Stable Diffusion mode."""
    opt = build_parser().parse_args(argv)
    if opt.indir is not None:
        given = [f"--{name.replace('_', '-' if name == 'init_img' else '_')}" for name in SD_ONLY_FLAGS
                 if getattr(opt, name)]
        if given:
            raise UserInputError(f"--indir runs the original LDM script on the pairs in that directory; "
                                 f"{', '.join(given)} belong to Stable Diffusion inpainting: give one or the other")
        if opt.demo:
            raise UserInputError("--demo has no LDM inpainting model; drop --indir to inpaint with the demo model")
        opt.steps = opt.steps or 50
        return opt
    if opt.steps is not None:
        raise UserInputError("--steps belongs to the --indir mode; give the number of steps with --ddim_steps")
    opt.config_given = opt.config is not None
    if opt.demo and opt.config is None and opt.ckpt is None and DEMO_INPAINTING_CHECKPOINT.is_file():
        opt.config, opt.ckpt, opt.config_given = str(DEMO_INPAINTING_CONFIG), str(DEMO_INPAINTING_CHECKPOINT), True
    resolve_model_paths(opt, DEFAULT_OUTDIR)
    opt.sampler = resolve_sampler(opt)
    if not opt.init_img:
        raise UserInputError("give the image to repaint with --init-img PATH (and the region with --mask PATH)")
    if opt.fixed_code:
        raise UserInputError("--fixed_code is not available for inpainting: every batch draws its own noise "
                             "(use --seed_per_sample to re-render one sample)")
    if opt.outpaint is not None:
        from ldm.cli.masks import parse_outpaint

        opt.outpaint = parse_outpaint(opt.outpaint)
    check_common_arguments(opt)
    return opt


def run_indir(opt: argparse.Namespace) -> None:
    """The original LDM inpainting script's loop (ldm.cli.inpaint_indir)."""
    from ldm.cli.inpaint_indir import run_indir as run

    run(opt.indir, opt.outdir or DEFAULT_OUTDIR, steps=opt.steps, config=opt.config or LDM_INPAINTING_CONFIG,
        ckpt=opt.ckpt or LDM_INPAINTING_CKPT, device=opt.device, seed=opt.seed, accel=not opt.no_accel)


def load_image_and_mask(opt: argparse.Namespace) -> tuple[Any, Any]:
    """The init image (RGB) and its mask (1 = repaint) at the image's size, outpainting border included."""
    import numpy as np

    from ldm.cli.images import open_init_image
    from ldm.cli.masks import (
        check_something_to_repaint,
        fit_mask,
        open_mask,
        outpaint_canvas,
        transparency_mask,
    )

    image = open_init_image(opt.init_img)
    if opt.mask:
        mask = open_mask(opt.mask)
    else:
        mask = transparency_mask(opt.init_img)
        if mask is None:
            if opt.outpaint is None:
                raise UserInputError(f"no mask: give --mask PATH (white = repaint), or an init image with "
                                     f"transparent pixels to repaint; {opt.init_img} has none")
            mask = np.zeros((image.height, image.width), dtype=np.float32)
    mask, note = fit_mask(mask, image.size)
    if note:
        print(note, flush=True)
    if opt.invert_mask:
        mask = 1.0 - mask
    if opt.outpaint is not None:
        image, mask = outpaint_canvas(image, mask, opt.outpaint)
    check_something_to_repaint(mask)
    return image, mask


def resize_images(images: Any, size: tuple[int, int]) -> Any:
    """Images (N, H, W, 3) in [0, 1] at `size` (width, height), Lanczos, as the input was fitted to the model."""
    import numpy as np
    from PIL import Image

    if images.shape[2] == size[0] and images.shape[1] == size[1]:
        return images
    return np.stack([np.asarray(Image.fromarray((255 * image).round().astype(np.uint8)).resize(size, Image.LANCZOS),
                                dtype=np.float32) / 255.0 for image in images])


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = parse_args(argv)
    configure_logging()
    if opt.indir is not None:
        run_indir(opt)
        return
    batches = read_prompt_batches(opt.prompt, opt.from_file, opt.n_samples)
    check_writable_dir(opt.outdir)
    check_checkpoint_exists(opt)
    image, mask = load_image_and_mask(opt)

    import numpy as np
    import torch
    from PIL import Image

    from ldm.cli.images import fit_to_multiple, image_to_tensor, to_unit_images
    from ldm.cli.loop import render_batches
    from ldm.cli.masks import composite, feather
    from ldm.cli.runtime import check_fits_device, load_checked_config
    from ldm.cli.session import open_session
    from ldm.inpainting_checkpoint import select_config
    from ldm.models.diffusion.inpainting import inpaint, is_inpainting_model

    opt.config = select_config(opt.config if opt.config_given else None, opt.ckpt, default_config=opt.config)
    config, geometry = load_checked_config(opt)
    work_image, note = fit_to_multiple(image, geometry.size_multiple)
    if note:
        print(note.replace("init image", "image"), flush=True)
    width, height = work_image.size
    work_mask = np.asarray(Image.fromarray((mask * 255).astype(np.uint8)).resize((width, height), Image.NEAREST),
                           dtype=np.float32) / 255.0
    check_fits_device(opt, geometry, height, width)
    session = open_session(opt, config)
    model, sampler, device = session.model, session.sampler, session.device
    original = np.asarray(image, dtype=np.float32) / 255.0
    weights = feather(mask, opt.mask_blur)
    pixels = image_to_tensor(work_image).to(device)
    repaint = torch.from_numpy(work_mask)[None, None].to(device)
    sampler_options = {"eta": opt.ddim_eta} if opt.sampler == "ddim" else {}

    def render(prompts: list[str], alone: bool) -> np.ndarray:
        with session.precision():
            samples = inpaint(model, sampler, pixels, repaint, prompts, opt.ddim_steps, opt.scale,
                              opt.negative_prompt, opt.strength, geometry.factor,
                              encode_prompts=session.conditioning, **sampler_options)
            decoded = to_unit_images(model.decode_first_stage(samples))
        return composite(original, resize_images(decoded, image.size), weights)

    seed_everything(opt.seed)
    fields = {"Mask blur": opt.mask_blur, "Denoising strength": opt.strength,
              "Outpaint": ",".join(map(str, opt.outpaint)) if opt.outpaint else None,
              "Inpainting model": True if is_inpainting_model(model) else None}
    render_batches(session, batches, render, image.size, fields)


if __name__ == "__main__":
    sys.exit(run_cli(main))
