"""The k-diffusion family of samplers: small functions over a denoiser D(x; sigma) in sigma space.

Each function takes `denoise(x, sigma)` (the predicted x_0 for a batch at per-sample noise levels, e.g. a
`SigmaDenoiser`), the start `x` (noise times sigmas[0], or a noised init latent) and decreasing `sigmas` ending
at 0, and returns the sample at the last sigma. The probability-flow ODE is dx/dsigma = (x - D(x; sigma)) / sigma
(Karras et al. 2022, arXiv:2206.00364, eq. 3 with sigma(t) = t); the DPM-Solver++ samplers integrate it exactly
in the log-SNR time lambda = -log sigma except for D (Lu et al. 2022, arXiv:2211.01095).

The stochastic samplers draw their noise from `noise(sigma, sigma_next)`, N(0, I) the size of x (see
`noise_samplers`); the default is one independent draw per step from the global stream.
`callback(StepInfo)` follows every step; `progress(n)` yields the step indices (a tqdm range for a bar).
"""
from __future__ import annotations

import math
from typing import Callable, Iterable, NamedTuple, Optional, Sequence

import numpy as np
import torch

from ldm.models.diffusion.noise_samplers import GaussianNoise, NoiseSampler

SigmaDenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Progress = Callable[[int], Iterable[int]]


class StepInfo(NamedTuple):
    """What a sampler reports after step i: the new x, the step's sigma (sigma_hat after churn) and the
    denoised x_0 it moved towards."""

    i: int
    x: torch.Tensor
    sigma: torch.Tensor
    sigma_hat: torch.Tensor
    denoised: torch.Tensor


Callback = Optional[Callable[[StepInfo], None]]


def to_d(x: torch.Tensor, sigma: torch.Tensor, denoised: torch.Tensor) -> torch.Tensor:
    """dx/dsigma = (x - D(x; sigma)) / sigma, the probability-flow ODE (Karras et al. 2022, eq. 3)."""
    return (x - denoised) / sigma


