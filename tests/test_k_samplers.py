"""The k-diffusion samplers: parity with diffusers' schedulers (deterministic ones), with float64 references of
the papers' update rules (stochastic ones), schedules, seeds, img2img and the sampler class's options."""
from __future__ import annotations

import math

import diffusers
import numpy as np
import pytest
import torch

from ldm.models.diffusion import k_sampling
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.k_sampler import K_SAMPLERS, KDiffusionSampler, sampler_options
from ldm.models.diffusion.noise_samplers import BrownianTreeNoise
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.registry import make_sampler
from ldm.models.diffusion.sampler_names import K_SAMPLER_LABELS, SAMPLER_NAMES, sampler_label
from ldm.models.diffusion.sigma_denoiser import SigmaDenoiser
from ldm.models.diffusion.sigma_schedules import karras_sigmas, make_sigmas, model_sigmas, sigma_to_t, t_to_sigma
from tests.model_factory import random_tiny_model

STEPS = 10  # the default schedule's timesteps 999, 888, ..., 0 are then integers, where every interpolation agrees
SHAPE = (2, 4, 8, 8)
PARITY_RTOL = 1e-4


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=11)


@pytest.fixture(scope="module")
def context(model):
    with torch.no_grad():
        return model.get_learned_conditioning(["a red circle", "a blue star"])


def network_of(model, context):
    """eps(x_t, t) of the tiny UNet at (possibly fractional) timesteps t."""
    def network(x, t):
        return model.apply_model(x, torch.as_tensor(t, dtype=torch.float32).reshape(-1).expand(x.shape[0]), context)
    return network


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours.double() - theirs.double()).norm() / theirs.double().norm()).item()


def start_noise() -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(0))


# Deterministic samplers against diffusers. Every scheduler gets the model's own betas (`trained_betas`),
# `timestep_spacing="linspace"` (timesteps from T-1 down to 0, k-diffusion's spacing) and `use_karras_sigmas`
# as the case says; they then compute the same sigmas as ours (karras: the same sigma_min, sigma_max and rho;
# default: 10 steps, whose timesteps are integers, where diffusers' linear and our log-linear interpolation of
# sigma agree). Both sides start from the same x = noise * sigma_max and call the same network; the
# diffusers loop is its documented one (scale_model_input, model, step).
DIFFUSERS_CASES = {
    "lms": (diffusers.LMSDiscreteScheduler, {}),
    "euler": (diffusers.EulerDiscreteScheduler, {}),
    "heun": (diffusers.HeunDiscreteScheduler, {}),
    "dpm_2": (diffusers.KDPM2DiscreteScheduler, {}),
    # DPM-Solver++(2M) in its data-prediction form, first order at the first step and at the last (to sigma 0),
    # as k-diffusion's; lower_order_final=False keeps the second-last step second order.
    "dpmpp_2m": (diffusers.DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2,
                                                         "final_sigmas_type": "zero", "lower_order_final": False}),
}


def diffusers_run(scheduler_class, config, model, network, karras: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the final sample, the sigmas) of diffusers' loop from noise * sigma_max."""
    scheduler = scheduler_class(num_train_timesteps=1000, trained_betas=model.betas.numpy().tolist(),
                                timestep_spacing="linspace", use_karras_sigmas=karras, **config)
    if scheduler_class is diffusers.DPMSolverMultistepScheduler and not karras:
        # Its own spacing has no timestep 0 (it ends at ~T/n before the final sigma 0): the same timesteps as
        # the k-diffusion default schedule are passed instead.
        scheduler.set_timesteps(timesteps=np.linspace(999, 0, STEPS).round().astype(int).tolist())
    else:
        scheduler.set_timesteps(STEPS)
    if karras and scheduler_class in (diffusers.KDPM2DiscreteScheduler, diffusers.DPMSolverMultistepScheduler):
        # These two round the timesteps at which they call the network on Karras sigmas (K-DPM2 its main steps
        # only); k-diffusion calls it at each sigma's own fractional timestep: the scheduler is given those.
        log_sigmas = model_sigmas(model.alphas_cumprod).log()
        main = sigma_to_t(torch.unique_consecutive(scheduler.sigmas)[:-1].float(), log_sigmas).double()
        timesteps = scheduler.timesteps.double().clone()
        timesteps[::2 if scheduler_class is diffusers.KDPM2DiscreteScheduler else 1] = main
        scheduler.timesteps = timesteps
    sigma_max = scheduler.sigmas.max()
    x = start_noise() * sigma_max
    if scheduler_class is diffusers.DPMSolverMultistepScheduler:
        x = x / (sigma_max ** 2 + 1).sqrt()  # it works on the variance-preserving x_t = x / sqrt(sigma^2 + 1)
    with torch.no_grad():
        for t in scheduler.timesteps:
            x_in = scheduler.scale_model_input(x, t)
            x = scheduler.step(network(x_in, t), t, x).prev_sample
    return x, scheduler.sigmas


