#!/usr/bin/env python
"""Evaluate checkpoints the way the Stable Diffusion v1 model card does: FID against CLIP score over guidance
scales, one image per caption and scale (PLMS, 50 steps, 512x512, 10,000 COCO val2017 captions by default).

    python scripts/evaluate.py --ckpt sd-v1-4.ckpt --captions annotations/captions_val2017.json \\
        --images val2017/ --outdir eval/sd-v1-4
    torchrun --nproc_per_node 8 -- scripts/evaluate.py ...   # the same, sharded over 8 GPUs
    python scripts/evaluate.py --demo                        # offline, the demo model and its prompt accuracy

A rerun into the same --outdir samples only the missing images and recomputes the metrics from disk; it may add
checkpoints and scales, but not change the protocol (see docs/evaluation.md).
"""
from __future__ import annotations

import argparse
import hashlib
import importlib.util
from pathlib import Path
from typing import TYPE_CHECKING, Optional, Sequence

from ldm.cli.common import (
    SD_CKPT,
    SD_CONFIG,
    CliArgumentParser,
    check_checkpoint_exists,
    check_writable_dir,
    configure_logging,
    non_negative_float,
    positive_int,
    run_cli,
    seed_int,
)
from ldm.errors import UserInputError
from ldm.models.diffusion.sampler_names import SAMPLER_NAMES, SCHEDULES

if TYPE_CHECKING:
    from ldm.evaluation.captions import Captions

MODEL_CARD_SCALES = "1.5,2,3,4,5,6,7,8"
MODEL_CARD_N = 10_000
DEMO_N = 100
STOCHASTIC = ("euler_ancestral", "dpm_2_ancestral", "dpmpp_2s_ancestral", "dpmpp_sde", "dpmpp_2m_sde")
DETERMINISTIC_SAMPLERS = tuple(name for name in SAMPLER_NAMES if name not in STOCHASTIC)


def scale_list(text: str) -> list[float]:
    """argparse type: comma-separated finite guidance scales, at least 0, without repeats."""
    try:
        scales = [non_negative_float(part) for part in text.split(",") if part.strip()]
    except (ValueError, argparse.ArgumentTypeError) as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of finite numbers >= 0 "
                                         f"({error})") from None
    if not scales:
        raise argparse.ArgumentTypeError("give at least one scale")
    if len(set(scales)) < len(scales):
        raise argparse.ArgumentTypeError(f"{text!r} names a scale twice")
    return scales