def ancestral_step(sigma_from: torch.Tensor, sigma_to: torch.Tensor, eta: float = 1.0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(sigma_down, sigma_up) of an ancestral step from sigma_from to sigma_to: a deterministic move to
    sigma_down, then fresh noise of std sigma_up, with sigma_down^2 + sigma_up^2 = sigma_to^2. eta = 1 gives the
    DDPM posterior's variance (Ho et al. 2020, eq. 7, in sigma space); eta = 0 a deterministic step."""
    if not eta:
        return sigma_to, torch.zeros_like(sigma_to)
    sigma_up = torch.minimum(sigma_to, eta * (sigma_to ** 2 * (sigma_from ** 2 - sigma_to ** 2) / sigma_from ** 2)
                             .clamp(min=0).sqrt())
    sigma_down = (sigma_to ** 2 - sigma_up ** 2).clamp(min=0).sqrt()
    return sigma_down, sigma_up


def linear_multistep_coeff(order: int, sigmas: Sequence[float], i: int, j: int) -> float:
    """The weight of the derivative at sigmas[i - j] in a linear multistep step from sigmas[i] to sigmas[i + 1]:
    the integral over that step of the Lagrange basis polynomial through sigmas[i], ..., sigmas[i - order + 1]
    that is 1 at sigmas[i - j] (Adams-Bashforth on a non-uniform grid). The polynomial is integrated exactly
    (float64), not by quadrature."""
    if order - 1 > i:
        raise ValueError(f"order {order} needs {order - 1} previous steps; step {i} has {i}")
    basis = np.polynomial.Polynomial([1.0])
    for k in range(order):
        if k != j:
            basis = basis * np.polynomial.Polynomial([-sigmas[i - k], 1.0]) / (sigmas[i - j] - sigmas[i - k])
    integral = basis.integ()
    return float(integral(sigmas[i + 1]) - integral(sigmas[i]))


def _batch(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    return sigma.reshape(1).expand(x.shape[0])


def _churn(sigma: torch.Tensor, steps: int, s_churn: float, s_tmin: float, s_tmax: float) -> float:
    """gamma_i of Karras et al. 2022, Algorithm 2: min(S_churn / N, sqrt(2) - 1) inside [S_tmin, S_tmax]."""
    return min(s_churn / steps, 2 ** 0.5 - 1) if s_tmin <= float(sigma) <= s_tmax else 0.0


def _with_churn(x: torch.Tensor, sigma: torch.Tensor, gamma: float, s_noise: float,
                noise: NoiseSampler) -> tuple[torch.Tensor, torch.Tensor]:
    """Raise x from sigma to sigma_hat = sigma (1 + gamma) with fresh noise (Karras et al. 2022, Alg. 2, l. 5-6)."""
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + noise(sigma_hat, sigma) * s_noise * (sigma_hat ** 2 - sigma ** 2).sqrt()
    return x, sigma_hat


def _noise_or_default(noise: Optional[NoiseSampler], x: torch.Tensor) -> NoiseSampler:
    return noise if noise is not None else GaussianNoise(x)


def sample_euler(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                 progress: Progress = range, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Euler steps of the ODE, with Karras et al.'s optional churn (2022, Algorithm 2 without the correction)."""
    noise = _noise_or_default(noise, x)
    steps = len(sigmas) - 1
    for i in progress(steps):
        gamma = _churn(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _with_churn(x, sigmas[i], gamma, s_noise, noise)
        denoised = denoise(x, _batch(x, sigma_hat))
        x = x + to_d(x, sigma_hat, denoised) * (sigmas[i + 1] - sigma_hat)
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigma_hat, denoised))
    return x


def sample_euler_ancestral(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: Callback = None, progress: Progress = range, eta: float = 1.0,
                           s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Ancestral sampling with Euler steps: an Euler step to sigma_down, then noise of std sigma_up
    (`ancestral_step`)."""
    noise = _noise_or_default(noise, x)
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def sample_heun(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                progress: Progress = range, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Heun's second-order method (Karras et al. 2022, Algorithm 2): an Euler step corrected by the average of
    the slopes at both ends; the last step (to sigma = 0) is Euler's."""
    noise = _noise_or_default(noise, x)
    steps = len(sigmas) - 1
    for i in progress(steps):
        gamma = _churn(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _with_churn(x, sigmas[i], gamma, s_noise, noise)
        denoised = denoise(x, _batch(x, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        dt = sigmas[i + 1] - sigma_hat
        if sigmas[i + 1] == 0:
            x = x + d * dt
        else:
            x_euler = x + d * dt
            d_next = to_d(x_euler, sigmas[i + 1], denoise(x_euler, _batch(x, sigmas[i + 1])))
            x = x + (d + d_next) / 2 * dt
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigma_hat, denoised))
    return x


def _log_midpoint(sigma_a: torch.Tensor, sigma_b: torch.Tensor) -> torch.Tensor:
    """The geometric mean of two sigmas, the midpoint in log sigma."""
    return sigma_a.log().lerp(sigma_b.log(), 0.5).exp()


def sample_dpm_2(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
                 progress: Progress = range, s_churn: float = 0.0, s_tmin: float = 0.0, s_tmax: float = math.inf,
                 s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """The second-order midpoint method of Karras et al. 2022 (Algorithm 2's variant with the slope taken at the
    log-sigma midpoint, after DPM-Solver-2, Lu et al. 2022, arXiv:2206.00927); the last step is Euler's."""
    noise = _noise_or_default(noise, x)
    steps = len(sigmas) - 1
    for i in progress(steps):
        gamma = _churn(sigmas[i], steps, s_churn, s_tmin, s_tmax)
        x, sigma_hat = _with_churn(x, sigmas[i], gamma, s_noise, noise)
        denoised = denoise(x, _batch(x, sigma_hat))
        d = to_d(x, sigma_hat, denoised)
        if sigmas[i + 1] == 0:
            x = x + d * (sigmas[i + 1] - sigma_hat)
        else:
            sigma_mid = _log_midpoint(sigma_hat, sigmas[i + 1])
            x_mid = x + d * (sigma_mid - sigma_hat)
            d_mid = to_d(x_mid, sigma_mid, denoise(x_mid, _batch(x, sigma_mid)))
            x = x + d_mid * (sigmas[i + 1] - sigma_hat)
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigma_hat, denoised))
    return x


def sample_dpm_2_ancestral(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                           callback: Callback = None, progress: Progress = range, eta: float = 1.0,
                           s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Ancestral sampling with DPM-2 steps: a midpoint step to sigma_down, then noise of std sigma_up."""
    noise = _noise_or_default(noise, x)
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        d = to_d(x, sigmas[i], denoised)
        if sigma_down == 0:
            x = x + d * (sigma_down - sigmas[i])
        else:
            sigma_mid = _log_midpoint(sigmas[i], sigma_down)
            x_mid = x + d * (sigma_mid - sigmas[i])
            d_mid = to_d(x_mid, sigma_mid, denoise(x_mid, _batch(x, sigma_mid)))
            x = x + d_mid * (sigma_down - sigmas[i])
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def sample_lms(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *, callback: Callback = None,
               progress: Progress = range, order: int = 4) -> torch.Tensor:
    """Linear multistep (Adams-Bashforth) of `order` on the slopes of the last steps, as K-LMS; the first
    steps use as many slopes as there are."""
    grid = sigmas.detach().to("cpu", torch.float64).tolist()
    slopes: list[torch.Tensor] = []
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        slopes.append(to_d(x, sigmas[i], denoised))
        if len(slopes) > order:
            slopes.pop(0)
        current_order = min(i + 1, order)
        coeffs = [linear_multistep_coeff(current_order, grid, i, j) for j in range(current_order)]
        x = x + sum(coeff * d for coeff, d in zip(coeffs, reversed(slopes)))
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def _t(sigma: torch.Tensor) -> torch.Tensor:
    """lambda = -log sigma, DPM-Solver's time (the half log-SNR in sigma space)."""
    return sigma.log().neg()


def _sigma(t: torch.Tensor) -> torch.Tensor:
    return t.neg().exp()


def sample_dpmpp_2s_ancestral(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                              callback: Callback = None, progress: Progress = range, eta: float = 1.0,
                              s_noise: float = 1.0, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """Ancestral sampling with DPM-Solver++(2S) steps (Lu et al. 2022, arXiv:2211.01095, Algorithm 1, r = 1/2)
    to sigma_down, then noise of std sigma_up; a step to sigma_down = 0 is Euler's."""
    noise = _noise_or_default(noise, x)
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        sigma_down, sigma_up = ancestral_step(sigmas[i], sigmas[i + 1], eta)
        if sigma_down == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigma_down - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigma_down)
            h = t_next - t
            s = t + h / 2
            x_mid = (_sigma(s) / _sigma(t)) * x - torch.expm1(-h / 2) * denoised
            denoised_mid = denoise(x_mid, _batch(x, _sigma(s)))
            x = (_sigma(t_next) / _sigma(t)) * x - torch.expm1(-h) * denoised_mid
        if sigmas[i + 1] > 0:
            x = x + noise(sigmas[i], sigmas[i + 1]) * s_noise * sigma_up
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def sample_dpmpp_sde(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                     callback: Callback = None, progress: Progress = range, eta: float = 1.0, s_noise: float = 1.0,
                     r: float = 0.5, noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """DPM-Solver++ (stochastic, two stages per step at the intermediate time s = t + r h): each stage an
    ancestral DPM-Solver++ first-order step, the second from the combined data prediction
    (1 - 1/(2r)) D(x_t) + 1/(2r) D(x_s) (Lu et al. 2022, arXiv:2211.01095, sec. 5 and Algorithm 1). Meant to
    be used with `BrownianTreeNoise`, so that both stages see one Brownian path."""
    noise = _noise_or_default(noise, x)
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = x + to_d(x, sigmas[i], denoised) * (sigmas[i + 1] - sigmas[i])
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            s = t + h * r
            weight = 1 / (2 * r)
            sigma_down, sigma_up = ancestral_step(_sigma(t), _sigma(s), eta)
            s_down = _t(sigma_down)
            x_s = (_sigma(s_down) / _sigma(t)) * x - torch.expm1(t - s_down) * denoised
            x_s = x_s + noise(_sigma(t), _sigma(s)) * s_noise * sigma_up
            denoised_s = denoise(x_s, _batch(x, _sigma(s)))
            sigma_down, sigma_up = ancestral_step(_sigma(t), _sigma(t_next), eta)
            t_down = _t(sigma_down)
            combined = (1 - weight) * denoised + weight * denoised_s
            x = (_sigma(t_down) / _sigma(t)) * x - torch.expm1(t - t_down) * combined
            x = x + noise(_sigma(t), _sigma(t_next)) * s_noise * sigma_up
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def sample_dpmpp_2m(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                    callback: Callback = None, progress: Progress = range) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Algorithm 2) on the given sigmas: a multistep
    second-order update from the last two data predictions; the first step and the last (to sigma = 0) are
    first order."""
    previous: Optional[torch.Tensor] = None
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            t, t_next = _t(sigmas[i]), _t(sigmas[i + 1])
            h = t_next - t
            update = denoised
            if previous is not None:
                r = (t - _t(sigmas[i - 1])) / h
                update = (1 + 1 / (2 * r)) * denoised - (1 / (2 * r)) * previous
            x = (_sigma(t_next) / _sigma(t)) * x - torch.expm1(-h) * update
        previous = denoised
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x


def sample_dpmpp_2m_sde(denoise: SigmaDenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, *,
                        callback: Callback = None, progress: Progress = range, eta: float = 1.0,
                        s_noise: float = 1.0, solver_type: str = "midpoint",
                        noise: Optional[NoiseSampler] = None) -> torch.Tensor:
    """SDE-DPM-Solver++(2M) (Lu et al. 2022, arXiv:2211.01095, Appendix, eq. for the second-order multistep
    SDE solver): x_next = (sigma_next / sigma) e^(-eta h) x + (1 - e^(-h - eta h)) D, plus a multistep correction
    from the previous D ('midpoint' or 'heun' form) and noise of std sigma_next sqrt(1 - e^(-2 eta h))."""
    if solver_type not in ("midpoint", "heun"):
        raise ValueError(f"solver_type must be 'midpoint' or 'heun', got {solver_type!r}")
    noise = _noise_or_default(noise, x)
    previous: Optional[torch.Tensor] = None
    h_last: Optional[torch.Tensor] = None
    for i in progress(len(sigmas) - 1):
        denoised = denoise(x, _batch(x, sigmas[i]))
        if sigmas[i + 1] == 0:
            x = denoised
        else:
            h = _t(sigmas[i + 1]) - _t(sigmas[i])
            eta_h = eta * h
            decay = torch.expm1(-h - eta_h).neg()
            x = (sigmas[i + 1] / sigmas[i]) * (-eta_h).exp() * x + decay * denoised
            if previous is not None:
                r = h_last / h
                if solver_type == "midpoint":
                    x = x + 0.5 * decay * (1 / r) * (denoised - previous)
                else:
                    x = x + (decay / (-h - eta_h) + 1) * (1 / r) * (denoised - previous)
            if eta:
                x = x + noise(sigmas[i], sigmas[i + 1]) * sigmas[i + 1] * torch.expm1(-2 * eta_h).neg().sqrt() * s_noise
            h_last = h
        previous = denoised
        if callback:
            callback(StepInfo(i, x, sigmas[i], sigmas[i], denoised))
    return x
