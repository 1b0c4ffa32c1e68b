"""Learning-rate multipliers for `torch.optim.lr_scheduler.LambdaLR`, as in the original `ldm`:
a linear warm-up followed by cosine or linear decay, optionally in repeated cycles."""
from __future__ import annotations

from typing import Sequence

import numpy as np


class LambdaWarmUpCosineScheduler:
    """Linear warm-up from lr_start to lr_max over `warm_up_steps`, then cosine decay to lr_min at max_decay_steps."""

    def __init__(self, warm_up_steps: int, lr_min: float, lr_max: float, lr_start: float, max_decay_steps: int,
                 verbosity_interval: int = 0):
        self.lr_warm_up_steps = warm_up_steps
        self.lr_start = lr_start
        self.lr_min = lr_min
        self.lr_max = lr_max
        self.lr_max_decay_steps = max_decay_steps
        self.last_lr = 0.0
        self.verbosity_interval = verbosity_interval

    def schedule(self, n: int, **kwargs) -> float:
        if n < self.lr_warm_up_steps:
            lr = (self.lr_max - self.lr_start) / self.lr_warm_up_steps * n + self.lr_start
        else:
            t = (n - self.lr_warm_up_steps) / (self.lr_max_decay_steps - self.lr_warm_up_steps)
            t = min(t, 1.0)
            lr = self.lr_min + 0.5 * (self.lr_max - self.lr_min) * (1 + np.cos(t * np.pi))
        self.last_lr = lr
        return lr

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaWarmUpCosineScheduler2:
    """Repeated cycles, each a linear warm-up from f_start to f_max, then cosine decay to f_min."""

    def __init__(self, warm_up_steps: Sequence[int], f_min: Sequence[float], f_max: Sequence[float],
                 f_start: Sequence[float], cycle_lengths: Sequence[int], verbosity_interval: int = 0):
        if not len(warm_up_steps) == len(f_min) == len(f_max) == len(f_start) == len(cycle_lengths):
            raise ValueError("warm_up_steps, f_min, f_max, f_start and cycle_lengths need one entry per cycle")
        self.lr_warm_up_steps = list(warm_up_steps)
        self.f_start = list(f_start)
        self.f_min = list(f_min)
        self.f_max = list(f_max)
        self.cycle_lengths = list(cycle_lengths)
        self.cum_cycles = np.cumsum([0] + list(cycle_lengths)).tolist()
        self.last_f = 0.0
        self.verbosity_interval = verbosity_interval

    def find_in_interval(self, n: int) -> int:
        for cycle, end in enumerate(self.cum_cycles[1:]):
            if n <= end:
                return cycle
        return len(self.cycle_lengths) - 1

    def schedule(self, n: int, **kwargs) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            t = (n - self.lr_warm_up_steps[cycle]) / (self.cycle_lengths[cycle] - self.lr_warm_up_steps[cycle])
            t = min(t, 1.0)
            f = self.f_min[cycle] + 0.5 * (self.f_max[cycle] - self.f_min[cycle]) * (1 + np.cos(t * np.pi))
        self.last_f = f
        return f

    def __call__(self, n: int, **kwargs) -> float:
        return self.schedule(n, **kwargs)


class LambdaLinearScheduler(LambdaWarmUpCosineScheduler2):
    """Like `LambdaWarmUpCosineScheduler2` but decays linearly from f_max to f_min over each cycle."""

    def schedule(self, n: int, **kwargs) -> float:
        cycle = self.find_in_interval(n)
        n = n - self.cum_cycles[cycle]
        if n < self.lr_warm_up_steps[cycle]:
            f = (self.f_max[cycle] - self.f_start[cycle]) / self.lr_warm_up_steps[cycle] * n + self.f_start[cycle]
        else:
            f = self.f_min[cycle] + (self.f_max[cycle] - self.f_min[cycle]) * (self.cycle_lengths[cycle] - n) / (
                self.cycle_lengths[cycle])
        self.last_f = f
        return f
