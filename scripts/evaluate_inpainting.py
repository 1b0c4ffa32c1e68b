"""Measure whether inpainting on the demo models repaints a masked shape as the prompt asks.

Each case is a shape on a background (ldm.data.shapes, from a seed), a box mask that covers the shape, and a prompt
asking for another shape in another colour on the same background. The inpainted image (the input composited back
outside the mask) is read back with the shapes analysis (ldm.data.shapes_analysis): foreground colour, shape and
background. Two ways are measured on the same cases, seeds and noise:

* `inpainting`: the demo inpainting model (models/demo/inpainting.safetensors, 9 input channels);
* `blending`: the plain demo text-to-image model with the known region replaced at every step (any checkpoint).

    python scripts/evaluate_inpainting.py --n 200
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.data.shapes import COLORS, SHAPES, ShapeSpec, random_spec, render, shape_box_mask  # noqa: E402
from ldm.data.shapes_analysis import read_image  # noqa: E402
from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG, DEMO_INPAINTING_CHECKPOINT, DEMO_INPAINTING_CONFIG  # noqa: E402

MODELS = {"inpainting": (DEMO_INPAINTING_CONFIG, DEMO_INPAINTING_CHECKPOINT),
          "blending": (DEMO_CONFIG, DEMO_CHECKPOINT)}
SIZE = 32
MARGIN = 2  # pixels of mask around the shape's bounding box
EXCLUDED = {("purple", "star")}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=200, help="number of cases")
    parser.add_argument("--models", nargs="+", choices=tuple(MODELS), default=list(MODELS), help="what to measure")
    parser.add_argument("--sampler", default="ddim", help="sampler name, as --sampler of the command lines")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps (txt2img's default)")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (txt2img's default)")
    parser.add_argument("--seed", type=int, default=1000, help="seed of the cases (the training data use 0-2)")
    parser.add_argument("--batch_size", type=int, default=25, help="cases rendered at once")
    parser.add_argument("--inpainting_ckpt", default=str(DEMO_INPAINTING_CHECKPOINT),
                        help="the inpainting model's checkpoint (default: the shipped demo inpainting model), e.g. a "
                             "training run's checkpoint")
    parser.add_argument("--outdir", default=None, help="also save a grid of inputs, masks and results here")
    args = parser.parse_args(argv)
    if args.n < 1 or args.steps < 1 or args.batch_size < 1:
        parser.error("--n, --steps and --batch_size must be positive")
    return args


def make_cases(n: int, seed: int) -> list[tuple[Image.Image, np.ndarray, str, ShapeSpec, str, str]]:
    """(image, mask, prompt, the drawn spec, the asked colour, the asked shape) for n held-out cases."""
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        spec = random_spec(rng, exclude=EXCLUDED)
        colors = [c for c in COLORS if c not in (spec.color, spec.background)]
        while True:
            color, shape = str(rng.choice(colors)), str(rng.choice([s for s in SHAPES if s != spec.shape]))
            if (color, shape) not in EXCLUDED:
                break
        mask = shape_box_mask(spec, SIZE, MARGIN)
        prompt = f"a {color} {shape} on a {spec.background} background"
        cases.append((render(spec, SIZE), mask, prompt, spec, color, shape))
    return cases


def evaluate(name: str, cases: list, args: argparse.Namespace) -> tuple[dict, list[np.ndarray]]:
    from ldm import accel
    from ldm.checkpoint import load_model_from_config
    from ldm.cli.images import image_to_tensor, to_unit_images
    from ldm.models.diffusion.inpainting import inpaint
    from ldm.models.diffusion.registry import make_sampler

    config, ckpt = MODELS[name]
    if name == "inpainting":
        ckpt = args.inpainting_ckpt
    model = accel.optimize(load_model_from_config(config, ckpt), "cpu")
    sampler = make_sampler(args.sampler, model)
    factor = SIZE // model.image_size
    results = []
    for start in range(0, len(cases), args.batch_size):
        batch = cases[start:start + args.batch_size]
        torch.manual_seed(args.seed + start)
        images = torch.cat([image_to_tensor(case[0]) for case in batch])
        masks = torch.from_numpy(np.stack([case[1] for case in batch]))[:, None]
        samples = inpaint(model, sampler, images, masks, [case[2] for case in batch], args.steps, args.scale,
                          factor=factor, verbose=False)
        decoded = to_unit_images(model.decode_first_stage(samples))
        for (image, mask, *_), result in zip(batch, decoded):
            original = np.asarray(image, dtype=np.float32) / 255.0
            results.append(original * (1 - mask[..., None]) + result * mask[..., None])
        print(f"{name}: {len(results)}/{len(cases)}", file=sys.stderr)
    readings = [read_image((255 * r).astype(np.uint8)) for r in results]
    summary = {
        "model": name, "n": len(cases), "sampler": args.sampler, "steps": args.steps, "scale": args.scale,
        "prompted_color": float(np.mean([r.color == c[4] for r, c in zip(readings, cases)])),
        "prompted_shape": float(np.mean([r.shape == c[5] for r, c in zip(readings, cases)])),
        "background_kept": float(np.mean([r.background == c[3].background for r, c in zip(readings, cases)])),
    }
    return summary, results


def save_grid(outdir: Path, cases: list, results: dict[str, list[np.ndarray]], count: int = 20) -> None:
    rows = [[case[0] for case in cases[:count]],
            [Image.fromarray((case[1] * 255).astype(np.uint8)).convert("RGB") for case in cases[:count]]]
    rows += [[Image.fromarray((255 * r).astype(np.uint8)) for r in images[:count]] for images in results.values()]
    grid = Image.new("RGB", (64 * count, 64 * len(rows)))
    for y, row in enumerate(rows):
        for x, image in enumerate(row):
            grid.paste(image.resize((64, 64), Image.NEAREST), (64 * x, 64 * y))
    outdir.mkdir(parents=True, exist_ok=True)
    grid.save(outdir / "inpainting-grid.png")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    cases = make_cases(args.n, args.seed)
    images = {}
    for name in args.models:
        summary, images[name] = evaluate(name, cases, args)
        print(json.dumps(summary))
    if args.outdir:
        save_grid(Path(args.outdir), cases, images)
    return 0


if __name__ == "__main__":
    sys.exit(main())
