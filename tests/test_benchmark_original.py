"""scripts/benchmark_original.py: the original code's render, run from its own folder in its own process.

The original package cannot be part of this repository, so a miniature one stands in: it imports what the
original imports (Lightning 1.x's `rank_zero_only`, OpenCLIP, the Hub's CLIP tokenizer and text model) and
has the original's entry points (`instantiate_from_config`, `LatentDiffusion`, `DDIMSampler`).
"""
import json
import textwrap

import pytest
import torch

from tests.cli_support import load_script

MINIATURE_ORIGINAL = {
    "ldm/__init__.py": "",
    "ldm/util.py": """
        import importlib

        def instantiate_from_config(config):
            module, name = config["target"].rsplit(".", 1)
            return getattr(importlib.import_module(module), name)(**config.get("params", dict()))
    """,
    "ldm/models/__init__.py": "",
    "ldm/models/diffusion/__init__.py": "",
    "ldm/models/diffusion/ddpm.py": """
        import torch
        from pytorch_lightning.utilities.distributed import rank_zero_only
        from ldm.util import instantiate_from_config

        class LatentDiffusion(torch.nn.Module):
            def __init__(self, cond_stage_config, **_):
                super().__init__()
                self.cond_stage_model = instantiate_from_config(cond_stage_config)
                self.scale = torch.nn.Parameter(torch.ones(()))

            def get_learned_conditioning(self, text):
                return self.cond_stage_model(text)

            def decode_first_stage(self, z):
                assert self.scale.item() == 2.0, "the checkpoint's weights were not loaded"
                return z * self.scale
    """,
    "ldm/models/diffusion/ddim.py": """
        class DDIMSampler:
            def __init__(self, model):
                self.model = model

            def sample(self, S, conditioning, batch_size, shape, unconditional_conditioning, x_T, **_):
                assert conditioning.shape == unconditional_conditioning.shape == (1, 77, 768)
                assert x_T.shape == (batch_size, *shape)
                return x_T, None
    """,
    "ldm/modules/__init__.py": "",
    "ldm/modules/encoders/__init__.py": "",
    "ldm/modules/encoders/modules.py": """
        import open_clip
        import torch
        from transformers import CLIPTextModel, CLIPTokenizer

        class FrozenCLIPEmbedder(torch.nn.Module):
            def __init__(self, version="openai/clip-vit-large-patch14", device="cuda"):
                super().__init__()
                self.tokenizer = CLIPTokenizer.from_pretrained(version)
                self.transformer = CLIPTextModel.from_pretrained(version)
                self.device = device

            def forward(self, text):
                batch = self.tokenizer(text, truncation=True, max_length=77, return_length=True,
                                       padding="max_length", return_tensors="pt")
                return self.transformer(input_ids=batch["input_ids"].to(self.device)).last_hidden_state
    """,
}
CONFIG = """
model:
  target: ldm.models.diffusion.ddpm.LatentDiffusion
  params:
    cond_stage_config:
      target: ldm.modules.encoders.modules.FrozenCLIPEmbedder
"""


@pytest.fixture
def original(tmp_path):
    folder = tmp_path / "original"
    for name, text in MINIATURE_ORIGINAL.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(textwrap.dedent(text))
    return folder


def test_original_render_in_its_own_process(original, tmp_path):
    benchmark = load_script("benchmark.py")
    checkpoint, config = tmp_path / "model.ckpt", tmp_path / "config.yaml"
    torch.save({"state_dict": {"scale": torch.tensor(2.0)}, "global_step": 0}, checkpoint)
    config.write_text(CONFIG)
    job = {"kind": "render", "impl": "original", "original": str(original), "checkpoint": str(checkpoint), "config": str(config),
           "device": "cpu", "resolution": 64, "steps": 1, "threads": 1}
    result = benchmark.run_worker(job, benchmark.ORIGINAL_WORKER)
    assert result["peak_rss_process_mib"] >= result["peak_rss_render_mib"] > 0
    assert result["rss_loaded_mib"] > result["rss_before_mib"] > 0 and result["seconds"] > 0
    row = {"measure": "txt2img peak memory", "resolution": 64, "batch": 1, "original": result,
           **{impl: {**result, "peak_rss_process_mib": result["peak_rss_process_mib"] / 2}
              for impl in benchmark.IMPLEMENTATIONS}}
    assert "ours 0.50x" in benchmark.table([row])


def test_a_folder_without_the_original_is_refused(original, tmp_path, capsys):
    benchmark = load_script("benchmark.py")
    with pytest.raises(SystemExit) as exit_info:
        benchmark.parse_args(["--original", str(tmp_path / "elsewhere")])
    assert exit_info.value.code == 2 and "no `ldm` folder" in capsys.readouterr().err
    job = {"kind": "render", "impl": "original", "original": str(tmp_path), "checkpoint": "x", "config": "y", "device": "cpu",
           "resolution": 64, "steps": 1, "threads": 1}
    (tmp_path / "ldm").mkdir()
    with pytest.raises(RuntimeError, match="not from"):  # this project's `ldm` would be measured instead
        benchmark.run_worker(job, benchmark.ORIGINAL_WORKER)