@pytest.mark.parametrize("karras", [False, True], ids=["default", "karras"])
@pytest.mark.parametrize("name", list(DIFFUSERS_CASES))
def test_deterministic_samplers_match_diffusers(model, context, name, karras):
    scheduler_class, config = DIFFUSERS_CASES[name]
    network = network_of(model, context)
    theirs, their_sigmas = diffusers_run(scheduler_class, config, model, network, karras)
    denoiser = SigmaDenoiser(network, model.alphas_cumprod)
    sigmas = denoiser.get_sigmas(STEPS, "karras" if karras else "default")
    assert torch.allclose(sigmas, torch.unique_consecutive(their_sigmas.flip(0)).flip(0).float(), rtol=1e-5)
    with torch.no_grad():
        ours = K_SAMPLERS[name].function(denoiser, start_noise() * sigmas[0], sigmas)
    assert relative_error(ours, theirs) <= PARITY_RTOL


# Stochastic samplers against float64 references of their papers' update rules, written in the closed forms of
# sigma space (a first-order DPM-Solver++ step from sigma to s is x_s = (s / sigma) x + (1 - s / sigma) D), fed the
# same noise: both sides draw from one recorded sequence.
class RecordedNoise:
    def __init__(self, count: int, dtype: torch.dtype):
        generator = torch.Generator().manual_seed(5)
        self.draws = [torch.randn(SHAPE, generator=generator, dtype=torch.float64) for _ in range(count)]
        self.dtype, self.used = dtype, 0

    def __call__(self, sigma, sigma_next):
        draw = self.draws[self.used].to(self.dtype)
        self.used += 1
        return draw


def ancestral(sigma: float, sigma_next: float) -> tuple[float, float]:
    """(sigma_down, sigma_up) with eta = 1: the DDPM posterior's variance in sigma space."""
    up = min(sigma_next, math.sqrt(sigma_next ** 2 * (sigma ** 2 - sigma_next ** 2) / sigma ** 2))
    return math.sqrt(sigma_next ** 2 - up ** 2), up


def towards(x, denoised, sigma: float, sigma_to: float):
    """The exact solution of the ODE with D held fixed, from sigma to sigma_to (first-order DPM-Solver++)."""
    return (sigma_to / sigma) * x + (1 - sigma_to / sigma) * denoised


def reference_euler_ancestral(D, x, sigmas, noise):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, sigma)
        down, up = ancestral(sigma, sigma_next)
        x = towards(x, denoised, sigma, down)  # the Euler step, linear in sigma, is exact for a fixed D
        if sigma_next > 0:
            x = x + up * noise()
    return x


def reference_dpm_2_ancestral(D, x, sigmas, noise):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, sigma)
        down, up = ancestral(sigma, sigma_next)
        if down == 0:
            x = denoised
        else:
            mid = math.sqrt(sigma * down)
            x_mid = towards(x, denoised, sigma, mid)
            x = x + (x_mid - D(x_mid, mid)) / mid * (down - sigma)
        if sigma_next > 0:
            x = x + up * noise()
    return x


