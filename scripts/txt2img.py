#!/usr/bin/env python
"""Text to image with Stable Diffusion v1: the flags of the original CompVis `scripts/txt2img.py`, and more.

    python scripts/txt2img.py --prompt "a photograph of an astronaut riding a horse" --plms

With the same seed, flags and device, the noise is drawn in the original's order, so the images match it.
"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ldm.cli.common import (
    CliArgumentParser,
    LAION_CKPT,
    LAION_CONFIG,
    LAION_OUTDIR,
    OriginalDefaults,
    add_common_arguments,
    add_original_sampling_arguments,
    check_checkpoint_exists,
    check_common_arguments,
    check_writable_dir,
    configure_logging,
    positive_int,
    read_prompt_batches,
    resolve_model_paths,
    resolve_sampler,
    run_cli,
    seed_everything,
)

DEFAULT_OUTDIR = "outputs/txt2img-samples"
DEFAULT_SIZE = 512


def _add_laion_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--laion400m", action="store_true",
                        help=f"use the LAION-400M latent diffusion model ({LAION_CONFIG}, {LAION_CKPT})")


def _add_size_arguments(parser: argparse.ArgumentParser) -> None:
    for name, what in (("H", "height"), ("W", "width")):
        parser.add_argument(f"--{name}", type=positive_int, default=None,
                            help=f"image {what}, in pixel space (default: {DEFAULT_SIZE}; with --demo the demo "
                                 "model's)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the original script's flags (same names, defaults and meaning) and the additions."""
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OriginalDefaults(
        n_iter=2, n_samples=3, scale=7.5,
        outdir_help=f"dir to write results to (default: {DEFAULT_OUTDIR}, or {LAION_OUTDIR} with --laion400m)")
    add_original_sampling_arguments(parser, defaults,
                                    after={"plms": _add_laion_argument, "n_iter": _add_size_arguments})
    add_common_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed and checked arguments, with --demo, --laion400m and the sampler flags resolved."""
    opt = build_parser().parse_args(argv)
    resolve_model_paths(opt, DEFAULT_OUTDIR)
    if not opt.demo:
        opt.H, opt.W = opt.H or DEFAULT_SIZE, opt.W or DEFAULT_SIZE
    opt.sampler = resolve_sampler(opt)
    check_common_arguments(opt)
    return opt


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = parse_args(argv)
    configure_logging()
    batches = read_prompt_batches(opt.prompt, opt.from_file, opt.n_samples)
    check_writable_dir(opt.outdir)
    check_checkpoint_exists(opt)

    import torch

    from ldm.cli.images import to_unit_images
    from ldm.cli.loop import render_batches
    from ldm.cli.runtime import check_fits_device, check_image_size, load_checked_config
    from ldm.cli.session import open_session

    config, geometry = load_checked_config(opt)
    opt.H, opt.W = opt.H or geometry.image_size, opt.W or geometry.image_size
    check_image_size(geometry, opt.H, opt.W)
    check_fits_device(opt, geometry, opt.H, opt.W)
    session = open_session(opt, config)
    model, sampler = session.model, session.sampler
    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]

    def render(prompts: list[str], alone: bool) -> torch.Tensor:
        x_T = None if alone or start_code is None else start_code[:len(prompts)]
        with session.precision():
            c, uc = session.conditioning(prompts, len(prompts) * [opt.negative_prompt] if opt.scale != 1.0 else None)
            samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(prompts), shape=shape,
                                        verbose=True, unconditional_guidance_scale=opt.scale,
                                        unconditional_conditioning=uc, eta=opt.ddim_eta, x_T=x_T)
            return to_unit_images(model.decode_first_stage(samples))

    # Seeded once the model is loaded, so that loading cannot shift the stream. On CUDA this gives the start
    # codes of the original, which seeds before loading (its CPU-side weight initialisation leaves the CUDA
    # generator alone).
    seed_everything(opt.seed)
    start_code = None
    if opt.fixed_code:
        start_code = torch.randn([opt.n_samples, *shape], device=session.device)

    render_batches(session, batches, render, (opt.W, opt.H), {})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
