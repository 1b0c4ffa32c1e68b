"""DDIM sampling (Song et al. 2021, arXiv:2010.02502) with the original `DDIMSampler` API."""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from tqdm.auto import tqdm

from ldm.models.diffusion.sampling import ddim_step, guided_denoiser
from ldm.modules.diffusionmodules.util import (
    extract_into_tensor,
    make_ddim_sampling_parameters,
    make_ddim_timesteps,
    noise_like,
)


class DDIMSampler:
    """Deterministic (eta = 0) or stochastic DDIM over a sub-sequence of the model's 1000 timesteps."""

    def __init__(self, model: Any, schedule: str = "linear", **kwargs):
        self.model = model
        self.ddpm_num_timesteps = model.num_timesteps
        self.schedule = schedule
        self.ddim_timesteps: Optional[np.ndarray] = None

    def register_buffer(self, name: str, value: Any) -> None:
        tensor = value.detach().clone() if isinstance(value, torch.Tensor) else torch.as_tensor(np.asarray(value))
        setattr(self, name, tensor.to(device=self.model.device, dtype=torch.float32))

    def make_schedule(self, ddim_num_steps: int, ddim_discretize: str = "uniform", ddim_eta: float = 0.0,
                      verbose: bool = True) -> None:
        """Timesteps and the alpha_t, alpha_{t-1}, sigma_t(eta) of each DDIM step."""
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
               callback: Optional[Callable] = None, normals_sequence: Any = None,
               img_callback: Optional[Callable] = None, quantize_x0: bool = False, eta: float = 0.0,
               mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None, temperature: float = 1.0,
               noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: Any = None,
               verbose: bool = True, x_T: Optional[torch.Tensor] = None, log_every_t: int = 100,
               unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
               generator: Optional[torch.Generator] = None, **kwargs):
        """Sample `batch_size` latents of `shape` (C, H, W) in S steps; returns (samples, intermediates)."""
        if conditioning is not None and not isinstance(conditioning, dict):
            count = len(conditioning) if isinstance(conditioning, list) else conditioning.shape[0]
            if count != batch_size:
                raise ValueError(f"got {count} conditionings for a batch of {batch_size}")
        self.make_schedule(ddim_num_steps=S, ddim_eta=eta, verbose=verbose)
        return self.ddim_sampling(conditioning, (batch_size, *shape), x_T=x_T, callback=callback,
                                  img_callback=img_callback, mask=mask, x0=x0, log_every_t=log_every_t,
                                  temperature=temperature, noise_dropout=noise_dropout,
                                  unconditional_guidance_scale=unconditional_guidance_scale,
                                  unconditional_conditioning=unconditional_conditioning, verbose=verbose,
                                  generator=generator)

    @torch.no_grad()
    def ddim_sampling(self, cond: Any, shape: Sequence[int], x_T: Optional[torch.Tensor] = None,
                      ddim_use_original_steps: bool = False, callback: Optional[Callable] = None,
                      timesteps: Optional[int] = None, quantize_denoised: bool = False,
                      mask: Optional[torch.Tensor] = None, x0: Optional[torch.Tensor] = None,
                      img_callback: Optional[Callable] = None, log_every_t: int = 100, temperature: float = 1.0,
                      noise_dropout: float = 0.0, unconditional_guidance_scale: float = 1.0,
                      unconditional_conditioning: Any = None, verbose: bool = True,
                      generator: Optional[torch.Generator] = None):
        device = self.model.device
        batch = shape[0]
        img = torch.randn(shape, device=device, generator=generator) if x_T is None else x_T
        if timesteps is None:
            timesteps = self.ddpm_num_timesteps if ddim_use_original_steps else self.ddim_timesteps
        elif not ddim_use_original_steps:
            subset_end = int(min(timesteps / self.ddim_timesteps.shape[0], 1) * self.ddim_timesteps.shape[0]) - 1
            timesteps = self.ddim_timesteps[:subset_end]
        intermediates = {"x_inter": [img], "pred_x0": [img]}
        time_range = (list(reversed(range(0, timesteps))) if ddim_use_original_steps else np.flip(timesteps))
        total_steps = timesteps if ddim_use_original_steps else timesteps.shape[0]
        denoise = guided_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        for i, step in enumerate(tqdm(time_range, desc="DDIM Sampler", total=total_steps, disable=not verbose)):
            index = total_steps - i - 1
            ts = torch.full((batch,), int(step), device=device, dtype=torch.long)
            if mask is not None:
                img_orig = self.model.q_sample(x0, ts)
                img = img_orig * mask + (1.0 - mask) * img
            img, pred_x0 = self._step(denoise, img, ts, index, ddim_use_original_steps, temperature, noise_dropout,
                                      quantize_denoised, generator)
            if callback:
                callback(i)
            if img_callback:
                img_callback(pred_x0, i)
            if index % log_every_t == 0 or index == total_steps - 1:
                intermediates["x_inter"].append(img)
                intermediates["pred_x0"].append(pred_x0)
        return img, intermediates

    def _schedule(self, use_original_steps: bool):
        if use_original_steps:
            return (self.model.alphas_cumprod, self.model.alphas_cumprod_prev,
                    self.ddim_sigmas_for_original_num_steps)
        return self.ddim_alphas, self.ddim_alphas_prev, self.ddim_sigmas

    def _step(self, denoise: Callable, x: torch.Tensor, t: torch.Tensor, index: int, use_original_steps: bool,
              temperature: float, noise_dropout: float, quantize_denoised: bool,
              generator: Optional[torch.Generator]) -> tuple[torch.Tensor, torch.Tensor]:
        e_t = denoise(x, t)
        alphas, alphas_prev, sigmas = self._schedule(use_original_steps)
        a_t, a_prev, sigma_t = alphas[index], alphas_prev[index], sigmas[index]
        # Noise is drawn even when sigma_t = 0 so that the random stream, and so every later
        # draw of a run, matches the original sampler for the same seed.
        noise = noise_like(x.shape, x.device, generator=generator).to(x.dtype) * temperature
        if noise_dropout > 0.0:
            noise = torch.nn.functional.dropout(noise, p=noise_dropout)
        if quantize_denoised:
            raise NotImplementedError("quantize_denoised needs a VQ first stage, which Stable Diffusion does not have")
        a_t, a_prev, sigma_t = (v.to(x.dtype) for v in (a_t, a_prev, sigma_t))
        return ddim_step(x, e_t, a_t, a_prev, sigma_t, noise)

    @torch.no_grad()
    def p_sample_ddim(self, x: torch.Tensor, c: Any, t: torch.Tensor, index: int, repeat_noise: bool = False,
                      use_original_steps: bool = False, quantize_denoised: bool = False, temperature: float = 1.0,
                      noise_dropout: float = 0.0, score_corrector: Any = None, corrector_kwargs: Any = None,
                      unconditional_guidance_scale: float = 1.0, unconditional_conditioning: Any = None,
                      generator: Optional[torch.Generator] = None):
        """One DDIM step from x at timestep t (the index-th of the schedule); returns (x_prev, pred_x0)."""
        denoise = guided_denoiser(self.model, c, unconditional_conditioning, unconditional_guidance_scale)
        return self._step(denoise, x, t, index, use_original_steps, temperature, noise_dropout, quantize_denoised,
                          generator)

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
    def decode(self, x_latent: torch.Tensor, cond: Any, t_start: int, unconditional_guidance_scale: float = 1.0,
               unconditional_conditioning: Any = None, use_original_steps: bool = False,
               callback: Optional[Callable] = None, verbose: bool = True,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Denoise a latent from the t_start-th DDIM step down to 0 (the second half of img2img)."""
        timesteps = np.arange(self.ddpm_num_timesteps) if use_original_steps else self.ddim_timesteps
        timesteps = timesteps[:t_start]
        time_range = np.flip(timesteps)
        total_steps = timesteps.shape[0]
        denoise = guided_denoiser(self.model, cond, unconditional_conditioning, unconditional_guidance_scale)
        x_dec = x_latent
        for i, step in enumerate(tqdm(time_range, desc="Decoding image", total=total_steps, disable=not verbose)):
            index = total_steps - i - 1
            ts = torch.full((x_latent.shape[0],), int(step), device=x_latent.device, dtype=torch.long)
            x_dec, _ = self._step(denoise, x_dec, ts, index, use_original_steps, 1.0, 0.0, False, generator)
            if callback:
                callback(i)
        return x_dec
