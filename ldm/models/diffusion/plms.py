"""PLMS sampling: pseudo linear multistep (Liu et al. 2022, PNDM, arXiv:2202.09778) with the
original `PLMSSampler` API. The first step is a pseudo improved-Euler step (two model calls),
later steps combine up to four eps estimates (Adams-Bashforth). The loop and the options are DDIM's."""
from __future__ import annotations

from typing import Any, Mapping, Optional

import numpy as np
import torch

from ldm.models.diffusion.ddim import DDIMSampler, StepOptions
from ldm.models.diffusion.sampling import Denoiser, Step, plms_step


class PLMSSampler(DDIMSampler):
    progress_label = "PLMS Sampler"

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        if ddim_eta != 0:
            raise ValueError("PLMS is deterministic: eta must be 0")
        super().make_schedule(ddim_num_steps, ddim_discretize=ddim_discretize, ddim_eta=ddim_eta, verbose=verbose)

    # The original's name for the sampling loop, which is DDIM's with the PLMS step.
    plms_sampling = DDIMSampler.ddim_sampling

    def _step_options(self, use_original_steps: bool, quantize_denoised: bool, temperature: float,
                      noise_dropout: float, repeat_noise: bool,
                      generator: Optional[torch.Generator]) -> StepOptions:
        """DDIM's, refusing the noise options: with eta = 0 every sigma_t is 0, so they could do nothing (the
        original accepted and ignored them)."""
        for name, value, default in (("temperature", temperature, 1.0), ("noise_dropout", noise_dropout, 0.0),
                                     ("repeat_noise", repeat_noise, False)):
            if value != default:
                raise ValueError(f"PLMS is deterministic (eta = 0): {name} has no effect; leave it at {default}")
        return super()._step_options(use_original_steps, quantize_denoised, temperature, noise_dropout,
                                     repeat_noise, generator)

    def _make_step(self, denoise: Denoiser, time_range: np.ndarray, options: StepOptions) -> Step:
        """step(i, t, x): the PLMS step at the i-th of `time_range`, keeping the last three eps."""
        total = len(time_range)
        old_eps: list[torch.Tensor] = []

        def step(i: int, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            t_next = torch.full_like(t, int(time_range[min(i + 1, total - 1)]))
            x_prev, pred_x0, e_t = plms_step(denoise, x, t, t_next, old_eps,
                                             lambda eps: self._update(x, eps, total - 1 - i, options))
            old_eps.append(e_t)
            if len(old_eps) >= 4:
                old_eps.pop(0)
            return x_prev, pred_x0

        return step

    @torch.no_grad()
    def p_sample_plms(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: Optional[Mapping[str, Any]] = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      old_eps: Optional[list[torch.Tensor]] = None, t_next: Optional[torch.Tensor] = None,
                      generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One PLMS step from x at timestep t (the index-th of the schedule) given the previous eps;
        returns (x_prev, pred_x0, eps at x_t). The first step (no `old_eps`) needs `t_next`."""
        old_eps = old_eps or []
        if not old_eps and t_next is None:
            raise ValueError("the first PLMS step (no old_eps) evaluates the model at t_next: give it")
        denoise = self._denoiser(c, unconditional_conditioning, unconditional_guidance_scale, score_corrector,
                                 corrector_kwargs)
        options = self._step_options(use_original_steps, quantize_denoised, temperature, noise_dropout,
                                     repeat_noise, generator)
        return plms_step(denoise, x, t, t_next, old_eps, lambda eps: self._update(x, eps, index, options))
