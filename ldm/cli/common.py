"""Argument parsing and checking shared by the sampling scripts, and the wrapper that turns
user mistakes into one line on stderr with exit code 2.

Nothing here imports torch: every check in this module runs before the model stack loads.
"""
from __future__ import annotations

import argparse
import logging
import math
import os
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, NoReturn, Optional, Sequence

from ldm.errors import UserInputError
from ldm.models.diffusion.sampler_names import K_SAMPLER_LABELS, SAMPLER_NAMES, SCHEDULES, takes_sigmas

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130
PRECISIONS = ("autocast", "full", "bf16", "fp16")
MAX_SEED = 2 ** 32 - 1
SD_WEIGHTS_HINT = ("download sd-v1-4.ckpt from https://huggingface.co/CompVis/stable-diffusion-v-1-4-original "
                   "(accept the licence on the model card first) and save it there, or pass --ckpt PATH")
LDM_WEIGHTS_HINT = ("download it from https://ommer-lab.com/files/latent-diffusion/nitro/txt2img-f8-large/model.ckpt "
                    "and save it there, or pass --ckpt PATH")
SD_CONFIG = "configs/stable-diffusion/v1-inference.yaml"
SD_CKPT = "models/ldm/stable-diffusion-v1/model.ckpt"
LAION_CONFIG = "configs/latent-diffusion/txt2img-1p4B-eval.yaml"
LAION_CKPT = "models/ldm/text2img-large/model.ckpt"
LAION_OUTDIR = "outputs/txt2img-samples-laion400m"
DEMO_HINT = "(or try the small demo model that ships with this repository: add --demo)"
DECODE_TILE = 64  # latent pixels per tile side for --tiled_decode: 512 image pixels at f=8, SD v1's training size
DECODE_OVERLAP = 16  # latent pixels shared (and cross-faded) by neighbouring tiles


class CliArgumentParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr and exit code 2."""

    def error(self, message: str) -> NoReturn:
        sys.stderr.write(f"{self.prog}: error: {message} (see --help)\n")
        sys.exit(EXIT_USER_ERROR)


def run_cli(main: Callable[[Optional[Sequence[str]]], None], argv: Optional[Sequence[str]] = None) -> int:
    """Run a script's `main`; `UserInputError` becomes one stderr line and exit code 2, Ctrl-C exit code 130
    (within seconds, even during a long step: see ldm.cli.interrupt)."""
    from ldm.cli.interrupt import prompt_interrupt

    prog = Path(sys.argv[0]).name
    try:
        with prompt_interrupt(prog, EXIT_INTERRUPTED):
            main(argv)
    except UserInputError as error:
        message = " ".join(str(error).split())
        sys.stderr.write(f"{prog}: error: {message}\n")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        sys.stderr.write(f"\n{prog}: interrupted\n")
        return EXIT_INTERRUPTED
    except Exception as error:
        if type(error).__name__ == "OutOfMemoryError":
            sys.stderr.write(f"{prog}: error: out of GPU memory; use a smaller --n_samples, --H or --W\n")
            return 1
        raise
    return 0


class _ProgressBarHandler(logging.Handler):
    """Writes log records to stderr through tqdm, so that they do not break progress bars."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm.auto import tqdm

        try:
            message = self.format(record)
            if sys.stderr.isatty():
                tqdm.write(message, file=sys.stderr)  # clears the bars, writes, redraws them
            else:
                # A file or pipe has no cursor: tqdm.write's clearing of nested bars would put a cursor-up
                # escape ("\x1b[A") in front of the message. End an open bar's line instead.
                with tqdm.get_lock():
                    sys.stderr.write(("\n" if getattr(tqdm, "_instances", None) else "") + message + "\n")
                    sys.stderr.flush()
        except Exception:
            self.handleError(record)


class _Formatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        return message if record.levelno < logging.WARNING else f"{record.levelname.lower()}: {message}"


def configure_logging(level: int = logging.INFO) -> None:
    """Send this package's log messages (at `level`) and other libraries' warnings to stderr."""
    handler = _ProgressBarHandler()
    handler.setFormatter(_Formatter())
    logging.basicConfig(level=logging.WARNING, handlers=[handler], force=True)
    logging.getLogger("ldm").setLevel(level)


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {value}")
    return value


def finite_float(text: str) -> float:
    """argparse type: a number, neither NaN nor infinite."""
    value = float(text)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text}")
    return value


def non_negative_float(text: str) -> float:
    """argparse type: a finite float >= 0."""
    value = finite_float(text)
    if not value >= 0.0:
        raise argparse.ArgumentTypeError(f"must not be negative, got {text}")
    return value


