"""DDIM sampling (Song et al. 2021, arXiv:2010.02502) with the original `DDIMSampler` API."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.sampling import (
    DenoisedFn,
    Denoiser,
    Step,
    check_batch_size,
    check_sampler_options,
    corrected_denoiser,
    ddim_step,
    first_stage_quantizer,
    guided_denoiser,
    keep_known_region,
    sample_loop,
    step_noise,
)
from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
)


@dataclass(frozen=True)
class StepOptions:
    """The per-step options of the original's `p_sample_ddim`: which schedule, what is done to the predicted
    x_0 (`denoised_fn`, e.g. the VQ quantizer) and how the noise is drawn (see `step_noise`)."""

    use_original_steps: bool = False
    denoised_fn: Optional[DenoisedFn] = None
    temperature: float = 1.0
    noise_dropout: float = 0.0
    repeat_noise: bool = False
    generator: Optional[torch.Generator] = None


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM over a sub-sequence of the model's 1000 timesteps."""

    progress_label = "DDIM Sampler"

    def __init__(self, model: Any, schedule: str = "linear"):
        """`schedule` is kept for the original's signature, which ignores it: the betas are the model's."""
        if schedule != "linear":
            raise ValueError(f"schedule={schedule!r} has no effect: the sampler uses the model's own betas "
                             "(the original ignored this argument too); leave it at 'linear'")
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_timesteps: Optional[np.ndarray] = None

    def register_buffer(self, name: str, value: Any) -> None:
        tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        setattr(self, name, tensor.to(device=self.model.device, dtype=torch.float32))

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Timesteps and the alpha_t, alpha_{t-1}, sigma_t(eta) of each DDIM step (Song et al. 2021, eq. 16)."""
        self.ddim_timesteps = make_ddim_timesteps(ddim_discretize, ddim_num_steps, self.ddpm_num_timesteps,
                                                  verbose=verbose)
        alphas_cumprod = self.model.alphas_cumprod
        if alphas_cumprod.shape[0] != self.ddpm_num_timesteps:
            raise ValueError("alphas have to be defined for each timestep")
        self.register_buffer("betas", self.model.betas)
        self.register_buffer("alphas_cumprod", alphas_cumprod)
        self.register_buffer("alphas_cumprod_prev", self.model.alphas_cumprod_prev)
        self.register_buffer("sqrt_alphas_cumprod", alphas_cumprod.sqrt())
        self.register_buffer("sqrt_one_minus_alphas_cumprod", (1.0 - alphas_cumprod).sqrt())
        sigmas, alphas, alphas_prev = make_ddim_sampling_parameters(alphas_cumprod.cpu(), self.ddim_timesteps,
                                                                    ddim_eta, verbose=verbose)
        self.register_buffer("ddim_sigmas", sigmas)
        self.register_buffer("ddim_alphas", alphas)
        self.register_buffer("ddim_alphas_prev", alphas_prev)
        self.register_buffer("ddim_sqrt_one_minus_alphas", np.sqrt(1.0 - alphas))
        cumprod_prev = self.alphas_cumprod_prev
        self.register_buffer("ddim_sigmas_for_original_num_steps", ddim_eta * torch.sqrt(
            (1 - cumprod_prev) / (1 - self.alphas_cumprod) * (1 - self.alphas_cumprod / cumprod_prev)))

    @torch.no_grad()
    def sample(self, S: int, batch_size: int, shape: Sequence[int], conditioning: Any = None,
               callback: Optional[Callable[[int], None]] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, quantize_x0: bool = False,
               eta: float = 0.0, mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
               temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
               corrector_kwargs: Optional[Mapping[str, Any]] = None, verbose: bool = True,
               x_T: Optional[torch.Tensor] = None, log_every_t: int = 100, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, repeat_noise: bool = False,
               generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates).

        The original's options, as it honours them: `x_T` the start noise (else drawn); `eta` the DDIM
        stochasticity; `temperature` and `noise_dropout` scale and drop out the noise of each step;
        `score_corrector.modify_score(model, eps, x, t, c, **corrector_kwargs)` replaces each eps;
        `quantize_x0` passes the predicted x_0 through a VQ first stage's codebook (refused without one);
        `mask`/`x0` keep x0, noised to each step, where mask is 1; `callback(i)` and `img_callback(pred_x0, i)`
        follow each step; `log_every_t` spaces the intermediates. Refused: `normals_sequence`, which the
        original accepted and never used. Added: `repeat_noise` (one noise for the whole batch at each step,
        as `p_sample_ddim`'s) and `generator` (every draw from it instead of the global stream).
        """
        check_batch_size(conditioning, batch_size)
        check_sampler_options(normals_sequence=normals_sequence, mask=mask, x0=x0, log_every_t=log_every_t)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        return self.ddim_sampling(conditioning, (batch_size, *shape), x_T=x_T, callback=callback,
                                  img_callback=img_callback, quantize_denoised=quantize_x0, mask=mask, x0=x0,
                                  log_every_t=log_every_t, temperature=temperature, noise_dropout=noise_dropout,
                                  score_corrector=score_corrector, corrector_kwargs=corrector_kwargs,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, verbose=verbose,
                                  repeat_noise=repeat_noise, generator=generator)

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape: Sequence[int], x_T: Optional[torch.Tensor] = None,
                      ddim_use_original_steps: bool = False, callback: Optional[Callable[[int], None]] = None,
                      timesteps: Optional[int] = None, quantize_denoised: bool = False,
                      mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                      img_callback: Optional[Callable[[torch.Tensor, int], None]] = None, log_every_t: int = 100,
                      temperature: float = 1.0, noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: Optional[Mapping[str, Any]] = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      verbose: bool = True, repeat_noise: bool = False,
                      generator: Optional[torch.Generator] = None
                      ) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
        """The sampling loop of a made schedule (its first `timesteps` steps, or all 1000 with
        `ddim_use_original_steps`), with this sampler's step; the options are `sample`'s."""
        check_sampler_options(mask=mask, x0=x0, log_every_t=log_every_t)
        denoise = self._denoiser(cond, unconditional_conditioning, unconditional_guidance_scale, score_corrector,
                                 corrector_kwargs)
        options = self._step_options(ddim_use_original_steps, quantize_denoised, temperature, noise_dropout,
                                     repeat_noise, generator)
        img = torch.randn(shape, device=self.model.device, generator=generator) if x_T is None else x_T
        time_range = self._time_range(ddim_use_original_steps, timesteps)
        step = self._make_step(denoise, time_range, options)
        if mask is not None:
            step = keep_known_region(step, x0, mask, self.model.q_sample, generator)
        return sample_loop(step, img, time_range, desc=self.progress_label, verbose=verbose, callback=callback,
                           img_callback=img_callback, log_every_t=log_every_t)

    def _time_range(self, use_original_steps: bool, timesteps: Optional[int]) -> np.ndarray:
        """The decreasing timesteps a run visits, as the original's `ddim_sampling` chooses them."""
        if use_original_steps:
            return np.arange(self.ddpm_num_timesteps if timesteps is None else timesteps)[::-1]
        if timesteps is None:
            return np.flip(self.ddim_timesteps)
        subset_end = int(min(timesteps / self.ddim_timesteps.shape[0], 1) * self.ddim_timesteps.shape[0]) - 1
        return np.flip(self.ddim_timesteps[:subset_end])

    def _denoiser(self, cond: Any, unconditional_conditioning: Any, unconditional_guidance_scale: float,
                  score_corrector: Any, corrector_kwargs: Optional[Mapping[str, Any]]) -> Denoiser:
        guided = guided_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        return corrected_denoiser(guided, score_corrector, self.model, cond, corrector_kwargs)

    def _step_options(self, use_original_steps: bool, quantize_denoised: bool, temperature: float,
                      noise_dropout: float, repeat_noise: bool,
                      generator: Optional[torch.Generator]) -> StepOptions:
        return StepOptions(use_original_steps=use_original_steps,
                           denoised_fn=first_stage_quantizer(self.model) if quantize_denoised else None,
                           temperature=temperature, noise_dropout=noise_dropout, repeat_noise=repeat_noise,
                           generator=generator)

    def _make_step(self, denoise: Denoiser, time_range: np.ndarray, options: StepOptions) -> Step:
        """step(i, t, x): the DDIM update at the i-th of `time_range` (schedule index len - 1 - i)."""
        total = len(time_range)
        return lambda i, t, x: self._update(x, denoise(x, t), total - 1 - i, options)

    def _schedule(self, use_original_steps: bool):
        if use_original_steps:
            return (self.model.alphas_cumprod, self.model.alphas_cumprod_prev,
                    self.ddim_sigmas_for_original_num_steps)
        return self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas

    def _update(self, x: torch.Tensor, eps: torch.Tensor, index: int,
                options: StepOptions) -> tuple[torch.Tensor, torch.Tensor]:
        """x_t -> x_prev with the index-th alpha_t, alpha_prev, sigma_t; returns (x_prev, pred_x0)."""
        a_t, a_prev, sigma_t = (v[index].to(x.dtype) for v in self._schedule(options.use_original_steps))
        noise = step_noise(x, options.temperature, options.noise_dropout, options.repeat_noise, options.generator)
        return ddim_step(x, eps, a_t, a_prev, sigma_t, noise, options.denoised_fn)

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None,
                      corrector_kwargs: Optional[Mapping[str, Any]] = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      generator: Optional[torch.Generator] = None) -> tuple[torch.Tensor, torch.Tensor]:
        """One DDIM step from x at timestep t (the index-th of the schedule); returns (x_prev, pred_x0)."""
        denoise = self._denoiser(c, unconditional_conditioning, unconditional_guidance_scale, score_corrector,
                                 corrector_kwargs)
        options = self._step_options(use_original_steps, quantize_denoised, temperature, noise_dropout,
                                     repeat_noise, generator)
        return self._update(x, denoise(x, t), index, options)

    @torch.no_grad()
    def stochastic_encode(self, x0: torch.Tensor, t: torch.Tensor, use_original_steps: bool = False,
                          noise: Optional[torch.Tensor] = None,
                          generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Noise x0 to the t-th DDIM step: sqrt(abar) x0 + sqrt(1 - abar) eps (SDEdit, Meng et al. 2022)."""
        if use_original_steps:
            sqrt_alphas_cumprod = self.sqrt_alphas_cumprod
            sqrt_one_minus_alphas_cumprod = self.sqrt_one_minus_alphas_cumprod
        else:
            sqrt_alphas_cumprod = torch.sqrt(self.ddim_alphas)
            sqrt_one_minus_alphas_cumprod = self.ddim_sqrt_one_minus_alphas
        if noise is None:
            noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        t = t.to(sqrt_alphas_cumprod.device).long()
        return (extract_into_tensor(sqrt_alphas_cumprod, t, x0.shape).to(x0.dtype) * x0
                + extract_into_tensor(sqrt_one_minus_alphas_cumprod, t, x0.shape).to(x0.dtype) * noise)

    @torch.no_grad()
    def img2img(self, S: int, init_latent: torch.Tensor, strength: float, conditioning: Any,
                unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                noise: Optional[torch.Tensor] = None, generator: Optional[torch.Generator] = None,
                verbose: bool = True, callback: Optional[Callable[[int], None]] = None,
                eta: float = 0.0, mask: Optional[torch.Tensor] = None,
                x0: Optional[torch.Tensor] = None) -> torch.Tensor:
        """SDEdit (Meng et al. 2022) as the original img2img: the init latent noised to the t_enc-th of S DDIM
        steps, t_enc = int(strength * S), then t_enc steps of this sampler (`stochastic_encode`, then the loop of
        `decode`). Strength 1 is `sample` from x_T = noise (all the schedule's steps, from pure noise); strength 0
        returns the init latent. `mask`/`x0` keep x0, noised to each step, where mask is 1 (as `sample`)."""
        check_sampler_options(mask=mask, x0=x0)
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=False)
        t_enc = int(strength * S)
        if t_enc == 0:
            return init_latent
        if t_enc == S:
            x = noise if noise is not None else torch.randn(init_latent.shape, device=init_latent.device,
                                                            dtype=init_latent.dtype, generator=generator)
            time_range = np.flip(self.ddim_timesteps)
        else:
            t = torch.full((init_latent.shape[0],), t_enc, device=init_latent.device, dtype=torch.long)
            x = self.stochastic_encode(init_latent, t, noise=noise, generator=generator)
            time_range = np.flip(self.ddim_timesteps[:t_enc])
        denoise = self._denoiser(conditioning, unconditional_conditioning, unconditional_guidance_scale, None, None)
        step = self._make_step(denoise, time_range, StepOptions(generator=generator))
        if mask is not None:
            step = keep_known_region(step, x0, mask, self.model.q_sample, generator)
        samples, _ = sample_loop(step, x, time_range, desc=self.progress_label, verbose=verbose, callback=callback)
        return samples

    @torch.no_grad()
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Optional[Callable[[int], None]] = None, verbose: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Denoise a latent from the t_start-th DDIM step down to 0 with DDIM steps (the second half of img2img)."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        time_range = np.flip(timesteps[:t_start])
        denoise = self._denoiser(cond, unconditional_conditioning, unconditional_guidance_scale, None, None)
        # DDIM's step also in subclasses: the original's decode is DDIM's (its PLMSSampler has none).
        step = DDIMSampler._make_step(self, denoise, time_range, StepOptions(use_original_steps, generator=generator))
        x_dec, _ = sample_loop(step, x_latent, time_range, desc="Decoding image", verbose=verbose, callback=callback)
        return x_dec
