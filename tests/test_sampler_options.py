"""Every option of the original samplers' `sample()` is honoured as the original honours it, or refused
with an error that names it (the original silently ignored several of them)."""
from types import SimpleNamespace

import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import corrected_denoiser
from tests.model_factory import random_tiny_model

SAMPLERS = [DDIMSampler, PLMSSampler, DPMSolverSampler]
SHAPE = (4, 8, 8)


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=6)


@pytest.fixture(scope="module")
def c(model):
    return model.get_learned_conditioning(["a red circle", "a red circle"])


@pytest.fixture(scope="module")
def x_T():
    return torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(1))


def _sample(sampler_class, model, c, x_T=None, steps=4, **kwargs):
    return sampler_class(model).sample(steps, 2, SHAPE, c, x_T=x_T, verbose=False, **kwargs)


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_normals_sequence_which_the_original_never_used_is_refused(model, c, sampler_class):
    with pytest.raises(ValueError, match="normals_sequence"):
        _sample(sampler_class, model, c, normals_sequence=[torch.randn(2, *SHAPE)])


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_a_misspelt_option_is_refused_not_swallowed(model, c, sampler_class):
    with pytest.raises(TypeError, match="unconditional_guidance_scal"):
        _sample(sampler_class, model, c, unconditional_guidance_scal=7.5)


def test_constructor_options_that_do_nothing_are_refused(model):
    with pytest.raises(ValueError, match="schedule"):
        DDIMSampler(model, schedule="cosine")
    with pytest.raises(TypeError):
        DPMSolverSampler(model, schedule="linear")


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_quantize_x0_without_a_vq_first_stage_is_refused(model, c, sampler_class):
    with pytest.raises(ValueError, match="quantize_x0.*AutoencoderKL"):
        _sample(sampler_class, model, c, quantize_x0=True)


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_quantize_x0_passes_each_predicted_x0_through_the_codebook(model, c, x_T, sampler_class, monkeypatch):
    # A VQ first stage's `quantize` returns (z_q, loss, info); rounding stands in for the nearest code.
    monkeypatch.setattr(model.first_stage_model, "quantize", lambda z: (z.round(), None, None), raising=False)
    predictions = []
    quantized, _ = _sample(sampler_class, model, c, x_T, quantize_x0=True,
                           img_callback=lambda x0, i: predictions.append(x0))
    plain, _ = _sample(sampler_class, model, c, x_T, quantize_x0=False)
    assert len(predictions) == 4
    assert all(torch.equal(x0, x0.round()) and x0.abs().sum() > 0 for x0 in predictions)
    assert not torch.allclose(quantized, plain)


class ZeroScore:
    """A score corrector that sets eps to 0 and records what it was given."""

    def __init__(self):
        self.calls = []

    def modify_score(self, model, eps, x, t, c, **kwargs):
        self.calls.append((model, t[0].item(), c, kwargs))
        return torch.zeros_like(eps)


def test_score_corrector_replaces_eps_with_its_kwargs(model, c, x_T):
    corrector = ZeroScore()
    samples, _ = _sample(DDIMSampler, model, c, x_T, score_corrector=corrector, corrector_kwargs={"y": 3})
    # With eps = 0 each DDIM step is x_prev = sqrt(abar_prev / abar_t) x: the product telescopes.
    sampler = DDIMSampler(model)
    sampler.make_schedule(4, verbose=False)
    expected = x_T * (sampler.ddim_alphas_prev[0] / sampler.ddim_alphas[-1]).sqrt()
    torch.testing.assert_close(samples, expected)
    assert [call[1] for call in corrector.calls] == sorted(sampler.ddim_timesteps.tolist(), reverse=True)
    assert all(m is model and cond is c and kwargs == {"y": 3} for m, _, cond, kwargs in corrector.calls)