def unit_float(text: str) -> float:
    """argparse type: a float in [0, 1]."""
    value = finite_float(text)
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {text}")
    return value


def lora_argument(text: str) -> tuple[str, float]:
    """argparse type of --lora: PATH[:WEIGHT] -> (path, weight); the text after the last colon is the weight only
    if it is a number, so paths with colons (C:\\loras\\x.safetensors) stay whole. Checked later."""
    path, colon, weight = text.rpartition(":")
    if colon and path:
        try:
            return path, float(weight)
        except ValueError:
            pass
    return text, 1.0


def seed_int(text: str) -> int:
    """argparse type: a seed in [0, 2**32 - 1] (the range numpy and the original accept)."""
    value = int(text)
    if not 0 <= value <= MAX_SEED:
        raise argparse.ArgumentTypeError(f"must be between 0 and {MAX_SEED}, got {value}")
    return value


@dataclass(frozen=True)
class OriginalDefaults:
    """What differs between the original txt2img and img2img in the flags they share: three defaults and
    some wording (`help` overrides the help of a flag by its dest)."""

    n_iter: int
    n_samples: int
    scale: float
    outdir_help: str
    help: Mapping[str, str] = field(default_factory=dict)


def add_original_sampling_arguments(parser: argparse.ArgumentParser, defaults: OriginalDefaults,
                                    after: Optional[Mapping[str, Callable[[argparse.ArgumentParser], None]]] = None
                                    ) -> None:
    """The flags the original CompVis sampling scripts share, with their names, defaults and meaning, in the
    original order; `after[dest]` adds a script's own flags right after the shared flag `dest`."""
    flags: list[tuple[str, dict[str, Any]]] = [
        ("--prompt", dict(type=str, nargs="?", default="a painting of a virus monster playing guitar",
                          help="the prompt to render (default: %(default)r)")),
        ("--outdir", dict(type=str, nargs="?", default=None, help=defaults.outdir_help)),
        ("--skip_grid", dict(action="store_true", help="do not save a grid, only individual samples. Helpful when "
                                                       "evaluating lots of samples")),
        ("--skip_save", dict(action="store_true", help="do not save individual samples. For speed measurements.")),
        ("--ddim_steps", dict(type=positive_int, default=50,
                              help="number of sampling steps, for every sampler (heun, dpm_2, dpm_2_ancestral, "
                                   "dpmpp_2s_ancestral and dpmpp_sde call the model twice per step) "
                                   "(default: %(default)s)")),
        ("--plms", dict(action="store_true", help="use PLMS sampling")),
        ("--fixed_code", dict(action="store_true", help="if enabled, uses the same starting code across samples")),
        ("--ddim_eta", dict(type=non_negative_float, default=0.0,
                            help="ddim eta (eta=0.0 corresponds to deterministic sampling); DDIM only, an error "
                                 "with the other samplers (default: %(default)s)")),
        ("--n_iter", dict(type=positive_int, default=defaults.n_iter,
                          help="sample this often (default: %(default)s)")),
        ("--C", dict(type=positive_int, default=4, help="latent channels (default: %(default)s)")),
        ("--f", dict(type=positive_int, default=8, help="downsampling factor (default: %(default)s)")),
        ("--n_samples", dict(type=positive_int, default=defaults.n_samples,
                             help="how many samples to produce for each given prompt. A.k.a. batch size "
                                  "(default: %(default)s)")),
        ("--n_rows", dict(type=non_negative_int, default=0, help="images per row of the grid (default: n_samples)")),
        ("--scale", dict(type=finite_float, default=defaults.scale,
                         help="unconditional guidance scale: eps = eps(x, empty) + scale * (eps(x, cond) - "
                              "eps(x, empty)) (default: %(default)s)")),
        ("--from-file", dict(type=str, default=None, help="if specified, load prompts from this file, one per line, "
                                                          "in batches of n_samples")),
        ("--config", dict(type=str, default=None,
                          help=f"path to config which constructs model (default: {SD_CONFIG})")),
        ("--ckpt", dict(type=str, default=None,
                        help="path to checkpoint of model, .ckpt or .safetensors, or a diffusers folder "
                             f"(docs/diffusers.md) (default: {SD_CKPT})")),
        ("--seed", dict(type=seed_int, default=42,
                        help="the seed (for reproducible sampling) (default: %(default)s)")),
        ("--precision", dict(type=str, choices=("full", "autocast", "bf16", "fp16"), default="autocast",
                             help="evaluate at this precision: autocast = fp16 autocast on CUDA and fp32 elsewhere; "
                                  "full = fp32; bf16 = bfloat16 autocast (CUDA, CPU); fp16 = fp16 autocast (CUDA); "
                                  "with bf16 and fp16 the weights are kept in that type too (half the memory) "
                                  "(default: %(default)s)")),
    ]
    after = after or {}
    unknown = (set(defaults.help) | set(after)) - {flag.lstrip("-").replace("-", "_") for flag, _ in flags}
    if unknown:
        raise ValueError(f"not flags of the original scripts: {sorted(unknown)}")
    for flag, options in flags:
        dest = flag.lstrip("-").replace("-", "_")
        parser.add_argument(flag, **{**options, "help": defaults.help.get(dest, options["help"])})
        if dest in after:
            after[dest](parser)


