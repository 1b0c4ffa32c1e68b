"""Samplers by name, for command lines and scripts."""
from __future__ import annotations

from typing import Any

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler

SAMPLER_CLASSES = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm_solver": DPMSolverSampler}


def make_sampler(name: str, model: Any) -> Any:
    """A DDIM, PLMS or DPM-Solver++ sampler over `model`."""
    try:
        return SAMPLER_CLASSES[name](model)
    except KeyError:
        raise ValueError(f"unknown sampler {name!r}; choose from {sorted(SAMPLER_CLASSES)}") from None
