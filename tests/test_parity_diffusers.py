"""Numerical parity with diffusers, an independent implementation of the same maths.

Weights are random and non-zero; diffusers' own original-to-diffusers conversion functions
map our (original-layout) state dict into its layout.
"""
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.dpm_solver import DPMSolverSampler
from ldm.models.diffusion.plms import PLMSSampler
from ldm.models.diffusion.sampling import guided_denoiser
from tests.model_factory import random_tiny_model, tiny_config

single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
diffusers = pytest.importorskip("diffusers")


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


@pytest.fixture(scope="module")
def model():
    return random_tiny_model(seed=3)


@pytest.fixture(scope="module")
def original_config():
    return OmegaConf.to_container(tiny_config(), resolve=True)


@pytest.fixture(scope="module")
def diffusers_unet(model, original_config):
    state = model.state_dict()
    config = single_file.create_unet_diffusers_config_from_ldm(original_config, state, image_size=64)
    unet = diffusers.UNet2DConditionModel(**config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, config), strict=True)
    return unet.eval()


@pytest.fixture(scope="module")
def diffusers_vae(model, original_config):
    state = model.state_dict()
    config = single_file.create_vae_diffusers_config_from_ldm(original_config, state, image_size=64)
    vae = diffusers.AutoencoderKL(**config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, config), strict=True)
    return vae.eval()


@torch.no_grad()
def test_unet_matches_diffusers(model, diffusers_unet):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    t = torch.tensor([10, 731])
    context = torch.randn(2, 77, 32, generator=generator)
    ours = model.model.diffusion_model(x, t, context=context)
    theirs = diffusers_unet(x, t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 1e-3
    assert relative_error(ours, theirs) < 1e-4


@torch.no_grad()
def test_autoencoder_matches_diffusers(model, diffusers_vae):
    generator = torch.Generator().manual_seed(1)
    image = torch.rand(2, 3, 64, 64, generator=generator) * 2 - 1
    ours = model.first_stage_model.encode(image)
    theirs = diffusers_vae.encode(image).latent_dist
    assert relative_error(ours.mean, theirs.mean) < 1e-4
    assert relative_error(ours.logvar, theirs.logvar) < 1e-4
    z = torch.randn(2, 4, 8, 8, generator=generator)
    decoded = model.first_stage_model.decode(z)
    assert relative_error(decoded, diffusers_vae.decode(z).sample) < 1e-4
    assert relative_error(model.decode_first_stage(z * 0.18215), decoded) < 1e-5


@torch.no_grad()
def test_clip_text_encoder_matches_transformers(model):
    transformers = pytest.importorskip("transformers")
    embedder = model.cond_stage_model
    config = embedder.transformer.config
    hf_config = transformers.CLIPTextConfig(
        vocab_size=config.vocab_size, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
        num_hidden_layers=config.num_hidden_layers, num_attention_heads=config.num_attention_heads,
        max_position_embeddings=config.max_position_embeddings, hidden_act="quick_gelu")
    hf_model = transformers.CLIPTextModel(hf_config).eval()
    hf_state = hf_model.state_dict()
    prefix = "text_model." if any(k.startswith("text_model.") for k in hf_state) else ""
    ours = embedder.transformer.state_dict()
    hf_model.load_state_dict({prefix + k[len("text_model."):]: v for k, v in ours.items()}, strict=False)
    tokens = embedder.tokenize(["a photograph of an astronaut riding a horse", ""])
    theirs = hf_model(input_ids=tokens).last_hidden_state
    assert relative_error(embedder(["a photograph of an astronaut riding a horse", ""]), theirs) < 1e-4


def _scheduler_kwargs():
    return dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def _run_diffusers(scheduler, denoise, x):
    for t in scheduler.timesteps:
        eps = denoise(x, torch.full((x.shape[0],), int(t), dtype=torch.long))
        x = scheduler.step(eps, t, x).prev_sample
    return x


@pytest.fixture(scope="module")
def guidance(model):
    c = model.get_learned_conditioning(["a red circle on a blue background", "a green star"])
    uc = model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(5))
    return c, uc, x_T


@torch.no_grad()
@pytest.mark.parametrize("steps", [4, 10])
def test_ddim_trajectory_matches_diffusers(model, guidance, steps):
    c, uc, x_T = guidance
    ours, _ = DDIMSampler(model).sample(steps, 2, (4, 8, 8), c, unconditional_guidance_scale=7.5,
                                        unconditional_conditioning=uc, x_T=x_T, verbose=False, eta=0.0)
    scheduler = diffusers.DDIMScheduler(**_scheduler_kwargs(), clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    theirs = _run_diffusers(scheduler, guided_denoiser(model, c, uc, 7.5), x_T)
    assert relative_error(ours, theirs) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("steps", [4, 10])
def test_plms_trajectory_matches_diffusers_pndm(model, guidance, steps):
    c, uc, x_T = guidance
    ours, _ = PLMSSampler(model).sample(steps, 2, (4, 8, 8), c, unconditional_guidance_scale=7.5,
                                        unconditional_conditioning=uc, x_T=x_T, verbose=False)
    scheduler = diffusers.PNDMScheduler(**_scheduler_kwargs(), skip_prk_steps=True, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    scheduler.set_timesteps(steps)
    theirs = _run_diffusers(scheduler, guided_denoiser(model, c, uc, 7.5), x_T)
    assert relative_error(ours, theirs) < 1e-4


@torch.no_grad()
@pytest.mark.parametrize("steps", [5, 20])
def test_dpm_solver_trajectory_matches_diffusers(model, guidance, steps):
    c, uc, x_T = guidance
    ours, _ = DPMSolverSampler(model).sample(steps, 2, (4, 8, 8), c, unconditional_guidance_scale=7.5,
                                             unconditional_conditioning=uc, x_T=x_T, verbose=False)
    scheduler = diffusers.DPMSolverMultistepScheduler(
        **_scheduler_kwargs(), algorithm_type="dpmsolver++", solver_order=2, timestep_spacing="linspace",
        final_sigmas_type="zero", lower_order_final=True)
    scheduler.set_timesteps(steps)
    np.testing.assert_array_equal(scheduler.timesteps.numpy(), _dpm_timesteps(steps))
    theirs = _run_diffusers(scheduler, guided_denoiser(model, c, uc, 7.5), x_T)
    assert relative_error(ours, theirs) < 1e-4


def _dpm_timesteps(steps):
    from ldm.models.diffusion.dpm_solver.sampler import dpm_solver_timesteps

    return dpm_solver_timesteps(steps, 1000)
