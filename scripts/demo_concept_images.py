#!/usr/bin/env python
"""Write N images of one concept from the demo's shape generator (e.g. purple stars, the pair held
out of the demo model's training captions) to learn it with textual inversion:

    python scripts/demo_concept_images.py --color purple --shape star --n 5 --outdir data/purple-star
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from ldm.data.shapes import COLORS, SHAPES, random_spec, render  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--color", choices=list(COLORS), default="purple", help="the shape's colour")
    parser.add_argument("--shape", choices=list(SHAPES), default="star", help="the shape")
    parser.add_argument("--n", type=int, default=5, help="number of images")
    parser.add_argument("--size", type=int, default=32, help="image size in pixels")
    parser.add_argument("--seed", type=int, default=0, help="seed of the sizes, positions and backgrounds")
    parser.add_argument("--outdir", required=True, help="folder to write the images to (must not hold images)")
    args = parser.parse_args(argv)
    if args.n < 1:
        parser.error("--n must be at least 1")
    if os.path.isdir(args.outdir) and any(name.endswith(".png") for name in os.listdir(args.outdir)):
        print(f"demo_concept_images.py: error: {args.outdir} already holds images; choose an empty folder",
              file=sys.stderr)
        return 2
    os.makedirs(args.outdir, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    for index in range(args.n):
        spec = random_spec(rng, shapes=[args.shape], colors=[args.color])
        render(spec, args.size).save(os.path.join(args.outdir, f"{args.color}-{args.shape}-{index}.png"))
    print(f"{args.n} images of a {args.color} {args.shape} written to {args.outdir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
