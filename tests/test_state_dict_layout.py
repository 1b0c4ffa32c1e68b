"""The full-size models have exactly the tensors of the released checkpoints."""
import json

import torch
from omegaconf import OmegaConf

from ldm.util import instantiate_from_config
from tests.model_factory import DATA_DIR, REPO_DIR


def _meta_model(config_path):
    config = OmegaConf.load(config_path)
    with torch.device("meta"):
        return instantiate_from_config(config.model)


def test_sd_v1_model_has_exactly_the_released_keys_and_shapes():
    reference = json.loads((DATA_DIR / "sd-v1-state-dict.json").read_text())
    model = _meta_model(REPO_DIR / "configs/stable-diffusion/v1-inference.yaml")
    ours = {key: list(value.shape) for key, value in model.state_dict().items()}
    assert ours == reference["tensors"]
    counts = reference["parameter_counts"]
    assert sum(p.numel() for p in model.model.diffusion_model.parameters()) == counts["model.diffusion_model (UNet)"]
    assert sum(p.numel() for p in model.first_stage_model.parameters()) == counts["first_stage_model (AutoencoderKL)"]
    assert sum(p.numel() for p in model.cond_stage_model.parameters()) == counts[
        "cond_stage_model (CLIP ViT-L/14 text)"]


def test_building_on_meta_device_allocates_no_weights():
    model = _meta_model(REPO_DIR / "configs/stable-diffusion/v1-inference.yaml")
    assert all(p.device.type == "meta" for p in model.parameters())