def build_parser() -> argparse.ArgumentParser:
    parser = CliArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    model = parser.add_argument_group("model")
    model.add_argument("--ckpt", nargs="+", default=None, metavar="CKPT",
                       help=f"checkpoints to compare (.ckpt, .safetensors or diffusers folders), each named by its "
                            f"file name (default: {SD_CKPT})")
    model.add_argument("--config", default=None, help=f"the checkpoints' model config (default: {SD_CONFIG})")
    model.add_argument("--demo", action="store_true",
                       help="evaluate the shipped demo model offline: shapes captions, prompt accuracy")
    data = parser.add_argument_group("captions and reference images")
    data.add_argument("--captions", default=None,
                      help="COCO captions file (captions_val2017.json: one caption of each image, by a seeded "
                           "random choice) or a text file, one caption per line (its first --n lines)")
    data.add_argument("--images", default=None,
                      help="the reference images FID compares with (val2017/ for COCO's captions)")
    data.add_argument("--n", type=positive_int, default=None,
                      help=f"captions to sample (default: {MODEL_CARD_N}; {DEMO_N} with --demo)")
    data.add_argument("--seed", type=seed_int, default=0,
                      help="chooses the COCO captions; caption i is sampled from seed + i (default: %(default)s)")
    sampling = parser.add_argument_group("sampling protocol")
    sampling.add_argument("--scales", type=scale_list, default=scale_list(MODEL_CARD_SCALES),
                          help=f"guidance scales, comma-separated (default: {MODEL_CARD_SCALES})")
    sampling.add_argument("--sampler", choices=DETERMINISTIC_SAMPLERS, default="plms",
                          help="a deterministic sampler (default: %(default)s)")
    sampling.add_argument("--schedule", choices=SCHEDULES, default="default",
                          help="sigma schedule of the k-diffusion samplers (default: %(default)s)")
    sampling.add_argument("--steps", type=positive_int, default=50, help="sampling steps (default: %(default)s)")
    sampling.add_argument("--eta", type=non_negative_float, default=0.0,
                          help="DDIM's eta; only 0, deterministic, is accepted (default: %(default)s)")
    sampling.add_argument("--H", type=positive_int, default=None, help="image height (default: 512; the demo's 32)")
    sampling.add_argument("--W", type=positive_int, default=None, help="image width (default: 512; the demo's 32)")
    sampling.add_argument("--precision", choices=("autocast", "full", "bf16", "fp16"), default="autocast",
                          help="as in txt2img.py: autocast is fp16 on CUDA, fp32 elsewhere (default: %(default)s)")
    run = parser.add_argument_group("run")
    run.add_argument("--outdir", default=None,
                     help="where images, protocol.json and results go (default: eval/<first checkpoint's name>; "
                          "eval/demo with --demo)")
    run.add_argument("--batch_size", type=positive_int, default=8,
                     help="images per sampling batch; the same batch size gives the same pixels (default: "
                          "%(default)s)")
    run.add_argument("--metrics", default=None,
                     help="comma-separated: fid, clip_score, accuracy (default: fid,clip_score; accuracy with --demo)")
    run.add_argument("--cache_dir", default=None,
                     help="where FID caches the reference images' statistics (default: the FID metric's own)")
    run.add_argument("--no_metrics", action="store_true", help="only sample the missing images")
    run.add_argument("--metrics_only", action="store_true", help="only compute the metrics of the images on disk")
    run.add_argument("--device", default="auto",
                     help="auto, cpu, cuda, cuda:N or mps; under torchrun CUDA is cuda:LOCAL_RANK (default: auto)")
    run.add_argument("--no_accel", action="store_true", help="run the model's plain layers (see txt2img.py)")
    return parser


def checkpoint_names(paths: Sequence[str]) -> dict[str, str]:
    """name -> path: a file's stem, a folder's name; two checkpoints with one name are refused."""
    names: dict[str, str] = {}
    for path in paths:
        name = Path(path).stem if Path(path).is_file() else Path(path).name
        if name in names:
            raise UserInputError(f"--ckpt {names[name]} and {path} would both be stored as {name!r}: give the "
                                 "checkpoints distinct file names")
        names[name] = path
    return names


def file_sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def check_options(opt: argparse.Namespace) -> None:
    """Checks of the flags among themselves, before any file is read."""
    if opt.no_metrics and opt.metrics_only:
        raise UserInputError("--no_metrics and --metrics_only contradict each other: give one")
    if opt.eta != 0:
        raise UserInputError("--eta above 0 makes DDIM stochastic, and images would depend on how captions are "
                             "batched: the evaluation takes deterministic sampling only (eta 0)")
    if opt.schedule != "default" and opt.sampler in ("ddim", "plms", "dpm_solver"):
        raise UserInputError(f"--schedule {opt.schedule} applies only to the k-diffusion samplers; {opt.sampler} "
                             "runs on the model's timesteps")
    if opt.demo and opt.captions:
        raise UserInputError("--demo samples the demo data set's captions; leave out --captions (or --demo)")
    if not opt.demo and not opt.captions:
        raise UserInputError("give --captions (COCO's captions_val2017.json or a text file), or --demo")


