"""Samplers by name, for command lines and scripts."""
from __future__ import annotations

from typing import Any

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.k_sampler import K_SAMPLERS, KDiffusionSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampler_names import SAMPLER_NAMES, SCHEDULES, takes_sigmas

SAMPLER_CLASSES = {"ddim": DDIMSampler, "plms": PLMSSampler, "dpm_solver": DPMSolverSampler}


def make_sampler(name: str, model: Any, schedule: str = "default") -> Any:
    """The sampler `name` over `model`: DDIM, PLMS or DPM-Solver++ on the model's timesteps, or a k-diffusion
    sampler on the sigmas of `schedule` ('default', 'karras', 'exponential')."""
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
    if takes_sigmas(name):
        return KDiffusionSampler(model, name, schedule)
    if name not in SAMPLER_CLASSES:
        raise ValueError(f"unknown sampler {name!r}; choose from {', '.join(SAMPLER_NAMES)}")
    if schedule != "default":
        raise ValueError(f"the {name} sampler runs on the model's timesteps and takes no sigma schedule; "
                         f"the {schedule} schedule needs a k-diffusion sampler ({', '.join(K_SAMPLERS)})")
    return SAMPLER_CLASSES[name](model)
