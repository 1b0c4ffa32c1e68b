"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) with the `sample` signature of the
original samplers. Timesteps are spaced evenly over [0, T-1] and the last step lands on the
data prediction, so 15-25 steps give images of DDIM-50 quality."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling import dpm_solver_pp_2m, guided_denoiser


def dpm_solver_timesteps(steps: int, num_train_timesteps: int) -> np.ndarray:
    """`steps` decreasing integer timesteps, evenly spaced from T-1 down to (but not including) 0."""
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_train_timesteps}, got {steps}")
    return np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


class DPMSolverSampler:
    def __init__(self, model: Any, **kwargs):
        self.model = model

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable] = None, img_callback: Optional[Callable] = None, eta: float = 0.0,
               verbose: bool = True, x_T: Optional[torch.Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               generator: Optional[torch.Generator] = None, **kwargs):
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, None)."""
        if eta != 0:
            raise ValueError("DPM-Solver++(2M) is deterministic: eta must be 0")
        device = self.model.device
        x = torch.randn((batch_size, *shape), device=device, generator=generator) if x_T is None else x_T
        timesteps = dpm_solver_timesteps(S, self.model.num_timesteps)
        denoise = guided_denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        progress = tqdm(total=len(timesteps), desc="DPM-Solver++ Sampler", disable=not verbose)

        def on_step(i: int, x_t: torch.Tensor, x0: torch.Tensor) -> None:
            progress.update(1)
            if callback:
                callback(i)
            if img_callback:
                img_callback(x0, i)

        try:
            samples = dpm_solver_pp_2m(denoise, x, timesteps, self.model.alphas_cumprod, callback=on_step)
        finally:
            progress.close()
        return samples.to(x.dtype), None
