#!/usr/bin/env python
"""Convert a Stable Diffusion v1 checkpoint (.ckpt or .safetensors, the original layout) into a diffusers folder
that `diffusers.StableDiffusionPipeline.from_pretrained(OUTDIR)` loads offline:

    python scripts/convert_to_diffusers.py models/ldm/stable-diffusion-v1/model.ckpt sd-v1-4-diffusers --half

The tensors are renamed by diffusers' own conversion code; the folder gets unet/, vae/, text_encoder/, tokenizer/
(CLIP's vocabulary, from the merge table open_clip ships) and scheduler/ (PNDM on the config's noise schedule),
without a safety checker. A 9-channel inpainting checkpoint becomes a StableDiffusionInpaintPipeline folder.
OUTDIR must not exist (or be empty): it is built beside it and renamed into place. See docs/diffusers.md.
"""
from __future__ import annotations

import argparse
import logging
from typing import Optional, Sequence

from ldm.cli.common import CliArgumentParser, configure_logging, run_cli

logger = logging.getLogger("ldm.convert_to_diffusers")


def build_parser() -> argparse.ArgumentParser:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ckpt", help="the checkpoint to convert (.ckpt or .safetensors)")
    parser.add_argument("outdir", help="the diffusers folder to write; must not exist, or be empty")
    parser.add_argument("--config", default=None,
                        help="the config that builds the checkpoint's model (default: "
                             "configs/stable-diffusion/v1-inference.yaml, or v1-inpainting-inference.yaml for a "
                             "9-channel inpainting checkpoint)")
    parser.add_argument("--half", action="store_true", help="store the weights in float16 (default: float32)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = build_parser().parse_args(argv)
    configure_logging()
    from ldm.cli.diffusers_files import check_new_output

    check_new_output(opt.outdir, folder=True)

    import torch

    from ldm.cli.diffusers_files import write_diffusers_folder
    from ldm.demo import REPO_DIR
    from ldm.diffusers_format import plan_conversion, read_original_checkpoint, scaling_factor, to_diffusers
    from ldm.inpainting_checkpoint import DEFAULT_CONFIG, select_config

    config = select_config(opt.config, opt.ckpt, default_config=REPO_DIR / DEFAULT_CONFIG)
    plan = plan_conversion(config)
    state = read_original_checkpoint(opt.ckpt, plan)
    dtype = torch.float16 if opt.half else torch.float32
    parts = {part: {key: value.to(dtype) for key, value in tensors.items()}
             for part, tensors in to_diffusers(state, plan).items()}
    target = write_diffusers_folder(opt.outdir, parts, plan, scaling_factor(state, plan), dtype)
    logger.info("wrote %s (%s, %s) from %s with %s", target, "inpainting" if plan.in_channels == 9 else "text to image",
                str(dtype).removeprefix("torch."), opt.ckpt, config)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