def add_common_arguments(parser: argparse.ArgumentParser) -> None:
    """The options both scripts add to the original ones: samplers, devices, safety, watermark, embeddings,
    memory and speed."""
    group = parser.add_argument_group("beyond the original scripts")
    group.add_argument("--demo", action="store_true",
                       help="use the small demo model that ships in models/demo (config.yaml, model.safetensors) "
                            "instead of Stable Diffusion; --f, --C and the default --H/--W come from its config; it draws "
                            "coloured shapes, so the safety checker is skipped unless --require_safety_checker")
    group.add_argument("--dpm_solver", action="store_true",
                       help="use the DPM-Solver++(2M) sampler on the model's timesteps (good at 15-25 steps; "
                            "not the same as --sampler dpmpp_2m, which steps through noise levels)")
    group.add_argument("--sampler", choices=SAMPLER_NAMES, default=None, metavar="NAME",
                       help="sampler by name: ddim (default), plms, dpm_solver (the same as --plms / --dpm_solver), "
                            f"or a k-diffusion sampler: {', '.join(K_SAMPLER_LABELS)}; the *_ancestral and *_sde "
                            "ones add noise at every step, drawn from --seed. The PNG names it as the web UIs do "
                            "(DDIM, Euler a, DPM++ 2M Karras). Steps and quality: docs/samplers.md")
    group.add_argument("--schedule", choices=SCHEDULES, default="default",
                       help="the noise levels of a k-diffusion sampler: the model's own (default), karras "
                            "(Karras et al. 2022) or exponential (evenly spaced in log sigma); an error with ddim, "
                            "plms and dpm_solver, which run on the model's timesteps")
    group.add_argument("--negative_prompt", type=str, default="",
                       help="text for the unconditional branch of classifier-free guidance (the original uses \"\")")
    group.add_argument("--prompt_weighting", action="store_true",
                       help="read the web UIs' emphasis syntax: (word) x1.1, [word] /1.1, (word:1.5), nested "
                            "brackets multiply, \\( \\) \\[ \\] for the characters (docs/prompts.md); off by default, "
                            "since it changes what brackets in a prompt mean")
    group.add_argument("--truncate_prompts", action="store_true",
                       help="cut prompts at the text encoder's 77 tokens as the original does, instead of encoding "
                            "longer ones in chunks of 75 tokens (a prompt that fits is the same either way)")
    group.add_argument("--device", type=str, default="auto",
                       help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    group.add_argument("--seed_per_sample", action="store_true",
                       help="give sample k of the run the seed SEED+k and render it on its own, so that "
                            "--seed SEED+k --n_samples 1 --n_iter 1 re-renders exactly that sample")
    group.add_argument("--no_watermark", action="store_true",
                       help="do not put the invisible 'StableDiffusionV1' watermark into the saved images")
    group.add_argument("--no_safety_checker", action="store_true", help="do not run the NSFW safety checker")
    group.add_argument("--require_safety_checker", action="store_true",
                       help="stop with an error if the safety checker cannot be loaded, instead of a warning")
    group.add_argument("--safety_checker", type=str, default=None, metavar="DIR_OR_HUB_ID",
                       help="local directory (or Hugging Face id) of the diffusers safety checker and its CLIP "
                            "feature extractor; default $LDM_SAFETY_CHECKER or CompVis/stable-diffusion-safety-checker")
    group.add_argument("--embedding_path", type=str, nargs="+", default=None, metavar="PATH",
                       help="textual-inversion embedding file(s) whose placeholder words the prompt may use")
    group.add_argument("--lora", type=lora_argument, action="append", default=None, metavar="PATH[:WEIGHT]",
                       help="merge a LoRA file into the model (kohya/web-UI or diffusers/PEFT layout, .safetensors "
                            "or .pt) at WEIGHT (default 1.0); repeat for several; the PNG records name and hash "
                            "(docs/lora-vae.md)")
    group.add_argument("--vae", type=str, default=None, metavar="PATH",
                       help="load this autoencoder file (.ckpt or .safetensors, e.g. "
                            "vae-ft-mse-840000-ema-pruned) over the model's own")
    speed = parser.add_argument_group("memory and speed")
    speed.add_argument("--tiled_decode", action="store_true",
                       help=f"decode latents larger than {DECODE_TILE}x{DECODE_TILE} (images larger than "
                            f"{8 * DECODE_TILE}x{8 * DECODE_TILE} for SD) in overlapping, cross-faded tiles of that "
                            f"size ({DECODE_OVERLAP} latent pixels of overlap), so that a 1024x1024 image decodes in "
                            "the memory of a 512x512 one; the pixels differ slightly from a whole-image decode")
    speed.add_argument("--lowvram", action="store_true",
                       help="keep the text encoder, UNet and autoencoder in CPU memory and move each to the "
                            "device only while it runs, so the device holds one of them at a time (slower; "
                            "the safety checker runs on the CPU; no effect on the images; a no-op with "
                            "--device cpu)")
    speed.add_argument("--compile", action="store_true",
                       help="compile the UNet with torch.compile, for faster steps on CUDA (needs Triton there, "
                            "and a C++ compiler on the CPU); the first sampling step waits for the compilation, "
                            "which takes minutes")
    speed.add_argument("--no_accel", action="store_true",
                       help="run the model's plain layers, without the CPU speed work of ldm.accel (the same "
                            "images within float rounding, slower; also LDM_ACCEL=0)")
    speed.add_argument("--max_pixels", type=positive_int, default=None, metavar="N",
                       help="the largest image to accept, in pixels (H x W); default: what the device's free memory "
                            "holds at this --n_samples, estimated from the model's widths and checked before the "
                            "model loads; give a number to go past (or below) the estimate")


def resolve_sampler(opt: argparse.Namespace) -> str:
    """The sampler the flags ask for; contradicting flags are an error."""
    asked: dict[str, str] = {}  # sampler -> the flag that asks for it
    for name, flag in (("plms", opt.plms), ("dpm_solver", opt.dpm_solver)):
        if flag:
            asked[name] = f"--{name}"
    if opt.sampler is not None:
        asked.setdefault(opt.sampler, f"--sampler {opt.sampler}")
    if len(asked) > 1:
        raise UserInputError(f"choose one sampler: {' and '.join(asked.values())} ask for different ones; "
                             "give only one of them (--sampler NAME names any sampler)")
    return next(iter(asked), "ddim")


def _sampler_flag(opt: argparse.Namespace) -> Optional[str]:
    """The flag that chose the (resolved) sampler: --plms, --dpm_solver or --sampler NAME; None for ddim."""
    for name in ("plms", "dpm_solver"):
        if getattr(opt, name):
            return f"--{name}"
    return None if opt.sampler == "ddim" else f"--sampler {opt.sampler}"


def check_common_arguments(opt: argparse.Namespace) -> None:
    """Checks that need no model: contradicting flags, embedding files, sizes against --f."""
    if opt.seed_per_sample and opt.fixed_code:
        raise UserInputError("--seed_per_sample gives every sample its own start code; it cannot be combined "
                             "with --fixed_code")
    flag = _sampler_flag(opt)
    if opt.schedule != "default" and not takes_sigmas(opt.sampler):
        instead = f" in place of {flag}" if flag else ""
        raise UserInputError(f"--schedule {opt.schedule} applies only to the k-diffusion samplers, which run on "
                             f"noise levels; {opt.sampler} runs on the model's timesteps: drop --schedule, or choose "
                             f"a k-diffusion sampler{instead}, e.g. --sampler dpmpp_2m --schedule {opt.schedule}")
    if opt.sampler != "ddim" and opt.ddim_eta != 0:
        raise UserInputError(f"--ddim_eta applies to DDIM only, not to {opt.sampler}: leave --ddim_eta at 0, or "
                             f"drop {flag} to sample with DDIM (the default)")
    if opt.no_safety_checker and opt.require_safety_checker:
        raise UserInputError("--no_safety_checker and --require_safety_checker contradict each other")
    for path in opt.embedding_path or ():
        if not Path(path).is_file():
            raise UserInputError(f"embedding file not found: {path}")
    for path, weight in opt.lora or ():
        check_input_file(path, "LoRA")
        if not math.isfinite(weight):
            raise UserInputError(f"--lora {path}: the weight must be a finite number, got {weight}")
    if opt.vae is not None:
        check_input_file(opt.vae, "VAE")
    if opt.demo:
        return  # --f, --C and the size multiple come from the demo config, checked once it is read
    if opt.f & (opt.f - 1):
        raise UserInputError(f"--f must be a power of two (the autoencoder's downsampling factor), got {opt.f}")
    for name in ("H", "W"):
        value = getattr(opt, name, None)
        if value is not None and value % opt.f:
            raise UserInputError(f"--{name} must be a multiple of {opt.f} (--f), got {value}")


def check_input_file(path: str, what: str) -> None:
    """`path` names a file that is not empty (`what` names it in the message)."""
    file = Path(path)
    if not file.is_file():
        raise UserInputError(f"{what} file {'is a directory' if file.is_dir() else 'not found'}: {path}")
    if file.stat().st_size == 0:
        raise UserInputError(f"{what} file {path} is empty (0 bytes); download it again")


def read_prompt_batches(prompt: Optional[str], from_file: Optional[str], batch_size: int) -> list[list[str]]:
    """Batches of prompts: `batch_size` copies of `prompt`, or the non-blank lines of `from_file` in
    chunks of `batch_size` (the last chunk may be smaller)."""
    if not from_file:
        if prompt is None:
            raise UserInputError("give a --prompt or --from-file")
        return [batch_size * [prompt]]
    path = Path(from_file)
    if not path.is_file():
        raise UserInputError(f"prompt file not found: {path}")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read prompt file {path}: {error}") from error
    prompts = [line.strip() for line in lines if line.strip()]
    if not prompts:
        raise UserInputError(f"prompt file {path} is empty: write one prompt per line")
    return [prompts[i:i + batch_size] for i in range(0, len(prompts), batch_size)]


def check_writable_dir(path: str | os.PathLike) -> None:
    """Fail early if `path` cannot be created or written to; creates nothing."""
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserInputError(f"cannot write to output directory {path}: {probe} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write to output directory {path}: {probe} is not writable")
    for sub in (path, path / "samples"):
        if sub.exists() and not (sub.is_dir() and os.access(sub, os.W_OK | os.X_OK)):
            raise UserInputError(f"cannot write to output directory {path}: {sub} is not a writable directory")


def resolve_model_paths(opt: argparse.Namespace, outdir: str) -> None:
    """Fill in --config, --ckpt and --outdir: explicit values win, then --demo or --laion400m, then SD v1's."""
    from ldm.demo import DEMO_CHECKPOINT, DEMO_CONFIG

    if getattr(opt, "laion400m", False) and opt.demo:
        raise UserInputError("--demo and --laion400m choose different models; give one of them")
    if opt.demo:
        config, ckpt = str(DEMO_CONFIG), str(DEMO_CHECKPOINT)
    elif getattr(opt, "laion400m", False):
        config, ckpt, outdir = LAION_CONFIG, LAION_CKPT, opt.outdir or LAION_OUTDIR
    else:
        config, ckpt = SD_CONFIG, SD_CKPT
    opt.config, opt.ckpt, opt.outdir = opt.config or config, opt.ckpt or ckpt, opt.outdir or outdir


def check_checkpoint_exists(opt: argparse.Namespace) -> None:
    """A missing checkpoint file is reported with where the weights come from; a diffusers folder must have every
    part the model loads (ldm.diffusers_folder: JSON files only, nothing loads yet)."""
    from ldm.diffusers_folder import inspect_folder, is_diffusers_folder

    path = Path(opt.ckpt)
    if path.is_file():
        return
    if is_diffusers_folder(path):
        inspect_folder(path)
        return
    what = "is a directory but not a diffusers folder (no model_index.json)" if path.is_dir() else "not found"
    if opt.demo:
        hint = ("the demo model ships with this repository: restore models/demo from git, or train it as "
                "README.md describes, or pass --ckpt PATH")
    elif getattr(opt, "laion400m", False):
        hint = LDM_WEIGHTS_HINT
    else:
        hint = f"{SD_WEIGHTS_HINT} {DEMO_HINT}"
    raise UserInputError(f"checkpoint {what}: {path}; {hint}")


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's (every device's) random generators, as Lightning's seed_everything does."""
    import numpy as np
    import torch

    os.environ["PL_GLOBAL_SEED"] = str(seed)
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
