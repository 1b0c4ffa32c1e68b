"""DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095) with the `sample` signature of the
original samplers. Timesteps are spaced evenly over [0, T-1] and the last step lands on the
data prediction, so 15-25 steps give images of DDIM-50 quality."""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.sampling import (
    check_batch_size,
    check_sampler_options,
    corrected_denoiser,
    dpm_solver_pp_2m_step,
    first_stage_quantizer,
    guided_denoiser,
    keep_known_region,
    sample_loop,
)


def dpm_solver_timesteps(steps: int, num_train_timesteps: int) -> np.ndarray:
    """`steps` decreasing integer timesteps, evenly spaced from T-1 down to (but not including) 0."""
    if steps < 1 or steps > num_train_timesteps:
        raise ValueError(f"the number of sampling steps must be between 1 and {num_train_timesteps}, got {steps}")
    return np.linspace(0, num_train_timesteps - 1, steps + 1).round()[::-1][:-1].astype(np.int64)


class DPMSolverSampler:
    def __init__(self, model: Any):
        self.model = model

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[Mapping[str, Any]] = None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates).

        The options are DDIM's (`DDIMSampler.sample`), with the data prediction x_0 in place of DDIM's
        pred_x0. The solver draws no noise, so `eta`, `temperature` and `noise_dropout` are refused unless
        at their defaults.
        """
        for name, value, default in (("eta", eta, 0.0), ("temperature", temperature, 1.0),
                                     ("noise_dropout", noise_dropout, 0.0)):
            if value != default:
                raise ValueError(f"DPM-Solver++(2M) is deterministic: {name} must be {default}, got {value}")
        check_batch_size(conditioning, batch_size)
        check_sampler_options(normals_sequence=normals_sequence, mask=mask, x0=x0, log_every_t=log_every_t)
        timesteps = dpm_solver_timesteps(S, self.model.num_timesteps)
        denoise = corrected_denoiser(
            guided_denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale),
            score_corrector, self.model, conditioning, corrector_kwargs)
        step = dpm_solver_pp_2m_step(denoise, timesteps, self.model.alphas_cumprod,
                                     first_stage_quantizer(self.model) if quantize_x0 else None)
        if mask is not None:
            step = keep_known_region(step, x0, mask, self.model.q_sample, generator)
        x = torch.randn((batch_size, *shape), device=self.model.device, generator=generator) if x_T is None else x_T
        samples, intermediates = sample_loop(step, x, timesteps, desc="DPM-Solver++ Sampler", verbose=verbose,
                                             callback=callback, img_callback=img_callback, log_every_t=log_every_t)
        return samples.to(x.dtype), intermediates

    @torch.no_grad()
    def img2img(self, S: int, init_latent: torch.Tensor, strength: float, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                verbose: bool = True, callback: Optional[Callable[[int], None]] = None,
                mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SDEdit (Meng et al. 2022): the init latent noised by q(x_t | x_0) to the first of the last
        int(strength * S) of the S solver timesteps, then those steps. Strength 1 starts from pure noise (the
        start of `sample` with x_T = noise); strength 0 returns the init latent. `mask`/`x0` keep x0, noised to
        each step, where mask is 1 (as `sample`)."""
        check_sampler_options(mask=mask, x0=x0)
        timesteps = dpm_solver_timesteps(S, self.model.num_timesteps)
        steps = int(strength * S)
        if steps == 0:
            return init_latent
        timesteps = timesteps[S - steps:]
        if noise is None:
            noise = torch.randn(init_latent.shape, device=init_latent.device, dtype=init_latent.dtype,
                                generator=generator)
        if steps == S:
            x = noise
        else:
            t = torch.full((init_latent.shape[0],), int(timesteps[0]), device=init_latent.device, dtype=torch.long)
            x = self.model.q_sample(init_latent, t, noise=noise)
        denoise = guided_denoiser(self.model, conditioning, unconditional_conditioning, unconditional_guidance_scale)
        step = dpm_solver_pp_2m_step(denoise, timesteps, self.model.alphas_cumprod)
        if mask is not None:
            step = keep_known_region(step, x0, mask, self.model.q_sample, generator)
        samples, _ = sample_loop(step, x, timesteps, desc="DPM-Solver++ Sampler", verbose=verbose, callback=callback)
        return samples.to(x.dtype)
