"""The noise the stochastic samplers add: z(sigma, sigma_next) ~ N(0, I), one tensor the size of x per step.

* `GaussianNoise`: an independent draw per step from one generator (the global stream when None).
* `BrownianTreeNoise`: the increment of one Brownian motion W over [sigma_next, sigma], normalised,
  z = (W(sigma) - W(sigma_next)) / sqrt(sigma - sigma_next), as the SDE solvers of DPM-Solver++
  (Lu et al. 2022, arXiv:2211.01095, sec. 5) assume. The path is fixed by one seed drawn from the run's
  generator, so a seed gives the same image for any step count's queries, and nearby step counts give
  similar images. The tree (torchsde's Brownian interval) lives on the CPU in float32: the same noise on every
  device, and no float64 where a device has none (MPS).
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

NoiseSampler = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
_END_MARGIN = 1e-4


class GaussianNoise:
    """A fresh N(0, I) draw the shape of x at each call."""

    def __init__(self, x: torch.Tensor, generator: Optional[torch.Generator] = None):
        self.shape, self.dtype, self.device, self.generator = x.shape, x.dtype, x.device, generator

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        return torch.randn(self.shape, dtype=self.dtype, device=self.device, generator=self.generator)


def _seed_from(generator: Optional[torch.Generator]) -> int:
    """A 63-bit seed drawn from `generator` (the global stream when None)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2 ** 63 - 1, (), generator=generator, device=device).item())


class BrownianTreeNoise:
    """Normalised increments of one Brownian motion over [sigma_min, sigma_max], seeded from `generator`."""

    def __init__(self, x: torch.Tensor, sigma_min: float, sigma_max: float,
                 generator: Optional[torch.Generator] = None, seed: Optional[int] = None):
        import torchsde

        self.dtype, self.device = x.dtype, x.device
        # The tree rounds its ends to its tolerance: a margin keeps the schedule's own sigmas inside it.
        margin = _END_MARGIN * (float(sigma_max) - float(sigma_min))
        self.t0, self.t1 = float(sigma_min) - margin, float(sigma_max) + margin
        entropy = _seed_from(generator) if seed is None else seed
        w0 = torch.zeros(x.shape, dtype=torch.float32)
        self.tree = torchsde.BrownianTree(self.t0, w0, self.t1, entropy=entropy)

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        low, high = sorted((float(sigma), float(sigma_next)))
        if not self.t0 <= low < high <= self.t1:
            raise ValueError(f"the Brownian tree spans sigmas [{self.t0}, {self.t1}]; cannot draw over "
                             f"[{float(sigma_next)}, {float(sigma)}]")
        increment = self.tree(low, high) / (high - low) ** 0.5
        return increment.to(device=self.device, dtype=self.dtype)