def reference_dpmpp_2s_ancestral(D, x, sigmas, noise):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, sigma)
        down, up = ancestral(sigma, sigma_next)
        if down == 0:
            x = denoised
        else:
            mid = math.sqrt(sigma * down)  # r = 1/2 of the step in lambda = -log sigma
            x = towards(x, D(towards(x, denoised, sigma, mid), mid), sigma, down)
        if sigma_next > 0:
            x = x + up * noise()
    return x


def reference_dpmpp_sde(D, x, sigmas, noise):
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, sigma)
        if sigma_next == 0:
            x = denoised
            continue
        mid = math.sqrt(sigma * sigma_next)
        down, up = ancestral(sigma, mid)
        x_mid = towards(x, denoised, sigma, down) + up * noise()
        down, up = ancestral(sigma, sigma_next)
        x = towards(x, D(x_mid, mid), sigma, down) + up * noise()  # r = 1/2: the combined D is D(x_mid)
    return x


def reference_dpmpp_2m_sde(D, x, sigmas, noise):
    previous = h_last = None
    for sigma, sigma_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, sigma)
        if sigma_next == 0:
            x = denoised
        else:
            h = math.log(sigma / sigma_next)
            x = (sigma_next / sigma) * math.exp(-h) * x + (1 - math.exp(-2 * h)) * denoised
            if previous is not None:
                x = x + 0.5 * (1 - math.exp(-2 * h)) * (h / h_last) * (denoised - previous)
            x = x + sigma_next * math.sqrt(1 - math.exp(-2 * h)) * noise()
            h_last = h
        previous = denoised
    return x


REFERENCES = {
    "euler_ancestral": reference_euler_ancestral,
    "dpm_2_ancestral": reference_dpm_2_ancestral,
    "dpmpp_2s_ancestral": reference_dpmpp_2s_ancestral,
    "dpmpp_sde": reference_dpmpp_sde,
    "dpmpp_2m_sde": reference_dpmpp_2m_sde,
}


def test_every_stochastic_sampler_has_a_reference():
    assert sorted(REFERENCES) == sorted(name for name, info in K_SAMPLERS.items() if info.stochastic)


@pytest.mark.parametrize("schedule", ["default", "karras"])
@pytest.mark.parametrize("name", list(REFERENCES))
def test_stochastic_samplers_match_a_float64_reference(model, context, name, schedule):
    denoiser = SigmaDenoiser(network_of(model, context), model.alphas_cumprod)
    sigmas = denoiser.get_sigmas(STEPS, schedule)
    model64 = random_tiny_model(seed=11).double()
    context64 = context.double()
    denoiser64 = SigmaDenoiser(lambda x, t: model64.apply_model(x, t, context64), model.alphas_cumprod)

    def D64(x, sigma):
        return denoiser64(x, torch.full((x.shape[0],), sigma, dtype=torch.float64))

    x_start = start_noise().double() * sigmas[0].item()
    with torch.no_grad():
        recorded = RecordedNoise(2 * STEPS, torch.float64)
        expected = REFERENCES[name](D64, x_start, sigmas.double().tolist(), lambda: recorded(None, None))
        ours = K_SAMPLERS[name].function(denoiser, x_start.float(), sigmas,
                                         noise=RecordedNoise(2 * STEPS, torch.float32))
    assert recorded.used > 0
    assert relative_error(ours, expected) <= PARITY_RTOL


def test_ancestral_samplers_with_eta_0_are_their_deterministic_methods(model, context):
    denoiser = SigmaDenoiser(network_of(model, context), model.alphas_cumprod)
    sigmas = denoiser.get_sigmas(6)
    x = start_noise() * sigmas[0]
    with torch.no_grad():
        euler = k_sampling.sample_euler(denoiser, x, sigmas)
        euler_a = k_sampling.sample_euler_ancestral(denoiser, x, sigmas, eta=0.0)
        sde = k_sampling.sample_dpmpp_2m_sde(denoiser, x, sigmas, eta=0.0)
        two_m = k_sampling.sample_dpmpp_2m(denoiser, x, sigmas)
    assert torch.allclose(euler, euler_a, rtol=1e-5, atol=1e-5)
    assert relative_error(sde, two_m) < 0.1  # the SDE's midpoint form at eta 0 is a different 2M variant


