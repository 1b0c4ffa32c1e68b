"""Sampling one process's share of an evaluation: each batch whose images are not all on disk is rendered (the
start noise of caption i drawn from seed + i on the CPU, so it is the same on every device) and its missing
images written as PNGs, atomically."""
from __future__ import annotations

import io
import logging
from dataclasses import dataclass
from itertools import groupby
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from ldm.cli.images import to_uint8, to_unit_images
from ldm.cli.runtime import precision_context
from ldm.evaluation.files import atomic_write, is_complete_png
from ldm.evaluation.protocol import Protocol
from ldm.evaluation.work import Batch, image_path, image_seed
from ldm.models.diffusion.registry import make_sampler
from ldm.prompts import encode_prompt_pair

logger = logging.getLogger(__name__)

LoadModel = Callable[[str], Any]
"""load(checkpoint name) -> the model, on its device, ready for inference."""


@dataclass(frozen=True)
class SamplingJob:
    """What every batch of a run shares: the protocol, the captions, where images go and the latent shape."""

    protocol: Protocol
    captions: Sequence[str]
    outdir: Path
    latent_shape: tuple[int, int, int]
    device: torch.device

    def missing(self, batch: Batch) -> list[int]:
        """The caption indices of `batch` without a complete PNG of the protocol's size."""
        size = (self.protocol.W, self.protocol.H)
        return [i for i in batch.indices
                if not is_complete_png(image_path(self.outdir, batch.checkpoint, batch.scale, i), size)]


def start_noise(seeds: Sequence[int], shape: Sequence[int]) -> torch.Tensor:
    """x_T of a batch: image k's N(0, I) noise drawn on the CPU from its own seed."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(s)) for s in seeds])


@torch.no_grad()
def render_batch(model: Any, sampler: Any, job: SamplingJob, batch: Batch) -> np.ndarray:
    """The images (N, H, W, 3, uint8) of `batch`'s captions at its scale; the unconditional branch is the empty
    prompt, and prompts are cut at 77 tokens, as the original scripts do."""
    protocol = job.protocol
    prompts = [job.captions[i] for i in batch.indices]
    x_T = start_noise([image_seed(protocol.seed, i) for i in batch.indices], job.latent_shape).to(job.device)
    options = {"eta": protocol.eta} if protocol.sampler == "ddim" else {}
    with precision_context(protocol.precision, job.device), model.ema_scope():
        c, uc = encode_prompt_pair(model, prompts, len(prompts) * [""] if batch.scale != 1.0 else None,
                                   truncate=True)
        z, _ = sampler.sample(S=protocol.steps, conditioning=c, batch_size=len(prompts), shape=job.latent_shape,
                              verbose=False, unconditional_guidance_scale=batch.scale, unconditional_conditioning=uc,
                              x_T=x_T, **options)
        return to_uint8(to_unit_images(model.decode_first_stage(z)))


def save_png(pixels: np.ndarray, path: Path) -> None:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    atomic_write(path, lambda stream: stream.write(buffer.getvalue()))


def sample_batches(job: SamplingJob, batches: Sequence[Batch], load: LoadModel, show_progress: bool = True) -> int:
    """Render the batches with missing images and write those images; returns how many were written. A batch is
    rendered whole even if only some of its images are missing, so that each image is the same every time."""
    todo = [(batch, missing) for batch in batches if (missing := job.missing(batch))]
    total = sum(len(missing) for _, missing in todo)
    skipped = sum(len(batch.indices) for batch in batches) - total
    if skipped:
        logger.info("%d images are already on disk; sampling the %d missing", skipped, total)
    written = 0
    with tqdm(total=total, desc="sampling", unit="image", disable=not show_progress or not total) as progress:
        for checkpoint, group in groupby(todo, key=lambda item: item[0].checkpoint):
            model = load(checkpoint)
            sampler = make_sampler(job.protocol.sampler, model, job.protocol.schedule)
            for batch, missing in group:
                images = render_batch(model, sampler, job, batch)
                for index in missing:
                    save_png(images[index - batch.start], image_path(job.outdir, checkpoint, batch.scale, index))
                written += len(missing)
                progress.update(len(missing))
            del model, sampler
    return written
