"""Sampler maths as small functions over a denoiser, in the style of k-diffusion.

A denoiser maps (x_t, t) to the predicted noise eps; `guided_denoiser` builds one from a
latent diffusion model with classifier-free guidance (Ho & Salimans 2022, eq. 6):
eps = eps(x, uc) + scale * (eps(x, c) - eps(x, uc)).

A sampler is a `Step`, step(i, t, x) -> (x at the next timestep, predicted x_0), run by the one loop
`sample_loop` over decreasing timesteps; DDIM, PLMS and DPM-Solver++(2M) differ only in their steps.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

import torch
from tqdm.auto import tqdm

from ldm.modules.diffusionmodules.util import noise_like

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Step = Callable[[int, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
DenoisedFn = Callable[[torch.Tensor], torch.Tensor]


def guided_denoiser(model: Any, conditioning: Any, unconditional_conditioning: Any = None,
                    guidance_scale: float = 1.0) -> Denoiser:
    """eps(x, t) of `model.apply_model`, with classifier-free guidance when a scale != 1 and `uc` are given.

    The conditional and unconditional branches run as one batch of twice the size, [uc, c], as in the original,
    marked `guided_pair` (the same x and t under both conditionings), which an accelerated UNet may exploit.
    """
    if unconditional_conditioning is None or guidance_scale == 1.0:
        return lambda x, t: model.apply_model(x, t, conditioning)

    if isinstance(conditioning, dict):
        def merged(uc_value, c_value):
            if isinstance(c_value, list):
                return [torch.cat([u, c]) for u, c in zip(uc_value, c_value)]
            return torch.cat([uc_value, c_value])

        c_in = {k: merged(unconditional_conditioning[k], conditioning[k]) for k in conditioning}
    else:
        c_in = torch.cat([unconditional_conditioning, conditioning])

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = model.apply_model(torch.cat([x, x]), torch.cat([t, t]), c_in, guided_pair=True)
        eps_uncond, eps_cond = both.chunk(2)
        return eps_uncond + guidance_scale * (eps_cond - eps_uncond)

    return denoise


def corrected_denoiser(denoiser: Denoiser, score_corrector: Any, model: Any, conditioning: Any,
                       corrector_kwargs: Optional[Mapping[str, Any]] = None) -> Denoiser:
    """eps replaced by `score_corrector.modify_score(model, eps, x, t, c, **corrector_kwargs)`, as the original.

    The hook of the original samplers for guidance by a score, e.g. a classifier's
    eps - sqrt(1 - abar_t) grad_x log p(y | x_t) (Dhariwal & Nichol 2021, eq. 14); it sees the guided eps.
    """
    if score_corrector is None:
        if corrector_kwargs is not None:
            raise ValueError("corrector_kwargs is given without a score_corrector to pass them to")
        return denoiser
    if getattr(model, "parameterization", "eps") != "eps":
        raise ValueError(f"score_corrector modifies a predicted noise eps, but this model predicts "
                         f"{model.parameterization!r}")
    if not callable(getattr(score_corrector, "modify_score", None)):
        raise ValueError("score_corrector must have a method modify_score(model, eps, x, t, c, **corrector_kwargs)")
    kwargs = dict(corrector_kwargs or {})
    return lambda x, t: score_corrector.modify_score(model, denoiser(x, t), x, t, conditioning, **kwargs)


def first_stage_quantizer(model: Any) -> DenoisedFn:
    """x_0 -> its nearest codebook entries, `model.first_stage_model.quantize` (VQ first stages only; the
    original's `quantize_x0`, van den Oord et al. 2017, eq. 2)."""
    quantize = getattr(getattr(model, "first_stage_model", None), "quantize", None)
    if quantize is None:
        name = type(getattr(model, "first_stage_model", model)).__name__
        raise ValueError(f"quantize_x0 needs a VQ first stage (first_stage_model.quantize); this model's first "
                         f"stage is {name}, which has no codebook")
    return lambda x0: quantize(x0)[0]


def check_sampler_options(normals_sequence: Any = None, mask: Optional[torch.Tensor] = None,
                          x0: Optional[torch.Tensor] = None, log_every_t: int = 100) -> None:
    """Refuse, naming it, an option of the original samplers' `sample()` that would otherwise do nothing."""
    if normals_sequence is not None:
        raise ValueError("normals_sequence is in the original's signature but the original never used it; "
                         "pass x_T for the start noise, or a generator for the noise drawn at each step")
    if (mask is None) != (x0 is None):
        raise ValueError("mask and x0 go together: x0 is the known latent, kept where mask is 1")
    if isinstance(log_every_t, bool) or not isinstance(log_every_t, int) or log_every_t < 1:
        raise ValueError(f"log_every_t must be a positive integer, got {log_every_t!r}")


def check_batch_size(conditioning: Any, batch_size: int) -> None:
    """Refuse a conditioning tensor or list whose length is not the batch size (the original only warned)."""
    if conditioning is not None and not isinstance(conditioning, dict):
        count = len(conditioning) if isinstance(conditioning, list) else conditioning.shape[0]
        if count != batch_size:
            raise ValueError(f"got {count} conditionings for a batch of {batch_size}")


def sample_loop(step: Step, x: torch.Tensor, timesteps: Sequence[int], desc: str = "Sampler",
                verbose: bool = True, callback: Optional[Callable[[int], None]] = None,
                img_callback: Optional[Callable[[torch.Tensor, int], None]] = None,
                log_every_t: int = 100) -> tuple[torch.Tensor, dict[str, list[torch.Tensor]]]:
    """Run `step` over the decreasing `timesteps` from x; returns the last x and the intermediates.

    After step i come `callback(i)` and `img_callback(pred_x0, i)`; x and pred_x0 are kept every
    `log_every_t` steps counted from the end and after the first step, as in the original samplers.
    """
    intermediates = {"x_inter": [x], "pred_x0": [x]}
    total = len(timesteps)
    for i, t in enumerate(tqdm(timesteps, desc=desc, total=total, disable=not verbose)):
        t_batch = torch.full((x.shape[0],), int(t), device=x.device, dtype=torch.long)
        x, pred_x0 = step(i, t_batch, x)
        if callback:
            callback(i)
        if img_callback:
            img_callback(pred_x0, i)
        index = total - i - 1
        if index % log_every_t == 0 or index == total - 1:
            intermediates["x_inter"].append(x)
            intermediates["pred_x0"].append(pred_x0)
    return x, intermediates


def keep_known_region(step: Step, x0: torch.Tensor, mask: torch.Tensor, q_sample: Callable[..., torch.Tensor],
                      generator: Optional[torch.Generator] = None) -> Step:
    """`step` after replacing x where mask = 1 by x0 noised to t, q(x_t | x_0) (Ho et al. 2020, eq. 4): the
    original's mask/x0 inpainting. The noise comes from `generator` (None: the global stream, as the original)."""
    def masked(i: int, t: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        noise = torch.randn(x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        return step(i, t, q_sample(x0, t, noise) * mask + (1.0 - mask) * x)

    return masked


def dropout(x: torch.Tensor, p: float, generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """`torch.nn.functional.dropout(x, p)` (Srivastava et al. 2014), its mask drawn from `generator` when one
    is given, as torch draws it on the CPU."""
    if generator is None:
        return torch.nn.functional.dropout(x, p=p)
    if p == 1.0:
        return torch.zeros_like(x)
    return x * (torch.empty_like(x).bernoulli_(1.0 - p, generator=generator) / (1.0 - p))


def step_noise(x: torch.Tensor, temperature: float = 1.0, noise_dropout: float = 0.0, repeat: bool = False,
               generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """The z ~ N(0, I) of one DDIM update, times `temperature`, with `noise_dropout`; `repeat` draws one for
    the whole batch. Drawn even where sigma_t = 0, so that every later draw matches the original's."""
    if not 0.0 <= noise_dropout <= 1.0:
        raise ValueError(f"noise_dropout is a probability, between 0 and 1; got {noise_dropout}")
    noise = noise_like(x.shape, x.device, repeat, generator=generator).to(x.dtype) * temperature
    if noise_dropout > 0.0:
        noise = dropout(noise, noise_dropout, generator)
    return noise


def predict_x0(x: torch.Tensor, eps: torch.Tensor, alpha_cumprod: torch.Tensor) -> torch.Tensor:
    """x_0 = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t) (Ho et al. 2020, eq. 15)."""
    return (x - (1.0 - alpha_cumprod).sqrt() * eps) / alpha_cumprod.sqrt()


def ddim_step(x: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, alpha_prev: torch.Tensor,
              sigma: torch.Tensor, noise: Optional[torch.Tensor] = None,
              denoised_fn: Optional[DenoisedFn] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One DDIM update x_t -> x_{t-1} (Song et al. 2021, eq. 12); returns (x_prev, predicted x_0).

    `denoised_fn` maps the predicted x_0 before it is used (the original's `quantize_denoised`).
    """
    pred_x0 = predict_x0(x, eps, alpha)
    if denoised_fn is not None:
        pred_x0 = denoised_fn(pred_x0)
    direction = (1.0 - alpha_prev - sigma ** 2).sqrt() * eps
    x_prev = alpha_prev.sqrt() * pred_x0 + direction
    if noise is not None:
        x_prev = x_prev + sigma * noise
    return x_prev, pred_x0


def plms_eps(eps: torch.Tensor, previous: Sequence[torch.Tensor]) -> torch.Tensor:
    """Adams-Bashforth combination of the current and up to three previous eps (Liu et al. 2022, PNDM, eq. 12)."""
    if len(previous) == 0:
        return eps
    if len(previous) == 1:
        return (3 * eps - previous[-1]) / 2
    if len(previous) == 2:
        return (23 * eps - 16 * previous[-1] + 5 * previous[-2]) / 12
    return (55 * eps - 59 * previous[-1] + 37 * previous[-2] - 9 * previous[-3]) / 24


def plms_step(denoiser: Denoiser, x: torch.Tensor, t: torch.Tensor, t_next: torch.Tensor,
              previous: Sequence[torch.Tensor],
              update: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
              ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One PLMS step (Liu et al. 2022, PNDM, eqs. 11-12); returns (x_prev, predicted x_0, eps at x_t).

    `update(eps)` is the transfer x_t -> x_prev (a DDIM update). With no `previous` eps the step is a pseudo
    improved Euler step, averaging eps at x_t and at the Euler step's x_prev (two denoiser calls, as the
    original); later steps combine eps with the previous ones (`plms_eps`).
    """
    eps = denoiser(x, t)
    if len(previous) == 0:
        x_euler, _ = update(eps)
        eps_prime = (eps + denoiser(x_euler, t_next)) / 2
    else:
        eps_prime = plms_eps(eps, previous)
    x_prev, pred_x0 = update(eps_prime)
    return x_prev, pred_x0, eps


def dpm_solver_pp_2m_step(denoiser: Denoiser, timesteps: Sequence[int], alphas_cumprod: torch.Tensor,
                          denoised_fn: Optional[DenoisedFn] = None) -> Step:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) over decreasing discrete `timesteps`.

    Works with the data prediction x_0 = (x - sigma_t eps) / alpha_t in log-SNR time
    lambda_t = log(alpha_t / sigma_t); the first step and the last (to sigma = 0) are first order.
    The step keeps the previous x_0 and step size, so it serves one run.
    """
    alphas_cumprod = alphas_cumprod.to("cpu", torch.float64)  # scalars of the schedule; no float64 on MPS
    alpha = alphas_cumprod.sqrt()
    sigma = (1.0 - alphas_cumprod).sqrt()
    lam = torch.log(alpha / sigma)
    previous_x0: Optional[torch.Tensor] = None
    previous_h: Optional[torch.Tensor] = None

    def step(i: int, t_batch: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        nonlocal previous_x0, previous_h
        t = int(timesteps[i])
        eps = denoiser(x, t_batch)
        x0 = (x - sigma[t].item() * eps) / alpha[t].item()
        if denoised_fn is not None:
            x0 = denoised_fn(x0)
        if i == len(timesteps) - 1:
            return x0, x0
        t_next = int(timesteps[i + 1])
        h = lam[t_next] - lam[t]
        ratio = (sigma[t_next] / sigma[t]).item()
        scale = (alpha[t_next] * torch.expm1(-h)).item()
        if previous_x0 is None:
            update = x0
        else:
            r = (previous_h / h).item()
            update = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * previous_x0
        previous_x0, previous_h = x0, h
        return ratio * x - scale * update, x0

    return step
