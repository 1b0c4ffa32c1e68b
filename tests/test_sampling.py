"""Samplers: reproducibility, guidance, img2img encode/decode and reduced precision."""
import pytest
import torch

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from tests.model_factory import random_tiny_model

SAMPLERS = [DDIMSampler, PLMSSampler, DPMSolverSampler]


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=4)


@pytest.fixture(scope="module")
def conditioning(model):
    return (model.get_learned_conditioning(["a red circle", "a blue star"]),
            model.get_learned_conditioning(["", ""]))


def _sample(model, sampler_class, conditioning, seed, **kwargs):
    c, uc = conditioning
    torch.manual_seed(seed)
    samples, _ = sampler_class(model).sample(6, 2, (4, 8, 8), c, unconditional_guidance_scale=5.0,
                                             unconditional_conditioning=uc, verbose=False, **kwargs)
    return samples


@pytest.mark.parametrize("sampler_class", SAMPLERS)
def test_same_seed_same_samples_different_seed_different(model, conditioning, sampler_class):
    first = _sample(model, sampler_class, conditioning, seed=42)
    again = _sample(model, sampler_class, conditioning, seed=42)
    other = _sample(model, sampler_class, conditioning, seed=43)
    assert torch.equal(first, again)
    assert not torch.allclose(first, other)
    assert torch.isfinite(first).all()


def test_generator_makes_sampling_independent_of_the_global_stream(model, conditioning):
    c, uc = conditioning
    results = []
    for global_seed in (0, 1):
        torch.manual_seed(global_seed)
        samples, _ = DDIMSampler(model).sample(4, 2, (4, 8, 8), c, eta=1.0, verbose=False,
                                               generator=torch.Generator().manual_seed(7))
        results.append(samples)
    assert torch.equal(*results)


def test_guidance_scale_one_ignores_the_unconditional_branch(model, conditioning):
    c, uc = conditioning
    x_T = torch.randn(2, 4, 8, 8)
    plain, _ = DDIMSampler(model).sample(3, 2, (4, 8, 8), c, x_T=x_T, verbose=False)
    guided, _ = DDIMSampler(model).sample(3, 2, (4, 8, 8), c, x_T=x_T, verbose=False,
                                          unconditional_guidance_scale=1.0, unconditional_conditioning=uc)
    stronger, _ = DDIMSampler(model).sample(3, 2, (4, 8, 8), c, x_T=x_T, verbose=False,
                                            unconditional_guidance_scale=7.5, unconditional_conditioning=uc)
    assert torch.equal(plain, guided)
    assert not torch.allclose(plain, stronger)


def test_eta_adds_noise(model, conditioning):
    c, _ = conditioning
    x_T = torch.randn(2, 4, 8, 8)
    deterministic = [DDIMSampler(model).sample(4, 2, (4, 8, 8), c, x_T=x_T, eta=0.0, verbose=False)[0]
                     for _ in range(2)]
    stochastic = [DDIMSampler(model).sample(4, 2, (4, 8, 8), c, x_T=x_T, eta=1.0, verbose=False)[0]
                  for _ in range(2)]
    assert torch.equal(*deterministic)
    assert not torch.allclose(*stochastic)


def test_plms_and_dpm_solver_refuse_eta(model, conditioning):
    c, _ = conditioning
    for sampler_class in (PLMSSampler, DPMSolverSampler):
        with pytest.raises(ValueError, match="eta"):
            sampler_class(model).sample(4, 2, (4, 8, 8), c, eta=0.5, verbose=False)


def test_img2img_encode_then_decode(model, conditioning):
    c, uc = conditioning
    sampler = DDIMSampler(model)
    sampler.make_schedule(ddim_num_steps=10, ddim_eta=0.0, verbose=False)
    image = torch.rand(2, 3, 64, 64) * 2 - 1
    z0 = model.get_first_stage_encoding(model.encode_first_stage(image))
    assert z0.shape == (2, 4, 8, 8)
    t_enc = int(0.5 * 10)
    noisy = sampler.stochastic_encode(z0, torch.tensor([t_enc] * 2))
    alpha = sampler.ddim_alphas[t_enc]
    assert torch.allclose(noisy.mean(), (alpha.sqrt() * z0).mean(), atol=0.5)
    out = sampler.decode(noisy, c, t_enc, unconditional_guidance_scale=5.0, unconditional_conditioning=uc,
                         verbose=False)
    assert out.shape == z0.shape and torch.isfinite(out).all()
    assert torch.equal(sampler.decode(z0, c, 0, verbose=False), z0)


def test_wrong_batch_of_conditionings_is_rejected(model, conditioning):
    c, _ = conditioning
    with pytest.raises(ValueError, match="conditionings"):
        DDIMSampler(model).sample(2, 3, (4, 8, 8), c, verbose=False)


@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_reduced_precision_autocast_gives_finite_images(model, conditioning, dtype):
    c, uc = conditioning
    with torch.autocast("cpu", dtype=dtype):
        samples, _ = DPMSolverSampler(model).sample(4, 2, (4, 8, 8), c, unconditional_guidance_scale=5.0,
                                                    unconditional_conditioning=uc, verbose=False)
        images = model.decode_first_stage(samples)
    assert torch.isfinite(images.float()).all()


def test_bf16_weights_give_finite_images(tmp_path):
    from ldm.checkpoint import _cast_weights

    model = random_tiny_model(seed=4)
    _cast_weights(model, torch.bfloat16)
    c = model.get_learned_conditioning(["a red circle"])
    uc = model.get_learned_conditioning([""])
    samples, _ = DDIMSampler(model).sample(3, 1, (4, 8, 8), c, unconditional_guidance_scale=5.0,
                                           unconditional_conditioning=uc, verbose=False,
                                           x_T=torch.randn(1, 4, 8, 8, dtype=torch.bfloat16))
    images = model.decode_first_stage(samples)
    assert images.dtype == torch.bfloat16 and torch.isfinite(images.float()).all()
