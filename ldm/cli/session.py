"""Everything a sampling run builds after its arguments are checked: the model on its device, the
precision context, the sampler, the safety checker, the watermark and the image writer."""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ContextManager, Mapping, Optional, Sequence

import torch

import ldm
from ldm import accel
from ldm.cli.hashing import BackgroundHash
from ldm.cli.model_files import ModelFiles, apply_model_files
from ldm.cli.runtime import (
    check_compile_available,
    compile_unet,
    enable_tiled_decode,
    load_model,
    precision_context,
    select_device,
)
from ldm.cli.safety import SafetyChecker
from ldm.cli.watermark import Watermarker
from ldm.cli.writer import ImageWriter
from ldm.models.diffusion.registry import make_sampler
from ldm.models.diffusion.sampler_names import sampler_label
from ldm.models.offload import enable_offload
from ldm.prompts import encode_prompt_pair

logger = logging.getLogger(__name__)


@dataclass
class Session:
    """A loaded model, its sampler and what its samples go through."""

    opt: argparse.Namespace
    model: Any
    sampler: Any
    device: torch.device
    writer: ImageWriter
    checkpoint_hash: BackgroundHash
    model_files: ModelFiles = field(default_factory=ModelFiles)

    def precision(self) -> ContextManager:
        """A fresh context for the model's forward passes at the requested precision."""
        return precision_context(self.opt.precision, self.device)

    def conditioning(self, prompts: Sequence[str], negative_prompts: Optional[Sequence[str]]
                     ) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(c, uc) of a batch: long prompts in chunks unless --truncate_prompts, emphasis with --prompt_weighting."""
        return encode_prompt_pair(self.model, prompts, negative_prompts, weighting=self.opt.prompt_weighting,
                                  truncate=self.opt.truncate_prompts)

    def fields(self, seed: int, size: tuple[int, int], **extra: Any) -> dict[str, Any]:
        """The `parameters` fields of one sample (web-UI names first, then this project's)."""
        opt = self.opt
        fields: dict[str, Any] = {
            "Steps": opt.ddim_steps, "Sampler": sampler_label(opt.sampler, opt.schedule), "CFG scale": opt.scale,
            "Seed": seed,
            "Size": f"{size[0]}x{size[1]}", "Model hash": self.checkpoint_hash.short(),
            "Model": Path(opt.ckpt).stem,
        }
        fields.update(self.model_files.fields())
        fields.update(extra)
        if opt.prompt_weighting:
            fields["Emphasis"] = "Original"  # AUTOMATIC1111's name for this emphasis
        if opt.sampler == "ddim":
            fields["Eta"] = opt.ddim_eta
        fields["Precision"] = opt.precision
        if opt.tiled_decode:
            fields["Tiled decode"] = True
        if opt.embedding_path:
            fields["Embeddings"] = " ".join(Path(p).name for p in opt.embedding_path)
        fields["Version"] = f"ldm {ldm.__version__}"
        return fields


def open_session(opt: argparse.Namespace, config: Mapping[str, Any]) -> Session:
    """Resolve the safety checker, load the model and create the output directories.

    Every check that can fail on user input runs before anything is written.
    """
    safety = None
    if opt.demo and not opt.require_safety_checker:
        logger.info("the demo model draws coloured shapes: the safety checker is not loaded for it")
    elif not opt.no_safety_checker:
        safety = SafetyChecker(opt.safety_checker, required=opt.require_safety_checker)
        safety.resolve()
    checkpoint_hash = BackgroundHash(opt.ckpt)
    device = select_device(opt.device)
    precision_context(opt.precision, device)
    if opt.compile:
        check_compile_available(device)
    # With --lowvram the model loads into CPU memory, and only its small rest moves to the device now.
    cpu = torch.device("cpu")
    model = load_model(config, opt.ckpt, cpu if opt.lowvram else device, opt.embedding_path, opt.precision)
    model_files = apply_model_files(model, opt)
    if not opt.no_accel:
        accel.optimize(model, device)
    if opt.lowvram:
        enable_offload(model, device)
    if opt.tiled_decode:
        enable_tiled_decode(model)
    if opt.compile:
        compile_unet(model)
    if safety is not None:
        safety.load(cpu if opt.lowvram else device)
    # The demo model's images are 32x32, too small for the watermark by design: no warning for them.
    watermark = None if opt.no_watermark else Watermarker(
        small_image_level=logging.DEBUG if opt.demo else logging.WARNING)
    writer = ImageWriter(opt.outdir, negative_prompt=opt.negative_prompt, grid_columns=opt.n_rows or opt.n_samples,
                         skip_save=opt.skip_save, skip_grid=opt.skip_grid,
                         safety=safety if safety is not None and safety.available else None,
                         watermark=watermark)
    writer.prepare()
    logger.info("sampling on %s (%s precision) with %s", device, opt.precision,
                sampler_label(opt.sampler, opt.schedule))
    return Session(opt=opt, model=model, sampler=make_sampler(opt.sampler, model, opt.schedule), device=device,
                   writer=writer, checkpoint_hash=checkpoint_hash, model_files=model_files)
