"""PLMS sampling: pseudo linear multistep (Liu et al. 2022, PNDM, arXiv:2202.09778) with the
original `PLMSSampler` API. The first step is a pseudo improved-Euler step (two model calls),
later steps combine up to four eps estimates (Adams-Bashforth)."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.sampling import ddim_step, guided_denoiser, plms_eps
from ldm.modules.diffusionmodules.util import noise_like


class PLMSSampler(DDIMSampler):
    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("PLMS is deterministic: eta must be 0")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose)

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape: Sequence[int], x_T: Optional[torch.Tensor] = None,
                      ddim_use_original_steps: bool = False, callback: Optional[Callable] = None,
                      timesteps: Optional[int] = None, quantize_denoised: bool = False,
                      mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                      img_callback: Optional[Callable] = None, log_every_t: int = 100, temperature: float = 1.0,
                      noise_dropout: float = 0.0, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None, verbose: bool = True,
                      generator: Optional[torch.Generator] = None):
        if ddim_use_original_steps or timesteps is not None:
            raise ValueError("PLMS runs over its own schedule; use_original_steps and timesteps are not supported")
        device = self.model.device
        batch = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = np.flip(self.ddim_timesteps)
        total_steps = self.ddim_timesteps.shape[0]
        denoise = guided_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        old_eps: list[torch.Tensor] = []
        for i, step in enumerate(tqdm(time_range, desc="PLMS Sampler", total=total_steps, disable=not verbose)):
            index = total_steps - i - 1
            ts = torch.full((batch,), int(step), device=device, dtype=torch.long)
            ts_next = torch.full((batch,), int(time_range[min(i + 1, len(time_range) - 1)]), device=device,
                                 dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, ts)
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0, e_t = self.p_sample_plms(img, cond, ts, index=index, old_eps=old_eps, t_next=ts_next,
                                                   temperature=temperature, noise_dropout=noise_dropout,
                                                   denoiser=denoise, generator=generator)
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: Any = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      old_eps: Optional[list] = None, t_next: Optional[torch.Tensor] = None,
                      denoiser: Optional[Callable] = None, generator: Optional[torch.Generator] = None):
        """One PLMS step; returns (x_prev, pred_x0, eps at x_t)."""
        denoise = denoiser or guided_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale)
        old_eps = old_eps or []
        a_t, a_prev, sigma_t = (v[index].to(x.dtype) for v in self._schedule(use_original_steps))

        def step(eps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            noise = noise_like(x.shape, x.device, repeat_noise, generator=generator).to(x.dtype) * temperature
            if noise_dropout > 0.0:
                noise = torch.nn.functional.dropout(noise, p=noise_dropout)
            return ddim_step(x, eps, a_t, a_prev, sigma_t, noise)

        e_t = denoise(x, t)
        if len(old_eps) == 0:
            x_prev, _ = step(e_t)
            e_t_prime = (e_t + denoise(x_prev, t_next)) / 2
        else:
            e_t_prime = plms_eps(e_t, old_eps)
        x_prev, pred_x0 = step(e_t_prime)
        return x_prev, pred_x0, e_t
