"""A full-size checkpoint in the original layout (every tensor of sd-v1-4.ckpt) loads with no
missing or unexpected keys, offline, through the v1-inference config."""
import json
import logging

import pytest
import torch

from ldm.checkpoint import load_model_from_config
from tests.model_factory import DATA_DIR, REPO_DIR


@pytest.mark.slow
def test_full_size_original_checkpoint_loads_completely(tmp_path, caplog):
    reference = json.loads((DATA_DIR / "sd-v1-state-dict.json").read_text())["tensors"]
    state = {key: torch.zeros(shape, dtype=torch.float16) for key, shape in reference.items()}
    state["cond_stage_model.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": state, "global_step": 470000}, path)
    del state
    with caplog.at_level(logging.WARNING, logger="ldm"):
        model = load_model_from_config(REPO_DIR / "configs/stable-diffusion/v1-inference.yaml", path)
    assert caplog.records == []
    loaded = model.state_dict()
    assert {k: list(v.shape) for k, v in loaded.items()} == reference
    assert all(v.dtype == torch.float32 for k, v in loaded.items() if k.startswith("model.")), "fp16 weights load as fp32, as in the original"
    assert model.cond_stage_model.tokenize(["a photo of *"])[0, :6].tolist() == [49406, 320, 1125, 539, 265, 49407]
