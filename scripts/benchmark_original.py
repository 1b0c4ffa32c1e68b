"""One txt2img render by the original Stable Diffusion code, in this process, for `scripts/benchmark.py --original`.

    python scripts/benchmark_original.py --worker '{"original": DIR, "checkpoint": "model.ckpt",
        "config": "configs/stable-diffusion/v1-inference.yaml", "device": "cpu", "resolution": 512, "steps": 1,
        "threads": 2}'

`DIR` holds the original `ldm` package: a CompVis/stable-diffusion checkout, or
`pip install --no-deps --target DIR stable-diffusion-sdkit` (Stability AI's repository, whose v1 modules are
CompVis's). It goes first on the import path, so `ldm` here is the original, never this project. The render
follows the original `scripts/txt2img.py`: `torch.load` the `.ckpt`, build the model from the config,
`load_state_dict(strict=False)`, sample with its DDIM sampler and classifier-free guidance, decode. Prints
one JSON line: the load time, the RSS after loading, and the peak RSS of the load, the render and the process.

Only what the original would fetch from the Hub or import without using on this path is stood in for: the
CLIP tokenizer (fixed token ids: they do not change the memory) and `CLIPTextModel.from_pretrained` (the
same ViT-L/14 text model built from its configuration; the checkpoint overwrites its weights, as it does
the downloaded ones), OpenCLIP (imported for SD 2 encoders only) and Lightning 1.x's `rank_zero_only`.
"""
from __future__ import annotations

import json
import re
import sys
import time
import types
from pathlib import Path
from typing import Any

import torch

PROMPT = "a photograph of an astronaut riding a horse"
GUIDANCE = 7.5
CLIP_VIT_L14_TEXT = {"vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12,
                     "num_attention_heads": 12, "max_position_embeddings": 77, "hidden_act": "quick_gelu",
                     "projection_dim": 768}


def status_kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+)", Path("/proc/self/status").read_text()).group(1))


def reset_peak_rss() -> None:
    """Restart the kernel's peak-RSS counter (VmHWM) from the current RSS."""
    Path("/proc/self/clear_refs").write_text("5")


class FixedTokenizer:
    """Stands in for `CLIPTokenizer`: every text becomes start, end and padding ids, 77 long."""

    def __call__(self, text: list[str], max_length: int = 77, **_: Any) -> dict[str, torch.Tensor]:
        ids = torch.full((len(text), max_length), 49407, dtype=torch.long)
        ids[:, 0] = 49406
        return {"input_ids": ids, "length": torch.full((len(text),), max_length)}


def install_stand_ins() -> None:
    """The stand-ins of the module docstring, in place before the original is imported."""
    import transformers
    from pytorch_lightning.utilities.rank_zero import rank_zero_only

    distributed = types.ModuleType("pytorch_lightning.utilities.distributed")
    distributed.rank_zero_only = rank_zero_only
    sys.modules.setdefault("pytorch_lightning.utilities.distributed", distributed)
    sys.modules.setdefault("open_clip", types.ModuleType("open_clip"))

    def text_model(cls: type, *_: Any, **__: Any) -> torch.nn.Module:
        return cls(transformers.CLIPTextConfig(**CLIP_VIT_L14_TEXT))

    transformers.CLIPTextModel.from_pretrained = classmethod(text_model)
    transformers.CLIPTokenizer.from_pretrained = classmethod(lambda cls, *_, **__: FixedTokenizer())


def import_original(folder: Path) -> None:
    """Import the original modules from `folder`, and fail where any `ldm` module comes from elsewhere (an
    `ldm` folder that lacks them would let this project's installed package fill in)."""
    sys.path.insert(0, str(folder))
    install_stand_ins()
    import ldm.models.diffusion.ddim  # noqa: F401
    import ldm.models.diffusion.ddpm  # noqa: F401
    import ldm.modules.encoders.modules  # noqa: F401

    root = folder.resolve()
    for name, module in sorted(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if name.split(".")[0] == "ldm" and file and root not in Path(file).resolve().parents:
            raise SystemExit(f"error: {name} imports from {file}, not from {folder}; give the folder that holds "
                             "the original `ldm` package")


def load(checkpoint: Path, config_path: Path, device: str) -> torch.nn.Module:
    """The original `load_model_from_config`: the whole pickle in memory, then a freshly built model."""
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    config = OmegaConf.load(config_path)
    config.model.params.cond_stage_config.params = {"device": device}
    state = torch.load(checkpoint, map_location="cpu", weights_only=True)["state_dict"]
    model = instantiate_from_config(config.model)
    model.load_state_dict(state, strict=False)
    return model.eval()


@torch.no_grad()
def render(model: torch.nn.Module, resolution: int, steps: int, device: torch.device) -> None:
    from ldm.models.diffusion.ddim import DDIMSampler

    latent = resolution // 8
    x_T = torch.randn(1, 4, latent, latent, generator=torch.Generator().manual_seed(2)).to(device)
    uc = model.get_learned_conditioning([""])
    c = model.get_learned_conditioning([PROMPT])
    samples, _ = DDIMSampler(model).sample(S=steps, conditioning=c, batch_size=1, shape=[4, latent, latent],
                                           verbose=False, unconditional_guidance_scale=GUIDANCE,
                                           unconditional_conditioning=uc, eta=0.0, x_T=x_T)
    model.decode_first_stage(samples)


def main() -> None:
    job = json.loads(sys.argv[-1])
    torch.set_num_threads(job["threads"])
    device = torch.device(job["device"])
    import_original(Path(job["original"]))
    rss_before = status_kib("VmRSS")
    start = time.perf_counter()
    model = load(Path(job["checkpoint"]), Path(job["config"]), job["device"]).to(device)
    seconds = time.perf_counter() - start
    peak_load, rss_loaded = status_kib("VmHWM"), status_kib("VmRSS")
    reset_peak_rss()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    render(model, job["resolution"], job["steps"], device)
    peak_render = status_kib("VmHWM")
    result = {"seconds": seconds, "rss_before_mib": rss_before / 1024, "rss_loaded_mib": rss_loaded / 1024,
              "peak_rss_render_mib": peak_render / 1024, "peak_rss_process_mib": max(peak_load, peak_render) / 1024}
    if device.type == "cuda":
        result["max_memory_allocated_mib"] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    print(json.dumps(result))


if __name__ == "__main__":
    main()
