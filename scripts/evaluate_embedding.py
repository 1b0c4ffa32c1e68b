#!/usr/bin/env python
"""Evaluate a textual-inversion embedding the way Gal et al. 2022 ("An Image is Worth One Word", sec. 5) do:
--n images (64) of each prompt, 50 DDIM steps, with the learned word and with a baseline word (by default none),
then CLIP image similarity to the training images (of "a photo of S*") and CLIP text similarity to the editing
prompts without S* (the paper's two axes).

    python scripts/evaluate_embedding.py --embedding_path embeddings.pt --data_root my_concept/ \\
        --ckpt sd-v1-4.ckpt --outdir eval/my_concept
    python scripts/evaluate_embedding.py --demo          # offline: the demo model, purple-star.pt, a tiny CLIP

A rerun into the same --outdir samples only the missing images and recomputes the numbers from disk; other
settings in an existing --outdir are refused (see docs/evaluation.md, "Textual inversion").
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Optional, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from ldm.cli.common import (  # noqa: E402
    SD_CKPT,
    SD_CONFIG,
    CliArgumentParser,
    check_checkpoint_exists,
    check_writable_dir,
    configure_logging,
    finite_float,
    positive_int,
    run_cli,
    seed_int,
)
from ldm.errors import UserInputError  # noqa: E402
from ldm.models.diffusion.sampler_names import SAMPLER_NAMES  # noqa: E402

logger = logging.getLogger("ldm.evaluate_embedding")

STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde")
DETERMINISTIC_SAMPLERS = tuple(name for name in SAMPLER_NAMES if name not in STOCHASTIC)
DEMO_TRAINING_IMAGES = 5


def build_parser() -> argparse.ArgumentParser:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embedding_path", default=None, help="the learned embedding (.pt, .bin or .safetensors)")
    parser.add_argument("--data_root", default=None, help="the folder of the embedding's training images")
    parser.add_argument("--placeholder", default=None,
                        help="the placeholder to evaluate when the embedding file holds several")
    parser.add_argument("--ckpt", default=None, help=f"the model's checkpoint (default: {SD_CKPT})")
    parser.add_argument("--config", default=None, help=f"the model's config (default: {SD_CONFIG})")
    parser.add_argument("--demo", action="store_true",
                        help="offline: the demo model, models/demo/purple-star.pt, purple stars drawn as training "
                             "images, shapes prompts and a tiny random CLIP (numbers that only check the plumbing)")
    parser.add_argument("--outdir", default=None, help="where images and results go (default: eval/<embedding>)")
    parser.add_argument("--prompts", default=None,
                        help="a text file of prompt templates, one a line, {} where the word goes; the first is the "
                             "reconstruction prompt (default: the paper's, see docs/evaluation.md)")
    parser.add_argument("--baseline_word", default=None,
                        help="the words sampled in the placeholder's stead for the baseline (default: none, the "
                             "prompt without the placeholder; with --demo, \"purple star\")")
    parser.add_argument("--n", type=positive_int, default=64, help="images per prompt (default: %(default)s)")
    parser.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default: %(default)s)")
    parser.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="ddim",
                        help="a deterministic sampler (default: %(default)s, eta 0)")
    parser.add_argument("--scale", type=finite_float, default=5.0,
                        help="guidance scale (default: %(default)s, as the original evaluation code)")
    parser.add_argument("--seed", type=seed_int, default=0,
                        help="image i of every prompt starts from seed + i (default: %(default)s)")
    parser.add_argument("--batch_size", type=positive_int, default=8, help="images per batch (default: %(default)s)")
    parser.add_argument("--clip_model", default="ViT-B-32",
                        help="OpenAI CLIP model of the similarities: ViT-B-32 (the paper's) or ViT-L-14 (default: "
                             "%(default)s)")
    parser.add_argument("--precision", choices=("autocast", "full", "bf16", "fp16"), default="autocast",
                        help="as in txt2img.py (default: %(default)s)")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps (default: auto)")
    parser.add_argument("--no_accel", action="store_true", help="run the model's plain layers (see txt2img.py)")
    parser.add_argument("--metrics_only", action="store_true", help="only score the images on disk")
    return parser


def demo_training_images(folder: Path, size: int) -> Path:
    """The demo embedding's concept, purple stars on random backgrounds, drawn into `folder` once (as
    scripts/demo_concept_images.py does with its defaults)."""
    import numpy as np

    from ldm.data.shapes import random_spec, render
    from ldm.evaluation.sampling import save_png

    rng = np.random.default_rng(0)
    for index in range(DEMO_TRAINING_IMAGES):
        path = folder / f"purple-star-{index}.png"
        image = np.asarray(render(random_spec(rng, shapes=["star"], colors=["purple"]), size))
        if not path.exists():
            save_png(image, path)
    return folder


def choose_placeholder(path: str, wanted: Optional[str]) -> str:
    from ldm.modules.embedding_manager import read_embedding_file

    strings = list(read_embedding_file(path))
    if wanted is None:
        if len(strings) > 1:
            raise UserInputError(f"{path} holds the placeholders {', '.join(strings)}: choose one with --placeholder")
        return strings[0]
    if wanted not in strings:
        raise UserInputError(f"--placeholder {wanted!r} is not in {path}, which holds {', '.join(strings)}")
    return wanted


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = build_parser().parse_args(argv)
    configure_logging()
    from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG, DEMO_EMBEDDING
    from ldm.evaluation import textual_inversion as ti
    from ldm.evaluation.textual_inversion_scores import demo_concept_accuracy, score, training_images, write_results

    if not opt.demo and (opt.embedding_path is None or opt.data_root is None):
        raise UserInputError("give --embedding_path and --data_root (the training images), or --demo")
    if opt.demo and opt.embedding_path is not None and opt.data_root is None:
        raise UserInputError("--demo draws the training images of its own embedding only: give --data_root too")
    opt.embedding_path = opt.embedding_path or str(DEMO_EMBEDDING)
    opt.ckpt = opt.ckpt or str(DEMO_CHECKPOINT if opt.demo else SD_CKPT)
    opt.config = opt.config or str(DEMO_CONFIG if opt.demo else SD_CONFIG)
    outdir = Path(opt.outdir or Path("eval") / Path(opt.embedding_path).stem)
    if not Path(opt.config).is_file():
        raise UserInputError(f"config not found: {opt.config}")
    check_checkpoint_exists(argparse.Namespace(ckpt=opt.ckpt, demo=opt.demo))
    placeholder = choose_placeholder(opt.embedding_path, opt.placeholder)
    if opt.baseline_word is None:
        opt.baseline_word = ti.DEMO_BASELINE_WORD if opt.demo and opt.embedding_path == str(DEMO_EMBEDDING) else ""
    if opt.baseline_word == placeholder:
        raise UserInputError(f"--baseline_word is the placeholder {placeholder!r}; give another word, or none")
    templates = ti.read_prompt_templates(opt.prompts) if opt.prompts else (
        ti.DEMO_PROMPTS if opt.demo else ti.PAPER_PROMPTS)
    check_writable_dir(outdir)
    if opt.data_root is not None:
        training = training_images(opt.data_root)

    from ldm.cli.geometry import read_geometry
    from ldm.config_files import read_plain_config

    config = read_plain_config(opt.config)
    geometry = read_geometry(config)
    if opt.steps > geometry.num_timesteps:
        raise UserInputError(f"--steps must be at most {geometry.num_timesteps} (the model's timesteps)")
    protocol = ti.EmbeddingProtocol(
        prompts=templates, words=(placeholder, opt.baseline_word), n=opt.n, sampler=opt.sampler, steps=opt.steps,
        eta=0.0, scale=opt.scale, seed=opt.seed, precision=opt.precision,
        model={"config": ti.file_identity(opt.config), "ckpt": ti.file_identity(opt.ckpt),
               "embedding": ti.file_identity(opt.embedding_path)})
    ti.check_outdir(outdir, protocol)
    if opt.demo:
        from ldm.evaluation.clip_score import tiny_clip

        clip, clip_name = tiny_clip(), "tiny random CLIP (demo)"
    else:
        from ldm.evaluation.clip_score import load_clip
        from ldm.evaluation.pretrained import clip_weights, fetch

        fetch(clip_weights(opt.clip_model))  # before sampling: offline, say which file is missing first
        clip, clip_name = None, opt.clip_model

    from ldm.cli.runtime import load_model, select_device

    device = select_device(opt.device)
    if not opt.metrics_only and ti.missing_images(outdir, protocol):
        model = load_model(config, opt.ckpt, device, embedding_paths=[opt.embedding_path], precision=opt.precision)
        if not opt.no_accel:
            from ldm import accel

            accel.optimize(model, device)
        ti.write_protocol(outdir, protocol)  # once the model has loaded: a bad checkpoint leaves the folder as it was
        written = ti.sample_missing(model, protocol, outdir, opt.batch_size)
        logger.info("%d images sampled into %s", written, outdir)
        del model
    missing = ti.missing_images(outdir, protocol)
    if missing:
        raise UserInputError(f"{len(missing)} images are missing in {outdir} (first: {missing[0]}); run without "
                             "--metrics_only to sample them")
    if opt.data_root is None:
        training = training_images(demo_training_images(outdir / "training_images", geometry.image_size))
    if clip is None:
        clip = load_clip(opt.clip_model, device)
    records = score(outdir, protocol, clip, training)
    if opt.demo:
        demo_concept_accuracy(outdir, protocol, records)
    write_results(outdir, protocol, records, clip_name, training)
    for record in records:
        shapes = "".join(f"  {key.replace('_', ' ')} {record[key]:.3f}" for key in ("concept_accuracy", "edit_accuracy")
                         if key in record)
        logger.info("%-8s word %-10r image similarity %.4f  text similarity %.4f%s", record["variant"],
                    record["word"], record["image_similarity"], record["text_similarity"], shapes)
    logger.info("results: %s, %s", outdir / "results.json", outdir / "results.csv")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
