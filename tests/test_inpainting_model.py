"""The 9-channel inpainting model (`LatentInpaintDiffusion`, sd-v1-5-inpainting's layout): its keys, parity with
diffusers' UNet and StableDiffusionInpaintPipeline on random non-zero weights, its training inputs, the start from a
4-channel checkpoint with zeroed extra channels, telling inpainting checkpoints from text-to-image ones, the random
training masks, and two training steps through main.py."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from omegaconf import OmegaConf
from safetensors.torch import save_file

from ldm.checkpoint import load_model_from_config
from ldm.data.inpainting_masks import (InpaintingExamples, InpaintingMaskGenerator, MaskSettings, box_mask,
                                       draw_segment, stroke_mask)
from ldm.data.shapes import SyntheticShapes
from ldm.errors import CheckpointError, UserInputError
from ldm.inpainting_checkpoint import (INPUT_CONV_KEY, check_inpainting_config, checkpoint_input_channels,
                                       config_input_channels, select_config)
from ldm.models.diffusion.ddim import DDIMSampler
from ldm.models.diffusion.ddpm import LatentInpaintDiffusion
from ldm.util import instantiate_from_config
from tests.model_factory import DATA_DIR, REPO_DIR, TESTS_DIR, randomize_, random_tiny_model, tiny_config

TINY_INPAINTING = TESTS_DIR / "configs" / "tiny-sd-inpainting.yaml"
INFERENCE = REPO_DIR / "configs" / "stable-diffusion" / "v1-inpainting-inference.yaml"
FINETUNE = REPO_DIR / "configs" / "stable-diffusion" / "v1-inpainting-finetune.yaml"
TEXT_TO_IMAGE = REPO_DIR / "configs" / "stable-diffusion" / "v1-inference.yaml"


def relative_error(ours: torch.Tensor, theirs: torch.Tensor) -> float:
    return ((ours - theirs).norm() / theirs.norm()).item()


def inpainting_config():
    return OmegaConf.load(TINY_INPAINTING)


def random_inpainting_model(seed: int = 3) -> LatentInpaintDiffusion:
    torch.manual_seed(seed)
    return randomize_(instantiate_from_config(inpainting_config().model), seed).eval()


@pytest.fixture(scope="module")
def model():
    return random_inpainting_model()


def image_and_mask(seed: int = 0, batch: int = 2, size: int = 64):
    generator = torch.Generator().manual_seed(seed)
    image = torch.rand(batch, 3, size, size, generator=generator) * 2 - 1
    mask = torch.zeros(batch, 1, size, size)
    mask[:, :, 16:48, 8:40] = 1.0
    mask[-1, :, :, 44:] = 0.7  # a soft value: binarised at 0.5, as the original script and diffusers do
    return image, mask


# --- layout -------------------------------------------------------------------------------------------------------

def test_inpainting_config_has_the_released_keys_with_a_9_channel_input_convolution():
    reference = json.loads((DATA_DIR / "sd-v1-state-dict.json").read_text())["tensors"]
    with torch.device("meta"):
        model = instantiate_from_config(OmegaConf.load(INFERENCE).model)
    assert isinstance(model, LatentInpaintDiffusion) and model.model.conditioning_key == "hybrid"
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == {**reference, INPUT_CONV_KEY: [320, 9, 3, 3]}
    assert model.concat_keys == ("mask", "masked_image")


def test_finetune_config_builds_the_same_model_with_ema_and_refuses_nothing():
    config = OmegaConf.load(FINETUNE)
    config.model.params.ckpt_path = None
    with torch.device("meta"):
        model = instantiate_from_config(config.model)
    assert tuple(model.state_dict()[INPUT_CONV_KEY].shape) == (320, 9, 3, 3)
    assert tuple(model.state_dict()["model_ema.diffusion_modelinput_blocks00weight"].shape) == (320, 9, 3, 3)
    assert config.data.params.train.target == "ldm.data.inpainting_masks.InpaintingExamples"


def test_hybrid_model_without_c_concat_says_what_it_needs(model):
    context = model.get_learned_conditioning(["a"])
    with pytest.raises(ValueError, match="c_concat"):
        model.apply_model(torch.zeros(1, 4, 8, 8), torch.tensor([1]), context)


# --- parity with diffusers ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def diffusers_parts(model):
    single_file = pytest.importorskip("diffusers.loaders.single_file_utils")
    diffusers = pytest.importorskip("diffusers")
    original_config = OmegaConf.to_container(inpainting_config(), resolve=True)
    state = model.state_dict()
    unet_config = single_file.create_unet_diffusers_config_from_ldm(original_config, state, image_size=64)
    assert unet_config["in_channels"] == 9
    unet = diffusers.UNet2DConditionModel(**unet_config)
    unet.load_state_dict(single_file.convert_ldm_unet_checkpoint(state, unet_config), strict=True)
    vae_config = single_file.create_vae_diffusers_config_from_ldm(original_config, state, image_size=64)
    vae = diffusers.AutoencoderKL(**vae_config)
    vae.load_state_dict(single_file.convert_ldm_vae_checkpoint(state, vae_config), strict=True)
    scheduler = diffusers.DDIMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                                        beta_schedule="scaled_linear", clip_sample=False, set_alpha_to_one=False,
                                        steps_offset=1, timestep_spacing="leading")
    pipe = diffusers.StableDiffusionInpaintPipeline(vae=vae.eval(), text_encoder=None, tokenizer=None,
                                                    unet=unet.eval(), scheduler=scheduler, safety_checker=None,
                                                    feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def test_one_unet_step_matches_diffusers_9_channel_unet(model, diffusers_parts):
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=generator)
    concat = torch.randn(2, 5, 8, 8, generator=generator)
    t = torch.tensor([10, 731])
    context = torch.randn(2, 77, 32, generator=generator)
    ours = model.apply_model(x, t, {"c_concat": [concat], "c_crossattn": [context]})
    theirs = diffusers_parts.unet(torch.cat([x, concat], dim=1), t, encoder_hidden_states=context).sample
    assert ours.abs().mean() > 1e-3
    assert relative_error(ours, theirs) < 1e-4


@torch.no_grad()
def test_inpainting_concat_matches_the_pipelines_mask_and_masked_image_latents(model, diffusers_parts):
    pipe = diffusers_parts
    image, mask = image_and_mask()
    mask_condition = pipe.mask_processor.preprocess(mask, height=64, width=64)
    masked_image = image * (mask_condition < 0.5)
    their_mask, their_latents = pipe.prepare_mask_latents(mask_condition, masked_image, 2, 64, 64, torch.float32,
                                                          torch.device("cpu"), torch.Generator().manual_seed(7),
                                                          False)
    ours = model.inpainting_concat(image, mask, generator=torch.Generator().manual_seed(7))
    assert ours.shape == (2, 5, 8, 8)
    assert torch.equal(ours[:, :1], their_mask)
    assert relative_error(ours[:, 1:], their_latents) < 1e-4
    mode = model.inpainting_concat(image, mask, sample_posterior=False)
    their_mode = pipe.vae.encode(masked_image).latent_dist.mode() * pipe.vae.config.scaling_factor
    assert relative_error(mode[:, 1:], their_mode) < 1e-4
    assert relative_error(mode[:, 1:], their_latents) > 1e-3, "the sample differs from the mode: the test sees which"


@torch.no_grad()
def test_guided_ddim_inpainting_matches_diffusers_pipeline(model, diffusers_parts):
    """The whole conditioning: {"c_concat": [concat], "c_crossattn": [context]}, the unconditional branch sharing
    c_concat, against StableDiffusionInpaintPipeline with the same start noise and posterior sample."""
    image, mask = image_and_mask(seed=1)
    c = model.get_learned_conditioning(["a red circle on a blue background", "a green star"])
    uc = model.get_learned_conditioning(["", ""])
    x_T = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(2))
    theirs = diffusers_parts(prompt_embeds=c, negative_prompt_embeds=uc, image=image, mask_image=mask, height=64,
                             width=64, num_inference_steps=3, guidance_scale=7.5, latents=x_T,
                             generator=torch.Generator().manual_seed(5), output_type="latent").images
    concat = model.inpainting_concat(image, mask, generator=torch.Generator().manual_seed(5))
    ours, _ = DDIMSampler(model).sample(3, 2, (4, 8, 8), {"c_concat": [concat], "c_crossattn": [c]},
                                        unconditional_guidance_scale=7.5,
                                        unconditional_conditioning={"c_concat": [concat], "c_crossattn": [uc]},
                                        x_T=x_T, verbose=False, eta=0.0)
    assert relative_error(ours, theirs) < 1e-4


# --- inputs -------------------------------------------------------------------------------------------------------

@torch.no_grad()
def test_inpainting_concat_is_the_resized_mask_then_the_masked_images_latent(model):
    image, mask = image_and_mask()
    concat = model.inpainting_concat(image, mask, sample_posterior=False)
    binary = (mask >= 0.5).float()
    assert torch.equal(concat[:, :1], F.interpolate(binary, size=(8, 8)))
    latent = model.first_stage_model.encode(image * (binary < 0.5)).mode() * model.scale_factor
    assert torch.allclose(concat[:, 1:], latent, atol=1e-6)
    with pytest.raises(ValueError, match="mask must be"):
        model.inpainting_concat(image, mask[:, :, :32])
    with pytest.raises(ValueError, match="image must be"):
        model.inpainting_concat(image[:, :1], mask)


def shapes_batch(with_masked_image: bool, mask_layout: str = "bhw1") -> dict:
    image, mask = image_and_mask(seed=4)
    mask = (mask >= 0.5).float()
    batch = {"jpg": image.permute(0, 2, 3, 1), "txt": ["a red circle", "a star"],
             "mask": mask.permute(0, 2, 3, 1) if mask_layout == "bhw1" else mask[:, 0]}
    if with_masked_image:
        batch["masked_image"] = (image * (mask < 0.5)).permute(0, 2, 3, 1)
    return batch


@torch.no_grad()
@pytest.mark.parametrize("with_masked_image,mask_layout", [(True, "bhw1"), (False, "bhw1"), (False, "bhw")])
def test_get_input_builds_the_hybrid_conditioning(model, with_masked_image, mask_layout):
    reference_batch = shapes_batch(with_masked_image=True)
    torch.manual_seed(0)
    z, cond = model.get_input(reference_batch, "jpg")
    torch.manual_seed(0)
    z2, cond2, x, xrec, xc = model.get_input(shapes_batch(with_masked_image, mask_layout), "jpg",
                                             return_first_stage_outputs=True, return_original_cond=True)
    assert set(cond) == {"c_concat", "c_crossattn"}
    assert cond["c_concat"][0].shape == (2, 5, 8, 8) and cond["c_crossattn"][0].shape == (2, 77, 32)
    assert torch.equal(z, z2) and torch.equal(cond["c_concat"][0], cond2["c_concat"][0])
    assert torch.equal(cond["c_crossattn"][0], model.get_learned_conditioning(["a red circle", "a star"]))
    assert torch.equal(cond["c_concat"][0][:, :1], F.interpolate(reference_batch["mask"].permute(0, 3, 1, 2),
                                                                   size=(8, 8)))
    assert x.shape == (2, 3, 64, 64) and xrec.shape == (2, 3, 64, 64) and list(xc) == ["a red circle", "a star"]


def test_training_loss_flows_to_the_unet_input_channels_of_the_mask(model):
    trained = random_inpainting_model(seed=5).train()
    loss, logs = trained.shared_step(shapes_batch(with_masked_image=False))
    loss.backward()
    grad = trained.model.diffusion_model.input_blocks[0][0].weight.grad
    assert torch.isfinite(loss) and "train/loss_simple" in logs
    assert grad[:, 4:].abs().sum() > 0, "the mask and masked-image channels learn"


# --- starting from a text-to-image checkpoint ---------------------------------------------------------------------

def text_to_image_checkpoint(tmp_path, with_ema: bool):
    config = tiny_config()
    config.model.params.use_ema = with_ema
    source = random_tiny_model(seed=11, config=config)
    if with_ema:  # EMA weights unlike the model's, to see which lands where
        for buffer in source.model_ema.buffers():
            if buffer.is_floating_point() and buffer.ndim > 0:
                buffer.add_(0.5)
    path = tmp_path / ("t2i-ema.ckpt" if with_ema else "t2i.ckpt")
    torch.save({"state_dict": source.state_dict(), "global_step": 7}, path)
    return source, path


@pytest.mark.parametrize("with_ema", [False, True])
def test_start_from_a_4_channel_checkpoint_zeroes_the_extra_input_channels(tmp_path, with_ema):
    source, path = text_to_image_checkpoint(tmp_path, with_ema)
    config = inpainting_config()
    config.model.params.use_ema = True
    config.model.params.ckpt_path = str(path)
    model = instantiate_from_config(config.model).eval()
    assert model.restarted_from_ckpt
    weight = model.model.diffusion_model.input_blocks[0][0].weight
    original = source.model.diffusion_model.input_blocks[0][0].weight
    assert weight.shape == (32, 9, 3, 3)
    assert torch.equal(weight[:, :4], original) and torch.count_nonzero(weight[:, 4:]) == 0
    shadow = dict(model.model_ema.named_buffers())["diffusion_modelinput_blocks00weight"]
    assert shadow.shape == (32, 9, 3, 3) and torch.count_nonzero(shadow[:, 4:]) == 0
    expected = (dict(source.model_ema.named_buffers())["diffusion_modelinput_blocks00weight"] if with_ema
                else original)
    assert torch.equal(shadow[:, :4], expected), "EMA from the checkpoint's EMA, or seeded from the loaded weights"
    own = model.state_dict()
    assert all(torch.equal(own[key], value) for key, value in source.state_dict().items()
               if key.startswith(("model.", "first_stage_model.", "cond_stage_model.")) and key != INPUT_CONV_KEY)
    # With zero extra channels the model starts as the text-to-image model, whatever the mask and masked image.
    generator = torch.Generator().manual_seed(0)
    x, context = torch.randn(2, 4, 8, 8, generator=generator), torch.randn(2, 77, 32, generator=generator)
    t = torch.tensor([3, 600])
    with torch.no_grad():
        ours = model.apply_model(x, t, {"c_concat": [torch.randn(2, 5, 8, 8, generator=generator)],
                                        "c_crossattn": [context]})
        assert torch.allclose(ours, source.apply_model(x, t, context), atol=1e-5)


def test_without_finetune_keys_a_4_channel_checkpoint_is_refused(tmp_path):
    _, path = text_to_image_checkpoint(tmp_path, with_ema=False)
    config = inpainting_config()
    config.model.params.ckpt_path = str(path)
    config.model.params.finetune_keys = None
    with pytest.raises(CheckpointError, match="input_blocks.0.0.weight"):
        instantiate_from_config(config.model)


def test_a_9_channel_checkpoint_given_as_ckpt_path_loads_as_it_is(tmp_path, model):
    path = tmp_path / "inpainting.ckpt"
    torch.save({"state_dict": model.state_dict()}, path)
    config = inpainting_config()
    config.model.params.ckpt_path = str(path)
    loaded = instantiate_from_config(config.model)
    assert torch.equal(loaded.state_dict()[INPUT_CONV_KEY], model.state_dict()[INPUT_CONV_KEY])


# --- telling inpainting checkpoints apart -------------------------------------------------------------------------

@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory, model):
    root = tmp_path_factory.mktemp("checkpoints")
    inpainting_state = {k: v.contiguous() for k, v in model.state_dict().items()}
    text_state = {k: v.contiguous() for k, v in random_tiny_model(seed=1).state_dict().items()}
    paths = {"inpainting.safetensors": inpainting_state, "text.safetensors": text_state}
    for name, state in paths.items():
        save_file(state, str(root / name))
    torch.save({"state_dict": inpainting_state}, root / "inpainting.ckpt")
    torch.save({"state_dict": text_state}, root / "text.ckpt")
    torch.save({"state_dict": {"other.weight": torch.zeros(2, 2)}}, root / "other.ckpt")
    return root


def test_checkpoint_input_channels_of_files_and_state_dicts(checkpoints, model):
    assert checkpoint_input_channels(checkpoints / "inpainting.safetensors") == 9
    assert checkpoint_input_channels(checkpoints / "inpainting.ckpt") == 9
    assert checkpoint_input_channels(checkpoints / "text.safetensors") == 4
    assert checkpoint_input_channels(checkpoints / "text.ckpt") == 4
    assert checkpoint_input_channels(model.state_dict()) == 9
    assert checkpoint_input_channels({"state_dict": model.state_dict()}) == 9
    assert checkpoint_input_channels(checkpoints / "other.ckpt") is None
    with pytest.raises(CheckpointError, match="not found"):
        checkpoint_input_channels(checkpoints / "missing.ckpt")


def test_safetensors_channels_come_from_the_header_alone(checkpoints, tmp_path):
    """A .safetensors file cut short after its header still tells its channels: the weights are not read."""
    data = (checkpoints / "inpainting.safetensors").read_bytes()
    header_end = 8 + int.from_bytes(data[:8], "little")
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[:header_end + 16])
    assert checkpoint_input_channels(cut) == 9


def test_config_and_checkpoint_that_disagree_are_refused_in_one_line_naming_both(checkpoints):
    assert config_input_channels(TINY_INPAINTING) == 9 and config_input_channels(TEXT_TO_IMAGE) == 4
    check_inpainting_config(TINY_INPAINTING, checkpoints / "inpainting.ckpt")
    check_inpainting_config(TESTS_DIR / "configs" / "tiny-sd.yaml", checkpoints / "text.safetensors")
    with pytest.raises(UserInputError) as error:
        check_inpainting_config(TESTS_DIR / "configs" / "tiny-sd.yaml", checkpoints / "inpainting.safetensors")
    message = str(error.value)
    assert "\n" not in message and "tiny-sd.yaml" in message and "inpainting.safetensors" in message
    assert "inpainting checkpoint" in message and "v1-inpainting-inference.yaml" in message
    with pytest.raises(CheckpointError) as error:
        check_inpainting_config(inpainting_config(), checkpoints / "text.ckpt")
    message = str(error.value)
    assert "\n" not in message and "text.ckpt" in message and "text-to-image checkpoint" in message
    assert "v1-inference.yaml" in message


def test_select_config_picks_the_inpainting_config_for_the_default(checkpoints):
    default = "configs/stable-diffusion/v1-inference.yaml"
    assert select_config(None, checkpoints / "inpainting.safetensors", default) == \
        "configs/stable-diffusion/v1-inpainting-inference.yaml"
    assert select_config(None, checkpoints / "text.ckpt", default) == default
    assert (REPO_DIR / select_config(None, checkpoints / "inpainting.ckpt")).is_file()
    explicit = str(TINY_INPAINTING)
    assert select_config(explicit, checkpoints / "inpainting.ckpt") == explicit
    with pytest.raises(CheckpointError, match="text-to-image checkpoint"):
        select_config(explicit, checkpoints / "text.ckpt")


# --- masks --------------------------------------------------------------------------------------------------------

def test_mask_generator_is_seedable_binary_and_masks_everything_a_quarter_of_the_time():
    generator = InpaintingMaskGenerator()
    masks = [generator(64, 96, np.random.default_rng([0, i])) for i in range(400)]
    again = [generator(64, 96, np.random.default_rng([0, i])) for i in range(5)]
    assert all(np.array_equal(a, b) for a, b in zip(masks, again))
    assert all(m.shape == (64, 96) and m.dtype == np.float32 and set(np.unique(m)) <= {0.0, 1.0} for m in masks)
    full = np.mean([m.min() == 1.0 for m in masks])
    assert 0.18 < full < 0.32
    partial = [m for m in masks if m.min() == 0.0]
    assert all(m.max() == 1.0 for m in partial), "no empty masks"
    assert 0.05 < np.mean([m.mean() for m in partial]) < 0.8


def test_boxes_and_strokes():
    one_box = MaskSettings(min_strokes=1, max_strokes=1, max_len=200, max_width=10, min_boxes=1, max_boxes=1,
                           margin=10, min_box=30, max_box=150)
    box = box_mask(128, 128, one_box, np.random.default_rng(3), scale=0.25)
    ys, xs = np.nonzero(box)
    assert box[ys.min():ys.max() + 1, xs.min():xs.max() + 1].min() == 1.0, "one filled rectangle"
    assert ys.min() >= 2 and xs.min() >= 2 and ys.max() <= 125 and xs.max() <= 125, "inside the scaled margin"
    stroke = stroke_mask(128, 128, one_box, np.random.default_rng(3), scale=0.25)
    assert 0.0 < stroke.mean() < 0.5
    segment = np.zeros((9, 9), np.float32)
    draw_segment(segment, (1.0, 4.0), (7.0, 4.0), 3.0)
    assert segment[4, 1:8].all() and segment[3, 2:7].all() and not segment[0].any() and segment[4, 0] == 1.0
    never_full = InpaintingMaskGenerator(full_mask_p=0.0)
    assert all(never_full(32, 32, np.random.default_rng(i)).min() == 0.0 for i in range(50))
    with pytest.raises(ValueError, match="variants"):
        InpaintingMaskGenerator(variants=("huge",))


def test_inpainting_examples_add_mask_and_masked_image_to_a_data_set():
    shapes = {"target": "ldm.data.shapes.SyntheticShapes", "params": {"size": 32, "length": 6, "seed": 0}}
    data = InpaintingExamples(shapes, image_key="image", seed=1)
    example = data[2]
    assert set(example) == {"image", "caption", "mask", "masked_image"}
    assert example["mask"].shape == (32, 32, 1) and example["mask"].dtype == np.float32
    np.testing.assert_array_equal(example["masked_image"], example["image"] * (example["mask"] < 0.5))
    np.testing.assert_array_equal(data[2]["mask"], example["mask"])  # seeded: the same every time
    assert len(data) == 6
    unseeded = InpaintingExamples(SyntheticShapes(size=32, length=6), image_key="image")
    torch.manual_seed(0)
    first = [unseeded[i]["mask"] for i in range(6)]
    torch.manual_seed(0)
    assert all(np.array_equal(a, unseeded[i]["mask"]) for i, a in enumerate(first)), "torch's seed reproduces it"


def test_inpainting_examples_pass_data_root_on_to_the_data_set(tmp_path):
    from PIL import Image

    Image.new("RGB", (40, 40), (200, 10, 10)).save(tmp_path / "red.png")
    (tmp_path / "red.txt").write_text("a red square")
    captioned = {"target": "ldm.data.captioned.CaptionedImages",
                 "params": {"size": 32, "image_key": "jpg", "caption_key": "txt"}}
    example = InpaintingExamples(captioned, data_root=str(tmp_path), seed=0)[0]
    assert example["txt"] == "a red square" and example["masked_image"].shape == (32, 32, 3)


# --- training through main.py -------------------------------------------------------------------------------------

TRAINING = {
    "model": {"params": {
        "first_stage_key": "image", "cond_stage_key": "caption", "use_ema": True,
        "ucg_training": {"caption": {"p": 0.1, "val": ""}},
    }},
    "data": {"target": "main.DataModuleFromConfig", "params": {
        "batch_size": 2, "num_workers": 0,
        "train": {"target": "ldm.data.inpainting_masks.InpaintingExamples", "params": {
            "image_key": "image",
            "dataset": {"target": "ldm.data.shapes.SyntheticShapes", "params": {"size": 64, "length": 8, "seed": 0}},
        }},
    }},
    "lightning": {
        "callbacks": {"image_logger": {"target": "main.ImageLogger", "params": {
            "batch_frequency": 2, "max_images": 2, "increase_log_steps": False,
            "log_images_kwargs": {"ddim_steps": 2, "plot_diffusion_rows": False, "plot_progressive_rows": False,
                                  "unconditional_guidance_scale": 3.0}}}},
        "trainer": {"max_steps": 2, "num_sanity_val_steps": 0, "log_every_n_steps": 1,
                    "enable_progress_bar": False},
    },
}


@pytest.mark.parametrize("start_flag", ["model.params.ckpt_path={}", "--actual_resume={}"])
def test_two_training_steps_through_main_from_a_4_channel_checkpoint(tmp_path, start_flag):
    from tests.test_main import main_env, only_run

    _, start = text_to_image_checkpoint(tmp_path, with_ema=False)
    overlay = tmp_path / "train-inpainting.yaml"
    overlay.write_text(yaml.safe_dump(TRAINING))
    result = subprocess.run([sys.executable, str(REPO_DIR / "main.py"), "--base", str(TINY_INPAINTING), str(overlay),
                             "-t", "-n", "inpaint", start_flag.format(start)],
                            cwd=tmp_path, env=main_env(), capture_output=True, text=True, timeout=400)
    assert result.returncode == 0, result.stderr[-3000:]
    run = only_run(tmp_path)
    checkpoint = run / "checkpoints" / "last.ckpt"
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert tuple(state[INPUT_CONV_KEY].shape) == (32, 9, 3, 3)
    assert tuple(state["model_ema.diffusion_modelinput_blocks00weight"].shape) == (32, 9, 3, 3)
    assert checkpoint_input_channels(checkpoint) == 9
    logged = {p.name.split("_gs-")[0] for p in (run / "images" / "train").glob("*.png")}
    assert {"samples", "samples_cfg_scale_3.00"} <= logged
    loaded = load_model_from_config(str(TINY_INPAINTING), checkpoint)
    assert isinstance(loaded, LatentInpaintDiffusion)
    assert torch.equal(loaded.state_dict()[INPUT_CONV_KEY], state[INPUT_CONV_KEY])
    assert select_config(str(TINY_INPAINTING), checkpoint) == str(TINY_INPAINTING)
