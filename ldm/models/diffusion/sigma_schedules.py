"""Noise levels for the samplers that work in sigma space (Karras et al. 2022, arXiv:2206.00364).

A discrete-time model with cumulative alphas abar_t is the variance-exploding process x = x_0 + sigma eps
with sigma_t = sqrt((1 - abar_t) / abar_t) (Karras et al. 2022, Table 1; Song et al. 2021, eq. 12's
x / sqrt(abar)). Between the training timesteps, log sigma is linear in t, so any sigma in the model's range
has a (fractional) timestep at which the network is evaluated.

Schedules: `n` decreasing sigmas followed by a final 0.
* `default`: the model's own sigmas at n timesteps spaced evenly from T-1 down to 0.
* `karras`: sigma_i = (sigma_max^(1/rho) + i/(n-1) (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho, rho = 7
  (Karras et al. 2022, eq. 5).
* `exponential`: evenly spaced in log sigma.
"""
from __future__ import annotations

import math

import torch

from ldm.models.diffusion.sampler_names import SCHEDULES
KARRAS_RHO = 7.0


def model_sigmas(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """sigma_t = sqrt((1 - abar_t) / abar_t) for every training timestep t (increasing with t), in float32."""
    alphas_cumprod = alphas_cumprod.detach().to(torch.float32)
    return ((1.0 - alphas_cumprod) / alphas_cumprod).sqrt()


def sigma_to_t(sigma: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The fractional timestep of each sigma: log sigma interpolated linearly between the two neighbouring
    training timesteps (clamped to [0, T-1])."""
    log_sigma = sigma.to(log_sigmas).log()
    distances = log_sigma - log_sigmas[:, None]
    low = distances.ge(0).cumsum(dim=0).argmax(dim=0).clamp(max=log_sigmas.shape[0] - 2)
    high = low + 1
    weight = ((log_sigmas[low] - log_sigma) / (log_sigmas[low] - log_sigmas[high])).clamp(0, 1)
    t = (1 - weight) * low + weight * high
    return t.view(sigma.shape)


def t_to_sigma(t: torch.Tensor, log_sigmas: torch.Tensor) -> torch.Tensor:
    """sigma at (fractional) timesteps t: exp of log sigma interpolated linearly in t."""
    t = t.to(log_sigmas)
    low = t.floor().long()
    high = t.ceil().long()
    weight = t - low
    return ((1 - weight) * log_sigmas[low] + weight * log_sigmas[high]).exp()


def _append_zero(sigmas: torch.Tensor) -> torch.Tensor:
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def default_sigmas(n: int, log_sigmas: torch.Tensor) -> torch.Tensor:
    """The model's sigmas at n timesteps evenly spaced from T-1 down to 0, then 0."""
    t = torch.linspace(log_sigmas.shape[0] - 1, 0, n, dtype=log_sigmas.dtype, device=log_sigmas.device)
    return _append_zero(t_to_sigma(t, log_sigmas))


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = KARRAS_RHO) -> torch.Tensor:
    """Karras et al. 2022, eq. 5: n sigmas from sigma_max to sigma_min, evenly spaced in sigma^(1/rho), then 0
    (computed on the CPU in float64, returned in float32)."""
    ramp = torch.linspace(0, 1, n, dtype=torch.float64)
    max_inv_rho, min_inv_rho = sigma_max ** (1 / rho), sigma_min ** (1 / rho)
    return _append_zero(((max_inv_rho + ramp * (min_inv_rho - max_inv_rho)) ** rho).to(torch.float32))


def exponential_sigmas(n: int, sigma_min: float, sigma_max: float) -> torch.Tensor:
    """n sigmas from sigma_max to sigma_min evenly spaced in log sigma, then 0."""
    log_sigmas = torch.linspace(math.log(sigma_max), math.log(sigma_min), n, dtype=torch.float64)
    return _append_zero(log_sigmas.exp().to(torch.float32))


def make_sigmas(schedule: str, n: int, log_sigmas: torch.Tensor) -> torch.Tensor:
    """`n` + 1 float32 sigmas of `schedule` ('default', 'karras', 'exponential') for a model with training `log_sigmas`;
    karras and exponential span the model's own range [sigma_min, sigma_max]."""
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"the number of sampling steps must be a positive integer, got {n!r}")
    if schedule == "default":
        return default_sigmas(n, log_sigmas)
    sigma_min, sigma_max = log_sigmas[0].exp().item(), log_sigmas[-1].exp().item()
    if schedule == "karras":
        return karras_sigmas(n, sigma_min, sigma_max).to(log_sigmas.device)
    if schedule == "exponential":
        return exponential_sigmas(n, sigma_min, sigma_max).to(log_sigmas.device)
    raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