def test_lms_coefficients_are_the_integrals_of_the_lagrange_basis():
    sigmas = [10.0, 6.0, 3.0, 1.5, 0.5]
    # Order 1 is the Euler step; the weights of any order sum to the step length (they integrate 1 exactly).
    assert k_sampling.linear_multistep_coeff(1, sigmas, 0, 0) == pytest.approx(-4.0)
    for order in (2, 3, 4):
        i = order - 1
        total = sum(k_sampling.linear_multistep_coeff(order, sigmas, i, j) for j in range(order))
        assert total == pytest.approx(sigmas[i + 1] - sigmas[i])
    from scipy import integrate

    def basis(tau):  # order 3, j = 1, step i = 2, by quadrature
        return (tau - sigmas[2]) * (tau - sigmas[0]) / ((sigmas[1] - sigmas[2]) * (sigmas[1] - sigmas[0]))

    assert k_sampling.linear_multistep_coeff(3, sigmas, 2, 1) == pytest.approx(
        integrate.quad(basis, sigmas[2], sigmas[3])[0], rel=1e-12)


# Schedules.
def test_sigmas_and_timesteps_invert_each_other(model):
    sigmas = model_sigmas(model.alphas_cumprod)
    log_sigmas = sigmas.log()
    t = torch.tensor([0.0, 1.5, 250.25, 998.9, 999.0])
    assert torch.allclose(sigma_to_t(t_to_sigma(t, log_sigmas), log_sigmas), t, atol=1e-3)
    assert torch.allclose(t_to_sigma(torch.arange(1000.0), log_sigmas), sigmas, rtol=1e-6)


def test_schedules_span_the_models_range_and_end_at_zero(model):
    log_sigmas = model_sigmas(model.alphas_cumprod).log()
    for schedule in ("default", "karras", "exponential"):
        sigmas = make_sigmas(schedule, 7, log_sigmas)
        assert sigmas.shape == (8,) and sigmas[-1] == 0 and (sigmas[:-1] > 0).all()
        assert (sigmas[1:] < sigmas[:-1]).all()
        assert sigmas[0].item() == pytest.approx(log_sigmas[-1].exp().item(), rel=1e-5)
        assert sigmas[-2].item() == pytest.approx(log_sigmas[0].exp().item(), rel=1e-5)
    exponential = make_sigmas("exponential", 7, log_sigmas)[:-1].log()
    assert torch.allclose(exponential.diff(), exponential.diff()[:1].expand(6), rtol=1e-4)
    karras = karras_sigmas(5, 0.1, 10.0)[:-1] ** (1 / 7)  # evenly spaced in sigma^(1/rho)
    assert torch.allclose(karras.diff(), karras.diff()[:1].expand(4), rtol=1e-4)


@pytest.mark.parametrize("steps", [0, -1, 2.5])
def test_schedules_refuse_bad_step_counts(model, steps):
    with pytest.raises(ValueError, match="positive integer"):
        make_sigmas("karras", steps, model_sigmas(model.alphas_cumprod).log())


# Seeds and noise.
@pytest.mark.parametrize("name", ["euler_ancestral", "dpmpp_sde", "dpmpp_2m_sde"])
def test_a_seed_gives_the_same_sample_and_another_seed_another(model, context, name):
    sampler = KDiffusionSampler(model, name)

    def run(seed):
        samples, _ = sampler.sample(5, 2, SHAPE[1:], context, verbose=False,
                                    generator=torch.Generator().manual_seed(seed))
        return samples

    first, again, other = run(3), run(3), run(4)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)


