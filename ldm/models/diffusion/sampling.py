"""Sampler maths as small functions over a denoiser, in the style of k-diffusion.

A denoiser maps (x_t, t) to the predicted noise eps; `guided_denoiser` builds one from a
latent diffusion model with classifier-free guidance (Ho & Salimans 2022, eq. 6):
eps = eps(x, uc) + scale * (eps(x, c) - eps(x, uc)).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def guided_denoiser(model: Any, conditioning: Any, unconditional_conditioning: Any = None,
                    guidance_scale: float = 1.0) -> Denoiser:
    """eps(x, t) of `model.apply_model`, with classifier-free guidance when a scale != 1 and `uc` are given.

    The conditional and unconditional branches run as one batch of twice the size, [uc, c], as in the original.
    """
    if unconditional_conditioning is None or guidance_scale == 1.0:
        return lambda x, t: model.apply_model(x, t, conditioning)

    if isinstance(conditioning, dict):
        def merged(uc_value, c_value):
            if isinstance(c_value, list):
                return [torch.cat([u, c]) for u, c in zip(uc_value, c_value)]
            return torch.cat([uc_value, c_value])

        c_in = {k: merged(unconditional_conditioning[k], conditioning[k]) for k in conditioning}
    else:
        c_in = torch.cat([unconditional_conditioning, conditioning])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        eps_uncond, eps_cond = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), c_in).chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return denoise


def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, eq. 15)."""
    return (x - (1.0 - alpha_cumprod).sqrt() * eps) / alpha_cumprod.sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              sigma: torch.Tensor, noise: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1} (Song et al. 2021, eq. 12); returns (x_prev, predicted x_0)."""
    pred_x0 = predict_x0(x, eps, alpha)
    direction = (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    x_prev = alpha_prev.sqrt() * pred_x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def plms_eps(eps: torch.Tensor, previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous eps (Liu et al. 2022, PNDM, eq. 12)."""
    if len(previous) == 0:
        return eps
    if len(previous) == 1:
        return (3 * eps - previous[-1]) / 2
    if len(previous) == 2:
        return (23 * eps - 16 * previous[-1] + 5 * previous[-2]) / 12
    return (55 * eps - 59 * previous[-1] + 37 * previous[-2] - 9 * previous[-3]) / 24


def dpm_solver_pp_2m(denoiser: Denoiser, x: torch.Tensor, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                     callback: Optional[Callable[[int, torch.Tensor, torch.Tensor], None]] = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) over decreasing discrete `timesteps`.

    Works with the data prediction x_0 = (x - sigma_t eps) / alpha_t in log-SNR time
    lambda_t = log(alpha_t / sigma_t); the first step and the last (to sigma = 0) are first order.
    `callback(i, x, x0)` sees each step.
    """
    alphas_cumprod = alphas_cumprod.to(torch.float64)
    alpha = alphas_cumprod.sqrt()
    sigma = (1.0 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    previous_x0: Optional[torch.Tensor] = None
    previous_h: Optional[torch.Tensor] = None
    for i, t in enumerate(timesteps):
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        eps = denoiser(x, t_batch)
        x0 = (x - sigma[t].item() * eps) / alpha[t].item()
        if callback is not None:
            callback(i, x, x0)
        if i == len(timesteps) - 1:
            x = x0
            break
        t_next = int(timesteps[i + 1])
        h = lam[t_next] - lam[t]
        ratio = (sigma[t_next] / sigma[t]).item()
        step = (alpha[t_next] * torch.expm1(-h)).item()
        if previous_x0 is None:
            update = x0
        else:
            r = (previous_h / h).item()
            update = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        x = ratio * x - step * update
        previous_x0, previous_h = x0, h
    return x