@pytest.mark.parametrize("sampler_class, calls", [(PLMSSampler, 5), (DPMSolverSampler, 4)])
def test_score_corrector_sees_every_model_evaluation(model, c, x_T, sampler_class, calls):
    corrector = ZeroScore()
    corrected, _ = _sample(sampler_class, model, c, x_T, score_corrector=corrector)
    plain, _ = _sample(sampler_class, model, c, x_T)
    assert len(corrector.calls) == calls  # PLMS evaluates its first step twice
    assert not torch.allclose(corrected, plain)


def test_corrector_kwargs_alone_and_a_non_eps_model_are_refused(model, c):
    with pytest.raises(ValueError, match="corrector_kwargs"):
        _sample(DDIMSampler, model, c, corrector_kwargs={"y": 3})
    with pytest.raises(ValueError, match="score_corrector.*'x0'"):
        corrected_denoiser(lambda x, t: x, ZeroScore(), SimpleNamespace(parameterization="x0"), c)
    with pytest.raises(ValueError, match="modify_score"):
        _sample(DDIMSampler, model, c, score_corrector=object())


@pytest.mark.parametrize("sampler_class", [DDIMSampler, PLMSSampler])
def test_mask_keeps_x0_noised_to_each_step_as_the_original(model, c, sampler_class):
    x0 = torch.randn(2, *SHAPE, generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(2, *SHAPE)
    mask[..., :4] = 1.0
    torch.manual_seed(3)
    ours, _ = _sample(sampler_class, model, c, mask=mask, x0=x0, eta=0.0)
    # The original's loop: before each step, img = q_sample(x0, t) * mask + (1 - mask) * img.
    sampler = sampler_class(model)
    sampler.make_schedule(4, verbose=False)
    time_range = sampler.ddim_timesteps[::-1]
    torch.manual_seed(3)
    img = torch.randn(2, *SHAPE)
    old_eps = []
    for i, step in enumerate(time_range):
        ts = torch.full((2,), int(step), dtype=torch.long)
        img = model.q_sample(x0, ts) * mask + (1.0 - mask) * img
        if sampler_class is DDIMSampler:
            img, _ = sampler.p_sample_ddim(img, c, ts, len(time_range) - 1 - i)
        else:
            t_next = torch.full((2,), int(time_range[min(i + 1, len(time_range) - 1)]), dtype=torch.long)
            img, _, e_t = sampler.p_sample_plms(img, c, ts, len(time_range) - 1 - i, old_eps=old_eps, t_next=t_next)
            old_eps.append(e_t)
    assert torch.equal(ours, img)


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_mask_noise_comes_from_the_generator(model, c, x_T, sampler_class):
    x0 = torch.randn(2, *SHAPE)
    mask = torch.ones(2, *SHAPE)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(_sample(sampler_class, model, c, x_T, mask=mask, x0=x0,
                               generator=torch.Generator().manual_seed(4))[0])
    assert torch.equal(*results)
    assert not torch.allclose(results[0], _sample(sampler_class, model, c, x_T)[0])


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_mask_without_x0_and_x0_without_mask_are_refused(model, c, sampler_class):
    with pytest.raises(ValueError, match="mask and x0"):
        _sample(sampler_class, model, c, mask=torch.ones(2, *SHAPE))
    with pytest.raises(ValueError, match="mask and x0"):
        _sample(sampler_class, model, c, x0=torch.zeros(2, *SHAPE))


def test_temperature_scales_the_noise_of_each_step(model, c, x_T):
    cold = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        cold.append(_sample(DDIMSampler, model, c, x_T, eta=1.0, temperature=0.0)[0])
    torch.manual_seed(0)
    warm = _sample(DDIMSampler, model, c, x_T, eta=1.0)[0]
    assert torch.equal(*cold)
    assert not torch.allclose(cold[0], warm)


def test_noise_dropout_drops_the_noise_and_draws_its_mask_from_the_generator(model, c, x_T):
    torch.manual_seed(0)
    all_dropped = _sample(DDIMSampler, model, c, x_T, eta=1.0, noise_dropout=1.0)[0]
    no_noise = _sample(DDIMSampler, model, c, x_T, eta=1.0, temperature=0.0)[0]
    assert torch.equal(all_dropped, no_noise)
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        results.append(_sample(DDIMSampler, model, c, x_T, eta=1.0, noise_dropout=0.5,
                               generator=torch.Generator().manual_seed(4))[0])
    assert torch.equal(*results)
    without = _sample(DDIMSampler, model, c, x_T, eta=1.0, generator=torch.Generator().manual_seed(4))[0]
    assert not torch.allclose(results[0], without)
    with pytest.raises(ValueError, match="noise_dropout"):
        _sample(DDIMSampler, model, c, x_T, eta=1.0, noise_dropout=-0.1)


def test_repeat_noise_draws_one_noise_for_the_batch(model, c):
    x_T = torch.randn(1, *SHAPE).repeat(2, 1, 1, 1)  # the same prompt twice from the same start
    same, _ = _sample(DDIMSampler, model, c, x_T, eta=1.0, repeat_noise=True)
    different, _ = _sample(DDIMSampler, model, c, x_T, eta=1.0)
    assert torch.equal(same[0], same[1])
    assert not torch.allclose(different[0], different[1])
    sampler = DDIMSampler(model)
    sampler.make_schedule(4, ddim_eta=1.0, verbose=False)
    x_prev, _ = sampler.p_sample_ddim(x_T, c, torch.full((2,), 501), 2, repeat_noise=True)
    assert torch.equal(x_prev[0], x_prev[1])


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_callbacks_and_log_every_t(model, c, x_T, sampler_class):
    steps, predictions = [], []
    samples, intermediates = _sample(sampler_class, model, c, x_T, steps=5, callback=steps.append,
                                     img_callback=lambda x0, i: predictions.append((i, x0)), log_every_t=2)
    assert steps == [0, 1, 2, 3, 4] and [i for i, _ in predictions] == steps
    # Kept: the start, after the first step, and every 2nd step counted from the end (indices 4, 2, 0).
    assert len(intermediates["x_inter"]) == len(intermediates["pred_x0"]) == 4
    assert torch.equal(intermediates["x_inter"][-1], samples)
    assert torch.equal(intermediates["pred_x0"][-1], predictions[-1][1])
    with pytest.raises(ValueError, match="log_every_t"):
        _sample(sampler_class, model, c, x_T, log_every_t=0)


@pytest.mark.parametrize("sampler_class", [PLMSSampler, DPMSolverSampler])
@pytest.mark.parametrize("option, value", [("eta", 0.5), ("temperature", 0.5), ("noise_dropout", 0.5),
                                           ("repeat_noise", True)])
def test_deterministic_samplers_refuse_the_noise_options(model, c, sampler_class, option, value):
    # DPMSolverSampler.sample has no repeat_noise, as DDIMSampler.sample in the original: a TypeError names it.
    with pytest.raises((ValueError, TypeError), match=option):
        _sample(sampler_class, model, c, **{option: value})


def test_plms_runs_the_original_steps_and_a_subset_of_the_schedule(model, c, x_T):
    sampler = PLMSSampler(model)
    sampler.make_schedule(10, verbose=False)
    steps = []
    samples, _ = sampler.plms_sampling(c, (2, *SHAPE), x_T=x_T, ddim_use_original_steps=True, timesteps=6,
                                       callback=steps.append, verbose=False)
    assert steps == list(range(6)) and torch.isfinite(samples).all()
    steps.clear()
    sampler.plms_sampling(c, (2, *SHAPE), x_T=x_T, timesteps=5, callback=steps.append, verbose=False)
    assert steps == list(range(4))  # the original's subset_end: int(5 / 10 * 10) - 1 steps


def test_first_plms_step_needs_t_next(model, c, x_T):
    sampler = PLMSSampler(model)
    sampler.make_schedule(4, verbose=False)
    with pytest.raises(ValueError, match="t_next"):
        sampler.p_sample_plms(x_T, c, torch.full((2,), 751), 3)
