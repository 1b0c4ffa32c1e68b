#!/usr/bin/env python
"""Convert a diffusers Stable Diffusion v1 folder into a checkpoint of the original layout (`model.diffusion_model.*`,
`first_stage_model.*`, `cond_stage_model.transformer.text_model.*` and the noise-schedule buffers), which every
script of this repository and the original CompVis code load:

    python scripts/convert_from_diffusers.py stable-diffusion-v1-5 models/ldm/stable-diffusion-v1/sd-v1-5.safetensors

The mapping is diffusers' own conversion code run backwards (ldm/diffusers_format.py says how); the tensors keep
the folder's dtype unless --half. OUT must not exist. The sampling scripts also take the folder directly:
--ckpt FOLDER. See docs/diffusers.md.
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path
from typing import Optional, Sequence

from ldm.cli.common import CliArgumentParser, configure_logging, run_cli
from ldm.errors import UserInputError

logger = logging.getLogger("ldm.convert_from_diffusers")


def build_parser() -> argparse.ArgumentParser:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", help="the diffusers folder (with model_index.json, unet/, vae/, text_encoder/)")
    parser.add_argument("out", help="the checkpoint to write (.safetensors); must not exist")
    parser.add_argument("--config", default=None,
                        help="the config of the model (default: configs/stable-diffusion/v1-inference.yaml, or "
                             "v1-inpainting-inference.yaml for a 9-channel inpainting folder)")
    parser.add_argument("--half", action="store_true",
                        help="store the weights in float16 (the noise schedule stays float32)")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = build_parser().parse_args(argv)
    configure_logging()
    if Path(opt.out).suffix != ".safetensors":
        raise UserInputError(f"{opt.out}: the output is a .safetensors file; give a name ending in .safetensors")
    from ldm.cli.diffusers_files import check_new_output

    check_new_output(opt.out, folder=False)

    from ldm.cli.diffusers_files import save_new_safetensors
    from ldm.diffusers_folder import inspect_folder
    from ldm.diffusers_format import to_half
    from ldm.diffusers_loading import default_config, read_diffusers_folder

    folder = inspect_folder(opt.folder)
    config = opt.config or default_config(folder.in_channels)
    state = read_diffusers_folder(folder.path, config)
    if opt.half:
        state = to_half(state)
    target = save_new_safetensors(opt.out, state)
    dtypes = sorted({str(value.dtype).removeprefix("torch.") for value in state.values()})
    logger.info("wrote %s (%d tensors, %s) from %s with %s", target, len(state), "/".join(dtypes), folder.path,
                config)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