def read_inputs(opt: argparse.Namespace) -> tuple[dict[str, str], Captions, list[str]]:
    """(checkpoint name -> path, the captions, the metrics to compute), every file checked; --config, --n and
    --ckpt resolved."""
    from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG
    from ldm.evaluation.captions import check_reference_images, demo_captions, read_captions
    from ldm.evaluation.metric_set import NEEDS_REFERENCE_IMAGES, parse_metric_names

    metrics = [] if opt.no_metrics else parse_metric_names(opt.metrics or ("accuracy" if opt.demo else
                                                                            "fid,clip_score"))
    if metrics and importlib.util.find_spec("matplotlib") is None:
        raise UserInputError("the plot needs matplotlib: pip install -e .[eval] (or add --no_metrics)")
    opt.ckpt = opt.ckpt or [str(DEMO_CHECKPOINT if opt.demo else SD_CKPT)]
    opt.config = opt.config or str(DEMO_CONFIG if opt.demo else SD_CONFIG)
    checkpoints = checkpoint_names(opt.ckpt)
    for path in opt.ckpt:
        check_checkpoint_exists(argparse.Namespace(ckpt=path, demo=opt.demo))
    opt.n = opt.n or (DEMO_N if opt.demo else MODEL_CARD_N)
    captions = demo_captions(opt.n, opt.seed) if opt.demo else read_captions(opt.captions, opt.n, opt.seed)
    if any(name in NEEDS_REFERENCE_IMAGES for name in metrics):
        if opt.images is None:
            raise UserInputError("FID needs the reference images: give --images (val2017/ for COCO's captions), or "
                                 "leave fid out of --metrics")
        check_reference_images(opt.images, captions)
    return checkpoints, captions, metrics


def main(argv: Optional[Sequence[str]] = None) -> None:
    opt = build_parser().parse_args(argv)
    configure_logging()
    check_options(opt)
    checkpoints, captions, metrics = read_inputs(opt)

    from ldm.cli.geometry import read_geometry
    from ldm.cli.runtime import check_image_size
    from ldm.config_files import read_plain_config
    from ldm.evaluation.distributed import ranks_from_env
    from ldm.evaluation.protocol import Protocol, check_outdir, read_protocol

    config = read_plain_config(opt.config)
    geometry = read_geometry(config)
    default_size = geometry.image_size if opt.demo else 512
    opt.H, opt.W = opt.H or default_size, opt.W or default_size
    check_image_size(geometry, opt.H, opt.W)
    if opt.steps > geometry.num_timesteps:
        raise UserInputError(f"--steps must be at most {geometry.num_timesteps} (the model's timesteps)")
    outdir = Path(opt.outdir or Path("eval") / ("demo" if opt.demo else next(iter(checkpoints))))
    check_writable_dir(outdir)
    if opt.metrics_only and read_protocol(outdir) is None:
        raise UserInputError(f"--metrics_only scores the images of an evaluation, and {outdir} holds none (no "
                             "protocol.json): sample first, without --metrics_only")
    sizes = {name: Path(path).stat().st_size if Path(path).is_file() else None for name, path in checkpoints.items()}
    protocol = check_outdir(outdir, Protocol(
        sampler=opt.sampler, schedule=opt.schedule, steps=opt.steps, eta=opt.eta, H=opt.H, W=opt.W, n=opt.n,
        seed=opt.seed, precision=opt.precision, captions_sha256=captions.source_sha256,
        config_sha256=file_sha256(opt.config), checkpoints=sizes, scales=tuple(opt.scales)))
    ranks = ranks_from_env()

    from ldm.evaluation.results import format_table
    from ldm.evaluation.run import Evaluation, run_evaluation

    evaluation = Evaluation(
        protocol=protocol, checkpoints=checkpoints, scales=opt.scales, config=config, captions=captions,
        outdir=outdir, latent_shape=(geometry.latent_channels, opt.H // geometry.factor, opt.W // geometry.factor),
        batch_size=opt.batch_size, metrics=metrics, device=opt.device, accel=not opt.no_accel,
        sample=not opt.metrics_only, reference_dir=opt.images, cache_dir=Path(opt.cache_dir) if opt.cache_dir else None,
        title=f"{'demo model' if opt.demo else 'Stable Diffusion'}: {opt.n} captions, {opt.sampler} {opt.steps} "
              f"steps, {opt.W}x{opt.H}")
    records = run_evaluation(evaluation, ranks)
    if records is not None:
        print(format_table(records))
        print(f"results: {outdir / 'results.json'}, {outdir / 'results.csv'}, {outdir / 'fid_vs_clip.png'}")
    elif ranks.main:
        print(f"images: {outdir}")


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