def test_the_global_stream_seeds_the_brownian_tree(model, context):
    sampler = KDiffusionSampler(model, "dpmpp_sde")
    results = []
    for _ in range(2):
        torch.manual_seed(9)
        results.append(sampler.sample(4, 2, SHAPE[1:], context, verbose=False)[0])
    assert torch.equal(*results)


def test_brownian_increments_add_up_and_are_standard_normal():
    x = torch.zeros(4, 4, 16, 16)
    tree = BrownianTreeNoise(x, 0.03, 14.6, generator=torch.Generator().manual_seed(1))
    a, b, c = torch.tensor(14.6), torch.tensor(3.0), torch.tensor(0.5)
    whole = tree(a, c) * (a - c).sqrt()
    parts = tree(a, b) * (a - b).sqrt() + tree(b, c) * (b - c).sqrt()
    assert torch.allclose(whole, parts, atol=1e-4)
    z = tree(b, c)
    assert abs(z.mean().item()) < 0.1 and abs(z.std().item() - 1) < 0.1
    again = BrownianTreeNoise(x, 0.03, 14.6, generator=torch.Generator().manual_seed(1))
    assert torch.equal(again(b, c), z)  # the same seed, the same path, whatever was asked before
    with pytest.raises(ValueError, match="spans"):
        tree(torch.tensor(20.0), a)


# img2img.
IMG2IMG_CLASSES = [("ddim", {}), ("plms", {}), ("dpm_solver", {}), ("euler", {}), ("dpmpp_2m", {"schedule": "karras"}),
                   ("dpmpp_sde", {}), ("euler_ancestral", {})]


@pytest.mark.parametrize("name, options", IMG2IMG_CLASSES)
def test_img2img_at_strength_1_is_txt2img_from_the_same_noise(model, context, name, options):
    sampler = make_sampler(name, model, **options)
    noise = start_noise()
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    txt2img, _ = sampler.sample(6, 2, SHAPE[1:], context, x_T=noise, verbose=False,
                                generator=torch.Generator().manual_seed(2))
    img2img = sampler.img2img(6, init, 1.0, context, noise=noise, verbose=False,
                              generator=torch.Generator().manual_seed(2))
    assert torch.allclose(img2img, txt2img, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, options", IMG2IMG_CLASSES)
def test_img2img_at_strength_0_returns_the_init_latent_and_between_moves_towards_the_prompt(model, context, name,
                                                                                             options):
    sampler = make_sampler(name, model, **options)
    init = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8))
    assert torch.equal(sampler.img2img(6, init, 0.0, context, verbose=False), init)
    light = sampler.img2img(6, init, 0.34, context, noise=start_noise(), verbose=False,
                            generator=torch.Generator().manual_seed(2))
    heavy = sampler.img2img(6, init, 0.84, context, noise=start_noise(), verbose=False,
                            generator=torch.Generator().manual_seed(2))
    assert relative_error(light, init) < relative_error(heavy, init)


def test_k_img2img_noises_the_init_latent_to_the_sigma_strength_selects(model, context):
    sampler = KDiffusionSampler(model, "euler")
    init, noise = torch.randn(SHAPE, generator=torch.Generator().manual_seed(8)), start_noise()
    seen = []
    sampler.info = type(sampler.info)(lambda denoise, x, sigmas, **kwargs: seen.append((x, sigmas)) or x)
    sampler.img2img(10, init, 0.3, context, noise=noise, verbose=False)
    x, sigmas = seen[0]
    full = sampler.get_sigmas(10)
    assert torch.equal(sigmas, full[7:]) and len(sigmas) - 1 == 3  # int(0.3 * 10) steps, the last 3 of 10
    assert torch.allclose(x, init + noise * full[7])


