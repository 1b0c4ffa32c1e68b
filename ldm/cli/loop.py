"""The loop txt2img and img2img share: every prompt batch `--n_iter` times, seeds, PNG fields and Ctrl-C."""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from tqdm.auto import tqdm, trange

from ldm.cli.common import seed_everything
from ldm.cli.session import Session

Render = Callable[[list[str], bool], torch.Tensor]
"""render(prompts, alone) -> images in [0, 1]; `alone`: one prompt under its own seed (--seed_per_sample),
without the run's shared noise or init latent."""


def render_batches(session: Session, batches: Sequence[list[str]], render: Render, size: tuple[int, int],
                   fields: dict[str, Any]) -> None:
    """Render and save every prompt batch `opt.n_iter` times, in the original scripts' order (so the same
    seed draws the same noise), then the grid; `fields` go into every PNG's parameters after its batch
    position. With --seed_per_sample, sample k of the run is seeded SEED+k and rendered alone."""
    opt, writer = session.opt, session.writer
    multi_batch = len(batches) > 1
    sample_index = 0
    try:
        with torch.no_grad(), session.model.ema_scope():
            for n in trange(opt.n_iter, desc="Sampling"):
                for b, prompts in enumerate(tqdm(batches, desc="data")):
                    position = {**fields, "Iteration": n, "Prompt batch": b if multi_batch else None}
                    if opt.seed_per_sample:
                        for prompt in prompts:
                            seed = (opt.seed + sample_index) % 2 ** 32
                            seed_everything(seed)
                            writer.add(render([prompt], True), [prompt], [session.fields(seed, size, **position)])
                            sample_index += 1
                        continue
                    images = render(prompts, False)
                    writer.add(images, prompts, [
                        session.fields(opt.seed, size, **{"Batch size": len(prompts), "Batch pos": j, **position,
                                                          "Fixed code": opt.fixed_code or None})
                        for j in range(len(prompts))])
    except KeyboardInterrupt:
        print(f"interrupted: {len(writer.saved)} images saved in {writer.sample_dir}", flush=True)
        raise
    grid = writer.finish()
    print(writer.summary(grid))
