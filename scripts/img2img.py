#!/usr/bin/env python
"""Image to image (SDEdit) with Stable Diffusion v1: the flags of the original CompVis `scripts/img2img.py`,
and more.

    python scripts/img2img.py --prompt "A fantasy landscape, trending on artstation" --init-img sketch.jpg --strength 0.8

The init image is encoded, noised to step int(strength * ddim_steps) of the sampler's schedule (a timestep
for ddim, plms and dpm_solver, a sigma for the k-diffusion samplers) and denoised from there under the prompt
(Meng et al. 2022, arXiv:2108.01073), with any sampler:

    python scripts/img2img.py --init-img sketch.jpg --strength 0.6 --sampler dpmpp_2m --schedule karras --ddim_steps 25

"""
from __future__ import annotations

import argparse
from typing import Optional, Sequence

from ldm.cli.common import (
    CliArgumentParser,
    OriginalDefaults,
    add_common_arguments,
    add_original_sampling_arguments,
    check_checkpoint_exists,
    check_common_arguments,
    check_writable_dir,
    configure_logging,
    read_prompt_batches,
    resolve_model_paths,
    resolve_sampler,
    run_cli,
    seed_everything,
    unit_float,
)
from ldm.errors import UserInputError

DEFAULT_OUTDIR = "outputs/img2img-samples"


def _add_init_img_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--init-img", type=str, nargs="?", default=None,
                        help="path to the input image (any format PIL reads; EXIF orientation is applied, "
                             "transparency flattened onto white, sides rounded down to a multiple of what the "
                             "model downsamples by: 64 for SD v1)")


def _add_strength_argument(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--strength", type=unit_float, default=0.75,
                        help="strength for noising/unnoising. 1.0 corresponds to full destruction of information "
                             "in init image (the sampler starts from pure noise); 0.0 runs no step and returns the "
                             "init image as the autoencoder reproduces it (default: %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: the original script's flags (same names, defaults and meaning) and the additions."""
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    defaults = OriginalDefaults(
        n_iter=1, n_samples=2, scale=5.0, outdir_help=f"dir to write results to (default: {DEFAULT_OUTDIR})",
        help={"ddim_steps": "number of sampling steps of the full schedule, for every sampler; img2img runs "
                            "int(strength * ddim_steps) of them (default: %(default)s)",
              "plms": "use plms sampling (the original refused it for img2img)",
              "fixed_code": "if enabled, uses the same noise for the init image across iterations (the original "
                            "accepted this flag but ignored it)",
              "f": "downsampling factor, most often 8 or 16 (default: %(default)s)",
              "n_samples": "how many samples to produce for each given prompt. A.k.a batch size "
                           "(default: %(default)s)"})
    add_original_sampling_arguments(parser, defaults, after={"prompt": _add_init_img_argument,
                                                             "scale": _add_strength_argument})
    add_common_arguments(parser)
    return parser


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    """Parsed and checked arguments."""
    opt = build_parser().parse_args(argv)
    resolve_model_paths(opt, DEFAULT_OUTDIR)
    opt.sampler = resolve_sampler(opt)
    if not opt.init_img:
        raise UserInputError("give the image to start from with --init-img PATH")
    check_common_arguments(opt)
    return opt


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = parse_args(argv)
    configure_logging()
    batches = read_prompt_batches(opt.prompt, opt.from_file, opt.n_samples)
    check_writable_dir(opt.outdir)
    check_checkpoint_exists(opt)

    from ldm.cli.images import fit_to_multiple, open_init_image

    init_image = open_init_image(opt.init_img)

    import torch

    from ldm.cli.images import image_to_tensor, to_unit_images
    from ldm.cli.loop import render_batches
    from ldm.cli.runtime import check_fits_device, load_checked_config
    from ldm.cli.session import open_session

    config, geometry = load_checked_config(opt)
    init_image, note = fit_to_multiple(init_image, geometry.size_multiple)
    if note:
        print(note, flush=True)
    width, height = init_image.size
    check_fits_device(opt, geometry, height, width)
    session = open_session(opt, config)
    model, sampler, device = session.model, session.sampler, session.device
    t_enc = int(opt.strength * opt.ddim_steps)
    # Strength 1.0 (t_enc = ddim_steps, where the original crashed) starts from pure noise; 0 keeps the init image.
    print(f"target t_enc is {t_enc} steps", flush=True)
    sampler_options = {"eta": opt.ddim_eta} if opt.sampler == "ddim" else {}
    init_pixels = image_to_tensor(init_image).to(device)

    def encode(batch_size: int) -> torch.Tensor:
        return model.get_first_stage_encoding(model.encode_first_stage(init_pixels.repeat(batch_size, 1, 1, 1)))

    def render(prompts: list[str], alone: bool) -> torch.Tensor:
        if alone:
            latent, noise = encode(1), None
        else:
            latent, noise = init_latent, None if fixed_noise is None else fixed_noise[:len(prompts)]
        with session.precision():
            c, uc = session.conditioning(prompts, len(prompts) * [opt.negative_prompt] if opt.scale != 1.0 else None)
            samples = sampler.img2img(opt.ddim_steps, latent[:len(prompts)], opt.strength, c,
                                      unconditional_guidance_scale=opt.scale, unconditional_conditioning=uc,
                                      noise=noise, **sampler_options)
            return to_unit_images(model.decode_first_stage(samples))

    # As in the original: seed, sample the init image's latent once, then draw the noise per batch.
    seed_everything(opt.seed)
    init_latent = fixed_noise = None
    if not opt.seed_per_sample:
        with torch.no_grad():
            init_latent = encode(opt.n_samples)
        if opt.fixed_code:
            fixed_noise = torch.randn(init_latent.shape, device=device, dtype=init_latent.dtype)

    render_batches(session, batches, render, (width, height), {"Denoising strength": opt.strength})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