# The sampler class: the original's API, honest options.
def test_every_k_sampler_runs_through_the_class_with_every_schedule(model, context):
    uc = model.get_learned_conditioning(["", ""])
    for name in K_SAMPLERS:
        for schedule in ("default", "karras", "exponential"):
            calls = []
            samples, intermediates = KDiffusionSampler(model, name, schedule).sample(
                3, 2, SHAPE[1:], context, unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                verbose=False, callback=calls.append, generator=torch.Generator().manual_seed(0))
            assert samples.shape == SHAPE and torch.isfinite(samples).all(), (name, schedule)
            assert calls == [0, 1, 2]
            assert len(intermediates["pred_x0"]) == len(intermediates["x_inter"]) >= 2


def test_mask_keeps_the_known_region_and_quantize_needs_a_codebook(model, context):
    sampler = KDiffusionSampler(model, "dpmpp_2m")
    x0 = torch.randn(SHAPE, generator=torch.Generator().manual_seed(3))
    mask = torch.zeros(SHAPE)
    mask[..., :4] = 1.0
    samples, _ = sampler.sample(5, 2, SHAPE[1:], context, mask=mask, x0=x0, verbose=False,
                                generator=torch.Generator().manual_seed(0))
    assert torch.allclose(samples[..., :4], x0[..., :4], atol=1e-5)
    assert not torch.allclose(samples[..., 4:], x0[..., 4:], atol=1e-2)
    with pytest.raises(ValueError, match="codebook"):
        sampler.sample(2, 2, SHAPE[1:], context, quantize_x0=True, verbose=False)


def test_options_are_the_papers_and_unknown_ones_are_refused(model):
    assert sampler_options("euler") == {"s_churn": 0.0, "s_tmin": 0.0, "s_tmax": math.inf, "s_noise": 1.0}
    assert sampler_options("dpmpp_2m_sde") == {"eta": 1.0, "s_noise": 1.0, "solver_type": "midpoint"}
    assert sampler_options("lms") == {"order": 4}
    assert KDiffusionSampler(model, "euler", s_churn=1.0).options == {"s_churn": 1.0}
    with pytest.raises(ValueError, match="takes no option eta"):
        KDiffusionSampler(model, "dpmpp_2m", eta=1.0)
    with pytest.raises(ValueError, match="unknown k-diffusion sampler"):
        KDiffusionSampler(model, "euler_b")
    with pytest.raises(ValueError, match="unknown schedule"):
        KDiffusionSampler(model, "euler", "cosine")


@pytest.mark.parametrize("option", [{"eta": 0.5}, {"temperature": 0.9}, {"noise_dropout": 0.1},
                                    {"normals_sequence": [1]}])
def test_ddim_only_options_are_refused_not_dropped(model, context, option):
    with pytest.raises(ValueError):
        KDiffusionSampler(model, "euler_ancestral").sample(2, 2, SHAPE[1:], context, verbose=False, **option)


def test_churn_adds_noise_where_the_paper_says(model, context):
    sampler_plain = KDiffusionSampler(model, "heun")
    sampler_churn = KDiffusionSampler(model, "heun", s_churn=4.0, s_tmin=0.5, s_tmax=5.0)
    runs = [s.sample(6, 2, SHAPE[1:], context, x_T=start_noise(), verbose=False,
                     generator=torch.Generator().manual_seed(1))[0] for s in (sampler_plain, sampler_churn)]
    assert not torch.allclose(*runs)


def test_names_labels_and_registry_agree(model):
    assert set(K_SAMPLERS) == set(K_SAMPLER_LABELS)
    assert len(SAMPLER_NAMES) == 13
    assert sampler_label("dpmpp_2m", "karras") == "DPM++ 2M Karras"
    assert sampler_label("euler_ancestral") == "Euler a"
    assert sampler_label("dpmpp_2m_sde", "exponential") == "DPM++ 2M SDE Exponential"
    assert isinstance(make_sampler("ddim", model), DDIMSampler)
    assert isinstance(make_sampler("plms", model), PLMSSampler)
    assert isinstance(make_sampler("dpm_solver", model), DPMSolverSampler)
    assert isinstance(make_sampler("heun", model, "karras"), KDiffusionSampler)
    with pytest.raises(ValueError, match="takes no sigma schedule"):
        make_sampler("ddim", model, "karras")
