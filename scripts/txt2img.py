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
    add_common_arguments,
    LAION_CKPT,
    LAION_CONFIG,
    LAION_OUTDIR,
    SD_CKPT,
    SD_CONFIG,
    check_checkpoint_exists,
    check_common_arguments,
    check_writable_dir,
    configure_logging,
    non_negative_float,
    non_negative_int,
    positive_int,
    read_prompt_batches,
    resolve_model_paths,
    resolve_sampler,
    run_cli,
    seed_everything,
    seed_int,
)

DEFAULT_OUTDIR = "outputs/txt2img-samples"
DEFAULT_SIZE = 512


def build_parser() -> argparse.ArgumentParser:
    """The command line: the original script's flags (same names, defaults and meaning) and the additions."""
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompt", type=str, nargs="?", default="a painting of a virus monster playing guitar",
                        help="the prompt to render (default: %(default)r)")
    parser.add_argument("--outdir", type=str, nargs="?", default=None,
                        help=f"dir to write results to (default: {DEFAULT_OUTDIR}, or {LAION_OUTDIR} with --laion400m)")
    parser.add_argument("--skip_grid", action="store_true",
                        help="do not save a grid, only individual samples. Helpful when evaluating lots of samples")
    parser.add_argument("--skip_save", action="store_true",
                        help="do not save individual samples. For speed measurements.")
    parser.add_argument("--ddim_steps", type=positive_int, default=50,
                        help="number of sampling steps (default: %(default)s)")
    parser.add_argument("--plms", action="store_true", help="use PLMS sampling")
    parser.add_argument("--laion400m", action="store_true",
                        help=f"use the LAION-400M latent diffusion model ({LAION_CONFIG}, {LAION_CKPT})")
    parser.add_argument("--fixed_code", action="store_true",
                        help="if enabled, uses the same starting code across samples")
    parser.add_argument("--ddim_eta", type=non_negative_float, default=0.0,
                        help="ddim eta (eta=0.0 corresponds to deterministic sampling) (default: %(default)s)")
    parser.add_argument("--n_iter", type=positive_int, default=2, help="sample this often (default: %(default)s)")
    parser.add_argument("--H", type=positive_int, default=None,
                        help=f"image height, in pixel space (default: {DEFAULT_SIZE}; with --demo the demo model's)")
    parser.add_argument("--W", type=positive_int, default=None,
                        help=f"image width, in pixel space (default: {DEFAULT_SIZE}; with --demo the demo model's)")
    parser.add_argument("--C", type=positive_int, default=4, help="latent channels (default: %(default)s)")
    parser.add_argument("--f", type=positive_int, default=8, help="downsampling factor (default: %(default)s)")
    parser.add_argument("--n_samples", type=positive_int, default=3,
                        help="how many samples to produce for each given prompt. A.k.a. batch size "
                             "(default: %(default)s)")
    parser.add_argument("--n_rows", type=non_negative_int, default=0,
                        help="images per row of the grid (default: n_samples)")
    parser.add_argument("--scale", type=float, default=7.5,
                        help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - "
                             "eps(x, empty)) (default: %(default)s)")
    parser.add_argument("--from-file", type=str, default=None,
                        help="if specified, load prompts from this file, one per line, in batches of n_samples")
    parser.add_argument("--config", type=str, default=None,
                        help=f"path to config which constructs model (default: {SD_CONFIG})")
    parser.add_argument("--ckpt", type=str, default=None,
                        help=f"path to checkpoint of model, .ckpt or .safetensors (default: {SD_CKPT})")
    parser.add_argument("--seed", type=seed_int, default=42, help="the seed (for reproducible sampling) "
                                                             "(default: %(default)s)")
    parser.add_argument("--precision", type=str, choices=("full", "autocast", "bf16", "fp16"), default="autocast",
                        help="evaluate at this precision: autocast = fp16 autocast on CUDA and fp32 elsewhere; "
                             "full = fp32; bf16 = bfloat16 autocast (CUDA, CPU); fp16 = fp16 autocast (CUDA) "
                             "(default: %(default)s)")
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
    from tqdm.auto import tqdm, trange

    from ldm.cli.images import to_unit_images
    from ldm.cli.runtime import check_image_size, load_checked_config
    from ldm.cli.session import open_session

    config, geometry = load_checked_config(opt)
    opt.H, opt.W = opt.H or geometry.image_size, opt.W or geometry.image_size
    check_image_size(geometry, opt.H, opt.W)
    session = open_session(opt, config)
    model, sampler, writer = session.model, session.sampler, session.writer
    shape = [opt.C, opt.H // opt.f, opt.W // opt.f]
    multi_batch = len(batches) > 1

    def render(prompts: list[str], start_code: Optional[torch.Tensor]) -> torch.Tensor:
        with session.precision():
            uc = None
            if opt.scale != 1.0:
                uc = model.get_learned_conditioning(len(prompts) * [opt.negative_prompt])
            c = model.get_learned_conditioning(prompts)
            samples, _ = sampler.sample(S=opt.ddim_steps, conditioning=c, batch_size=len(prompts), shape=shape,
                                        verbose=True, unconditional_guidance_scale=opt.scale,
                                        unconditional_conditioning=uc, eta=opt.ddim_eta, x_T=start_code)
            return to_unit_images(model.decode_first_stage(samples))

    # Seeded once the model is loaded, so that loading cannot shift the stream. On CUDA this gives the start
    # codes of the original, which seeds before loading (its CPU-side weight initialisation leaves the CUDA
    # generator alone).
    seed_everything(opt.seed)
    start_code = None
    if opt.fixed_code:
        start_code = torch.randn([opt.n_samples, *shape], device=session.device)

    sample_index = 0
    try:
        with torch.no_grad(), model.ema_scope():
            for n in trange(opt.n_iter, desc="Sampling"):
                for b, prompts in enumerate(tqdm(batches, desc="data")):
                    position = {"Iteration": n, "Prompt batch": b if multi_batch else None}
                    if opt.seed_per_sample:
                        for prompt in prompts:
                            seed = (opt.seed + sample_index) % 2 ** 32
                            seed_everything(seed)
                            writer.add(render([prompt], None), [prompt],
                                       [session.fields(seed, (opt.W, opt.H), **position)])
                            sample_index += 1
                        continue
                    images = render(prompts, None if start_code is None else start_code[:len(prompts)])
                    fields = [session.fields(opt.seed, (opt.W, opt.H), **{"Batch size": len(prompts),
                                                                          "Batch pos": j, **position,
                                                                          "Fixed code": opt.fixed_code or None})
                              for j in range(len(prompts))]
                    writer.add(images, prompts, fields)
    except KeyboardInterrupt:
        print(f"interrupted: {len(writer.saved)} images saved in {writer.sample_dir}", flush=True)
        raise
    grid = writer.finish()
    print(writer.summary(grid))


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
