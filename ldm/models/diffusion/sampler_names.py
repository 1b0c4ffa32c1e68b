"""Every sampler's name, its label in the web UIs and the sigma schedules, without importing torch (the command
lines check their flags against these before the model stack loads)."""
from __future__ import annotations

TIMESTEP_SAMPLER_LABELS = {"ddim": "DDIM", "plms": "PLMS", "dpm_solver": "DPM-Solver++ 2M"}
"""Samplers on the model's discrete timesteps."""

K_SAMPLER_LABELS = {
    "lms": "LMS", "euler": "Euler", "euler_ancestral": "Euler a", "heun": "Heun", "dpm_2": "DPM2",
    "dpm_2_ancestral": "DPM2 a", "dpmpp_2s_ancestral": "DPM++ 2S a", "dpmpp_2m": "DPM++ 2M",
    "dpmpp_sde": "DPM++ SDE", "dpmpp_2m_sde": "DPM++ 2M SDE",
}
"""The k-diffusion samplers, on a sigma schedule."""

SAMPLER_NAMES = (*TIMESTEP_SAMPLER_LABELS, *K_SAMPLER_LABELS)
SCHEDULES = ("default", "karras", "exponential")
SCHEDULE_LABELS = {"default": "", "karras": " Karras", "exponential": " Exponential"}


def takes_sigmas(name: str) -> bool:
    """Whether a sampler runs on a sigma schedule (a k-diffusion sampler), and so takes a schedule."""
    return name in K_SAMPLER_LABELS


def sampler_label(name: str, schedule: str = "default") -> str:
    """The web UIs' name of a sampler and schedule: 'DPM++ 2M Karras', 'Euler a', 'DDIM'."""
    if takes_sigmas(name):
        return K_SAMPLER_LABELS[name] + SCHEDULE_LABELS[schedule]
    return TIMESTEP_SAMPLER_LABELS[name]
