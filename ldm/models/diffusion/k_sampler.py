"""The k-diffusion samplers (`k_sampling`) behind the original samplers' `sample(S, batch_size, shape, ...)`.

    sampler = KDiffusionSampler(model, "dpmpp_2m", schedule="karras")
    samples, _ = sampler.sample(S=20, batch_size=1, shape=(4, 64, 64), conditioning=c,
                                unconditional_guidance_scale=7.5, unconditional_conditioning=uc)

The model is seen as a denoiser in sigma space (`SigmaDenoiser`) through the same classifier-free guided
network call as DDIM's; `S` is the number of sigma steps (the second-order samplers call the network about
twice per step).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.noise_samplers import BrownianTreeNoise, GaussianNoise, NoiseSampler
from ldm.models.diffusion.sampling import (
    check_batch_size,
    check_sampler_options,
    corrected_denoiser,
    first_stage_quantizer,
    guided_denoiser,
)
from ldm.models.diffusion.sigma_denoiser import SigmaDenoiser
from ldm.models.diffusion.sampler_names import SCHEDULES, sampler_label


@dataclass(frozen=True)
class KSamplerInfo:
    """A k-diffusion sampler: its function, whether it draws noise, whether that noise comes from a Brownian
    tree, and how many network calls a step makes (the last step makes one)."""

    function: Callable[..., torch.Tensor]
    stochastic: bool = False
    brownian: bool = False
    calls_per_step: int = 1


K_SAMPLERS: dict[str, KSamplerInfo] = {
    "lms": KSamplerInfo(k_sampling.sample_lms),
    "euler": KSamplerInfo(k_sampling.sample_euler),
    "euler_ancestral": KSamplerInfo(k_sampling.sample_euler_ancestral, stochastic=True),
    "heun": KSamplerInfo(k_sampling.sample_heun, calls_per_step=2),
    "dpm_2": KSamplerInfo(k_sampling.sample_dpm_2, calls_per_step=2),
    "dpm_2_ancestral": KSamplerInfo(k_sampling.sample_dpm_2_ancestral, stochastic=True, calls_per_step=2),
    "dpmpp_2s_ancestral": KSamplerInfo(k_sampling.sample_dpmpp_2s_ancestral, stochastic=True,
                                       calls_per_step=2),
    "dpmpp_2m": KSamplerInfo(k_sampling.sample_dpmpp_2m),
    "dpmpp_sde": KSamplerInfo(k_sampling.sample_dpmpp_sde, stochastic=True, brownian=True,
                              calls_per_step=2),
    "dpmpp_2m_sde": KSamplerInfo(k_sampling.sample_dpmpp_2m_sde, stochastic=True, brownian=True),
}

_LOOP_ARGUMENTS = {"denoise", "x", "sigmas", "callback", "progress", "noise"}


def sampler_options(name: str) -> dict[str, Any]:
    """The options a k-diffusion sampler takes (eta, s_noise, s_churn, order, ...) with their defaults."""
    parameters = inspect.signature(K_SAMPLERS[name].function).parameters
    return {key: p.default for key, p in parameters.items() if key not in _LOOP_ARGUMENTS}


class KDiffusionSampler:
    """A k-diffusion sampler over a latent diffusion model, with the original samplers' `sample` signature.

    `options` are the sampler's own (`sampler_options(name)`: eta and s_noise of the ancestral and SDE samplers,
    Karras et al.'s s_churn/s_tmin/s_tmax/s_noise for euler, heun and dpm_2, the order of lms, ...), with the
    papers' defaults.
    """

    def __init__(self, model: Any, sampler: str = "dpmpp_2m", schedule: str = "default", **options: Any):
        if sampler not in K_SAMPLERS:
            raise ValueError(f"unknown k-diffusion sampler {sampler!r}; choose from {', '.join(K_SAMPLERS)}")
        if schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {schedule!r}; choose from {', '.join(SCHEDULES)}")
        known = sampler_options(sampler)
        unknown = sorted(set(options) - set(known))
        if unknown:
            raise ValueError(f"{sampler} takes no option {', '.join(unknown)}; its options are "
                             f"{', '.join(known) or 'none'}")
        self.model = model
        self.name = sampler
        self.info = K_SAMPLERS[sampler]
        self.schedule = schedule
        self.options = options
        self.progress_label = f"{sampler_label(sampler, schedule)} Sampler"

    def get_sigmas(self, S: int) -> torch.Tensor:
        """The S + 1 sigmas of this sampler's schedule for this model, on its device."""
        return self._denoiser_over(lambda x, t: x).get_sigmas(S, self.schedule).to(self.model.device)

    def _denoiser_over(self, network: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> SigmaDenoiser:
        return SigmaDenoiser(network, self.model.alphas_cumprod, getattr(self.model, "parameterization", "eps"))

    def _noise(self, x: torch.Tensor, sigmas: torch.Tensor, generator: Optional[torch.Generator]) -> NoiseSampler:
        if self.info.brownian:
            positive = sigmas[sigmas > 0]
            return BrownianTreeNoise(x, positive.min().item(), positive.max().item(), generator=generator)
        return GaussianNoise(x, generator=generator)

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[Mapping[str, Any]] = None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates).

        As `DDIMSampler.sample`: `x_T` is the start noise N(0, I) (scaled by the first sigma here; drawn from
        `generator` when None), `score_corrector`, `quantize_x0` (on each denoised x_0), `mask`/`x0` (the
        denoised x_0 keeps x0 where mask is 1), `callback(i)`, `img_callback(denoised, i)`, `log_every_t`.
        Refused: `eta`, `temperature` and `noise_dropout` (DDIM's; the ancestral and SDE samplers take
        `eta` and `s_noise` as options of this class), `normals_sequence`.
        """
        for name, value, default in (("eta", eta, 0.0), ("temperature", temperature, 1.0),
                                     ("noise_dropout", noise_dropout, 0.0)):
            if value != default:
                raise ValueError(f"{name} is an option of DDIM's update; {self.name} takes "
                                 f"{', '.join(sampler_options(self.name)) or 'no options'} in "
                                 f"KDiffusionSampler(model, {self.name!r}, ...)")
        check_batch_size(conditioning, batch_size)
        check_sampler_options(normals_sequence=normals_sequence, mask=mask, x0=x0, log_every_t=log_every_t)
        sigmas = self.get_sigmas(S)
        if x_T is None:
            x_T = torch.randn((batch_size, *shape), device=self.model.device, generator=generator)
        return self._run(x_T * sigmas[0], sigmas, conditioning, unconditional_conditioning,
                         unconditional_guidance_scale, score_corrector=score_corrector,
                         corrector_kwargs=corrector_kwargs, quantize_x0=quantize_x0, mask=mask, x0=x0,
                         callback=callback, img_callback=img_callback, log_every_t=log_every_t, verbose=verbose,
                         generator=generator)

    @torch.no_grad()
    def img2img(self, S: int, init_latent: torch.Tensor, strength: float, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                verbose: bool = True, callback: Optional[Callable[[int], None]] = None,
                mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SDEdit (Meng et al. 2022) in sigma space: the last int(strength * S) of the S steps, from the init
        latent noised to their first sigma, x = x_0 + sigma noise. Strength 1 starts from pure noise (the same
        start as `sample` with x_T = noise); strength 0 returns the init latent. `mask`/`x0` keep x0 where mask
        is 1 (as `sample`)."""
        check_sampler_options(mask=mask, x0=x0)
        steps = int(strength * S)
        if steps == 0:
            return init_latent
        sigmas = self.get_sigmas(S)[S - steps:]
        if noise is None:
            noise = torch.randn(init_latent.shape, device=init_latent.device, dtype=init_latent.dtype,
                                generator=generator)
        x = noise * sigmas[0] if steps == S else init_latent + noise * sigmas[0]
        samples, _ = self._run(x, sigmas, conditioning, unconditional_conditioning, unconditional_guidance_scale,
                               mask=mask, x0=x0, callback=callback, verbose=verbose, generator=generator)
        return samples

    def _run(self, x: torch.Tensor, sigmas: torch.Tensor, conditioning: Any, unconditional_conditioning: Any,
             guidance_scale: float, score_corrector: Any = None, corrector_kwargs: Optional[Mapping[str, Any]] = None,
             quantize_x0: bool = False, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
             callback: Optional[Callable[[int], None]] = None,
             img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, log_every_t: int = 100,
             verbose: bool = True, generator: Optional[torch.Generator] = None
             ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Run the sampler from x over `sigmas` with the guided, corrected network."""
        network = corrected_denoiser(
            guided_denoiser(self.model, conditioning, unconditional_conditioning, guidance_scale),
            score_corrector, self.model, conditioning, corrector_kwargs)
        denoiser = self._denoiser_over(network)
        quantize = first_stage_quantizer(self.model) if quantize_x0 else None

        def denoise(x_in: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            denoised = denoiser(x_in, sigma)
            if quantize is not None:
                denoised = quantize(denoised)
            if mask is not None:
                denoised = x0 * mask + (1.0 - mask) * denoised
            return denoised

        intermediates = {"x_inter": [x], "pred_x0": [x]}
        total = len(sigmas) - 1

        def report(step: k_sampling.StepInfo) -> None:
            if callback:
                callback(step.i)
            if img_callback:
                img_callback(step.denoised, step.i)
            index = total - step.i - 1
            if index % log_every_t == 0 or index == total - 1:
                intermediates["x_inter"].append(step.x)
                intermediates["pred_x0"].append(step.denoised)

        def progress(n: int) -> Any:
            return tqdm(range(n), desc=self.progress_label, disable=not verbose)

        kwargs = dict(self.options)
        if "noise" in inspect.signature(self.info.function).parameters:
            kwargs["noise"] = self._noise(x, sigmas, generator)
        samples = self.info.function(denoise, x, sigmas, callback=report, progress=progress, **kwargs)
        return samples, intermediates
