"""Sampling a textual-inversion embedding the way Gal et al. 2022 ("An Image is Worth One Word", sec. 5)
evaluate one: n images of a reconstruction prompt ("a photo of S*") and of editing prompts (a new background, a
style, a composition), 50 DDIM steps, with the learned word and, as a baseline, with another word (by default
none: the prompt without S*). Every image is stored under `outdir` as a PNG written atomically; a rerun samples
only what is missing, and `outdir/protocol.json` keeps a rerun with other settings from mixing its images in."""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from ldm.cli.images import to_uint8, to_unit_images
from ldm.cli.runtime import precision_context
from ldm.errors import UserInputError
from ldm.evaluation.files import atomic_write_text, is_complete_png
from ldm.evaluation.sampling import save_png, start_noise
from ldm.models.diffusion.registry import make_sampler
from ldm.prompts import encode_prompt_pair

logger = logging.getLogger(__name__)

PROTOCOL_FILE = "protocol.json"
WORD = "{}"  # where a prompt template takes the learned word (or the baseline's)
# The prompts sec. 5 of the paper names: the reconstruction prompt first, then one editing prompt of each kind it
# describes (background, style, composition).
PAPER_PROMPTS = ("a photo of {}", "a photo of {} on the moon", "an oil painting of {}", "elmo holding a {}")
# The demo model knows shapes on coloured backgrounds (ldm.data.shapes); its embedding's * stands for a purple
# star, a pair its training captions never named, and "purple star" is the baseline there (see README).
DEMO_PROMPTS = ("a photo of {}", "a {} on a green background", "a {} on a yellow background")
DEMO_BASELINE_WORD = "purple star"
VARIANTS = ("learned", "baseline")  # folder names of the learned word's images and the baseline's


@dataclass(frozen=True)
class EmbeddingProtocol:
    """What fixes the images of an output folder. `words` are what fills the templates: the placeholder, then
    the baseline word ("" for none); `model` identifies the config, checkpoint and embedding files."""

    prompts: tuple[str, ...]
    words: tuple[str, str]
    n: int
    sampler: str
    steps: int
    eta: float
    scale: float
    seed: int
    precision: str
    model: dict[str, Any]

    def prompt(self, variant: int, prompt: int) -> str:
        """The text sampled for one variant of one template (spaces tidied where the word is empty)."""
        return " ".join(self.prompts[prompt].replace(WORD, self.words[variant]).split())

    def to_json(self) -> str:
        return json.dumps({**asdict(self), "prompts": list(self.prompts), "words": list(self.words)}, indent=1) + "\n"


def read_prompt_templates(path: str | os.PathLike) -> tuple[str, ...]:
    """Prompt templates from a text file, one a line, each with {} once where the word goes; the first is the
    reconstruction prompt."""
    try:
        lines = [line.strip() for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]
    except (OSError, UnicodeDecodeError) as error:
        raise UserInputError(f"cannot read --prompts {path} ({error})") from error
    if not lines:
        raise UserInputError(f"--prompts {path} holds no prompt")
    wrong = [line for line in lines if line.count(WORD) != 1]
    if wrong:
        raise UserInputError(f"--prompts {path}: every line needs {WORD} once where the learned word goes, not "
                             f"{wrong[0]!r}")
    return tuple(lines)


def file_identity(path: str | os.PathLike) -> dict[str, Any]:
    """A file's name and size, and its SHA-256 when it is small (configs, embeddings); a folder's name."""
    path = Path(path)
    if path.is_dir():
        return {"name": path.name}
    size = path.stat().st_size
    identity: dict[str, Any] = {"name": path.name, "bytes": size}
    if size < 64 * 2 ** 20:
        identity["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    return identity


def check_outdir(outdir: Path, protocol: EmbeddingProtocol) -> None:
    """A new or empty `outdir`, or one holding this protocol's images; anything else is refused in one line."""
    path = outdir / PROTOCOL_FILE
    if not path.exists():
        if outdir.exists() and any(outdir.iterdir()):
            raise UserInputError(f"--outdir {outdir} is not empty and holds no {PROTOCOL_FILE}: give a new or empty "
                                 "folder")
        return
    try:
        recorded = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise UserInputError(f"{path} is unreadable ({error}); use another --outdir") from error
    current = json.loads(protocol.to_json())
    changed = [key for key in current if recorded.get(key) != current[key]]
    if changed:
        details = ", ".join(f"{key} {recorded.get(key)!r} there, {current[key]!r} now" for key in changed)
        raise UserInputError(f"--outdir {outdir} holds an evaluation with other settings ({details}); use another "
                             "--outdir, or the same settings to resume it")


def write_protocol(outdir: Path, protocol: EmbeddingProtocol) -> None:
    atomic_write_text(outdir / PROTOCOL_FILE, protocol.to_json())


def image_path(outdir: Path, variant: int, prompt: int, index: int) -> Path:
    return outdir / VARIANTS[variant] / f"prompt_{prompt:02d}" / f"{index:04d}.png"


def image_paths(outdir: Path, protocol: EmbeddingProtocol, variant: int, prompt: int) -> list[Path]:
    return [image_path(outdir, variant, prompt, i) for i in range(protocol.n)]


def missing_images(outdir: Path, protocol: EmbeddingProtocol) -> list[Path]:
    """The images of the protocol that are not complete PNGs on disk."""
    return [path for v in range(len(protocol.words)) for p in range(len(protocol.prompts))
            for path in image_paths(outdir, protocol, v, p) if not is_complete_png(path)]


@torch.no_grad()
def sample_missing(model: Any, protocol: EmbeddingProtocol, outdir: Path, batch_size: int,
                   show_progress: bool = True) -> int:
    """Sample every image not yet complete on disk and write it; returns how many were written. Image i of every
    prompt and variant starts from the noise of seed + i; batches are cut the same way on every run, and a batch
    with a missing image is rendered whole, so an image is the same whether it was sampled first or on resume."""
    shape = (model.channels, model.image_size, model.image_size)
    batches = [(v, p, range(start, min(start + batch_size, protocol.n)))
               for v in range(len(protocol.words)) for p in range(len(protocol.prompts))
               for start in range(0, protocol.n, batch_size)]
    todo = [(v, p, batch, missing) for v, p, batch in batches
            if (missing := [i for i in batch if not is_complete_png(image_path(outdir, v, p, i))])]
    total = sum(len(item[3]) for item in todo)
    if not total:
        return 0
    sampler = make_sampler(protocol.sampler, model, "default")
    options = {"eta": protocol.eta} if protocol.sampler == "ddim" else {}
    with tqdm(total=total, desc="sampling", unit="image", disable=not show_progress) as progress:
        for variant, prompt, batch, missing in todo:
            prompts = [protocol.prompt(variant, prompt)] * len(batch)
            x_T = start_noise([(protocol.seed + i) % 2 ** 32 for i in batch], shape).to(model.device)
            with precision_context(protocol.precision, model.device), model.ema_scope():
                c, uc = encode_prompt_pair(model, prompts, [""] * len(batch) if protocol.scale != 1.0 else None,
                                           truncate=True)
                z, _ = sampler.sample(S=protocol.steps, conditioning=c, batch_size=len(batch), shape=shape,
                                      verbose=False, unconditional_guidance_scale=protocol.scale,
                                      unconditional_conditioning=uc, x_T=x_T, **options)
                images = to_uint8(to_unit_images(model.decode_first_stage(z)))
            for i in missing:
                save_png(images[i - batch.start], image_path(outdir, variant, prompt, i))
            progress.update(len(missing))
    return total
