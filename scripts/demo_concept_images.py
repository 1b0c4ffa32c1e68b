#!/usr/bin/env python
"""Write N images of one concept from the demo's shape generator (e.g. purple stars, the pair held
out of the demo model's training captions) to learn it with textual inversion:

    python scripts/demo_concept_images.py --color purple --shape star --n 5 --outdir data/purple-star

or one image to start the demo model's img2img from, with a mask over its shape for inpainting (--masks writes
NAME_mask.png beside each NAME.png):

    python scripts/demo_concept_images.py --color yellow --shape square --background blue --n 1 \
        --outdir my_shape --masks
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.data.shapes import COLORS, SHAPES, random_spec, render, shape_box_mask  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    """The command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--color", choices=list(COLORS), default="purple", help="the shape's colour")
    parser.add_argument("--shape", choices=list(SHAPES), default="star", help="the shape")
    parser.add_argument("--background", choices=list(COLORS), default=None,
                        help="the background's colour (default: a random other colour for each image)")
    parser.add_argument("--n", type=int, default=5, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sizes, positions and backgrounds")
    parser.add_argument("--masks", action="store_true",
                        help="also write NAME_mask.png for each image: white on a box over the shape, for inpainting")
    parser.add_argument("--outdir", required=True, help="folder to write the images to (must not hold images)")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Write the images; returns the exit code (2 when the folder already holds images)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if args.background == args.color:
        parser.error(f"--background must differ from --color ({args.color})")
    if os.path.isdir(args.outdir) and any(name.endswith(".png") for name in os.listdir(args.outdir)):
        print(f"demo_concept_images.py: error: {args.outdir} already holds images; choose an empty folder",
              file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for index in range(args.n):
        spec = random_spec(rng, shapes=[args.shape], colors=[args.color])
        if args.background is not None:  # drawn all the same, so the other images stay those of the seed
            spec = dataclasses.replace(spec, background=args.background)
        name = os.path.join(args.outdir, f"{args.color}-{args.shape}-{index}")
        render(spec, args.size).save(f"{name}.png")
        if args.masks:
            Image.fromarray((shape_box_mask(spec, args.size) * 255).astype(np.uint8)).save(f"{name}_mask.png")
    background = f" on a {args.background} background" if args.background else ""
    print(f"{args.n} image{'s' if args.n > 1 else ''} of a {args.color} {args.shape}{background} written to "
          f"{args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
