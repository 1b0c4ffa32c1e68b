"""A discrete-time latent diffusion model seen as a denoiser D(x; sigma) in sigma space.

With x = x_0 + sigma eps (the variance-exploding view of the model, see `sigma_schedules`), the network's
input is the variance-preserving x_t = x / sqrt(sigma^2 + 1) at the timestep t(sigma), and
D(x; sigma) = x - sigma eps_theta(x_t, t) for a model that predicts the noise, or its x_0 prediction directly
(Karras et al. 2022, arXiv:2206.00364, Table 1, "VP": c_skip = 1, c_out = -sigma, c_in = 1 / sqrt(sigma^2 + 1)).
"""
from __future__ import annotations

from typing import Callable

import torch

from ldm.models.diffusion.sigma_schedules import make_sigmas, model_sigmas, sigma_to_t

ModelOutput = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
"""model_output(x_t, t) -> eps (or x_0): the network at (fractional) timesteps t, e.g. `guided_denoiser`'s."""


class SigmaDenoiser:
    """D(x; sigma) of a model whose network output is `model_output(x_t, t)`."""

    def __init__(self, model_output: ModelOutput, alphas_cumprod: torch.Tensor, parameterization: str = "eps"):
        if parameterization not in ("eps", "x0"):
            raise ValueError(f"a sigma-space denoiser needs an 'eps' or 'x0' model, not {parameterization!r}")
        self.model_output = model_output
        self.parameterization = parameterization
        self.sigmas = model_sigmas(alphas_cumprod)
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return self.sigmas[0].item()

    @property
    def sigma_max(self) -> float:
        return self.sigmas[-1].item()

    def get_sigmas(self, n: int, schedule: str = "default") -> torch.Tensor:
        """n + 1 decreasing sigmas of `schedule`, the last 0 (see `sigma_schedules.make_sigmas`)."""
        return make_sigmas(schedule, n, self.log_sigmas)

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        return sigma_to_t(sigma, self.log_sigmas.to(sigma.device))

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """The denoised x_0 for a batch x at noise levels `sigma` (one per sample)."""
        sigma = sigma.to(device=x.device, dtype=torch.float32)
        scale = (sigma ** 2 + 1).rsqrt().to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
        output = self.model_output(x * scale, self.sigma_to_t(sigma))
        if self.parameterization == "x0":
            return output
        return x - output * sigma.to(x.dtype).view(-1, *([1] * (x.ndim - 1)))
