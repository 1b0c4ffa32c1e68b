"""Measure whether the demo model draws what it is asked for.

Renders prompts like "a red circle on a blue background" with fixed seeds and reads each image
back with simple image analysis (ldm.data.shapes_analysis): foreground colour, shape and
background colour. Prints the three accuracies. With --concept (textual inversion) it renders
one prompt such as "a photo of *" and reports how often the expected colour and shape appear.

    python scripts/evaluate_demo.py --n 200
    python scripts/evaluate_demo.py --prompt "a photo of *" --embedding_path models/demo/purple-star.pt \
        --concept purple star --n 50
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG  # noqa: E402
from ldm.data.shapes import COLORS, SHAPES  # noqa: E402
from ldm.data.shapes_analysis import read_image  # noqa: E402
from ldm.errors import UserInputError  # noqa: E402

SAMPLERS = ("ddim", "plms", "dpm_solver")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default=str(DEMO_CONFIG), help="model config (default: the demo model's)")
    parser.add_argument("--ckpt", default=str(DEMO_CHECKPOINT), help="checkpoint (default: the shipped demo model)")
    parser.add_argument("--n", type=int, default=200, help="number of images to render and read back")
    parser.add_argument("--sampler", choices=SAMPLERS, default="ddim", help="sampler")
    parser.add_argument("--steps", type=int, default=50, help="sampling steps")
    parser.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale (txt2img's default)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed + i")
    parser.add_argument("--batch_size", type=int, default=25, help="images rendered at once")
    parser.add_argument("--prompt", default=None, help="render this one prompt N times (e.g. 'a photo of *')")
    parser.add_argument("--concept", nargs=2, metavar=("COLOR", "SHAPE"), default=None,
                        help="with --prompt: the colour and shape the prompt should show")
    parser.add_argument("--embedding_path", nargs="+", default=None, help="textual-inversion embedding file(s)")
    parser.add_argument("--outdir", default=None, help="also save a grid of the renders and the readings here")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or mps")
    return parser.parse_args(argv)


def prompts_to_render(n: int) -> list[tuple[str, str, str, str]]:
    """(prompt, colour, shape, background) for every combination, cycled in a fixed shuffled order."""
    combos = [(c, s, b) for c, s, b in itertools.product(COLORS, SHAPES, COLORS) if c != b and (c, s) != ("purple", "star")]
    order = np.random.default_rng(1234).permutation(len(combos))
    chosen = [combos[i] for i in itertools.islice(itertools.cycle(order), n)]
    return [(f"a {c} {s} on a {b} background", c, s, b) for c, s, b in chosen]


def render(model, prompts: list[str], seeds: list[int], sampler_name: str, steps: int, scale: float) -> list[Image.Image]:
    from ldm.models.diffusion.registry import make_sampler

    sampler = make_sampler(sampler_name, model)
    shape = (model.channels, model.image_size, model.image_size)
    x_T = torch.stack([torch.randn(shape, generator=torch.Generator().manual_seed(s)) for s in seeds]).to(model.device)
    with torch.no_grad():
        c = model.get_learned_conditioning(prompts)
        uc = model.get_learned_conditioning([""] * len(prompts))
        z, _ = sampler.sample(steps, len(prompts), shape, c, unconditional_guidance_scale=scale,
                              unconditional_conditioning=uc, x_T=x_T, verbose=False)
        images = ((model.decode_first_stage(z).clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(image.permute(1, 2, 0).cpu().numpy()) for image in images]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ldm import accel
    from ldm.checkpoint import load_model_from_config

    try:
        model = accel.optimize(load_model_from_config(args.config, args.ckpt, device=args.device), args.device)
        if args.embedding_path:
            from ldm.modules.embedding_manager import attach_embeddings

            attach_embeddings(model, args.embedding_path)
    except UserInputError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    if args.prompt:
        if not args.concept:
            print("error: --prompt needs --concept COLOR SHAPE", file=sys.stderr)
            return 2
        jobs = [(args.prompt, args.concept[0], args.concept[1], None)] * args.n
    else:
        jobs = prompts_to_render(args.n)
    readings, images = [], []
    for start in range(0, len(jobs), args.batch_size):
        batch = jobs[start:start + args.batch_size]
        seeds = [args.seed + start + i for i in range(len(batch))]
        batch_images = render(model, [j[0] for j in batch], seeds, args.sampler, args.steps, args.scale)
        images.extend(batch_images)
        readings.extend(read_image(image) for image in batch_images)
        print(f"rendered {len(images)}/{len(jobs)}", file=sys.stderr)
    color = np.mean([r.color == j[1] for r, j in zip(readings, jobs)])
    shape = np.mean([r.shape == j[2] for r, j in zip(readings, jobs)])
    result = {"n": len(jobs), "sampler": args.sampler, "steps": args.steps, "scale": args.scale,
              "foreground_color": float(color), "shape": float(shape)}
    if args.prompt:
        result["concept"] = float(np.mean([r.color == j[1] and r.shape == j[2] for r, j in zip(readings, jobs)]))
    else:
        result["background_color"] = float(np.mean([r.background == j[3] for r, j in zip(readings, jobs)]))
    if args.outdir:
        outdir = Path(args.outdir)
        outdir.mkdir(parents=True, exist_ok=True)
        columns = 10
        grid = Image.new("RGB", (64 * columns, 64 * ((len(images) + columns - 1) // columns)))
        for i, image in enumerate(images):
            grid.paste(image.resize((64, 64)), ((i % columns) * 64, (i // columns) * 64))
        grid.save(outdir / "grid.png")
        (outdir / "readings.json").write_text(json.dumps(
            [{"prompt": j[0], "read": vars(r)} for j, r in zip(jobs, readings)], indent=1))
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
