"""The layout of a diffusers Stable Diffusion folder (what `StableDiffusionPipeline.save_pretrained` writes), read
without torch, so that the command lines can check a folder before anything loads.

    model_index.json            the pipeline: its class and one entry per part
    unet/config.json            + diffusion_pytorch_model[.fp16].safetensors (or .bin, or sharded with an index)
    vae/config.json             + diffusion_pytorch_model[.fp16].safetensors (or .bin)
    text_encoder/config.json    + model[.fp16].safetensors (or pytorch_model[.fp16].bin)
    tokenizer/, scheduler/      not needed here: our model has its own tokenizer, and its config its schedule

Stable Diffusion 2 (a 1024-wide OpenCLIP text encoder) and SDXL (a second text encoder, `text_encoder_2`) folders
are refused in one line: this package builds SD v1 models only.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

from ldm.errors import CheckpointError

MODEL_INDEX = "model_index.json"
CONFIG_NAME = "config.json"
WEIGHT_PARTS = ("unet", "vae", "text_encoder")
WEIGHT_BASE_NAMES = {"unet": ("diffusion_pytorch_model",), "vae": ("diffusion_pytorch_model",),
                     "text_encoder": ("model", "pytorch_model")}
VARIANTS = ("", ".fp16")
EXTENSIONS = (".safetensors", ".bin")
SDXL_PARTS = ("text_encoder_2", "tokenizer_2")
SD2_TEXT_WIDTH = 1024
SDXL_CONTEXT_WIDTH = 2048


@dataclass(frozen=True)
class DiffusersFolder:
    """A checked diffusers folder: the config and the weight files (shards in order) of each part."""

    path: Path
    configs: dict[str, dict[str, Any]]
    weights: dict[str, list[Path]]

    @property
    def in_channels(self) -> Optional[int]:
        """Input channels of the UNet: 4 for text-to-image, 9 for an inpainting model."""
        channels = self.configs["unet"].get("in_channels")
        return int(channels) if channels is not None else None

    def weight_bytes(self) -> int:
        """The size of the weight files: what the weights take once loaded, give or take their dtype."""
        return sum(file.stat().st_size for files in self.weights.values() for file in files)


def is_diffusers_folder(path: str | os.PathLike) -> bool:
    """Whether `path` is a directory with a `model_index.json` (a diffusers pipeline folder)."""
    return Path(path).is_dir() and (Path(path) / MODEL_INDEX).is_file()


def _read_json(path: Path) -> dict[str, Any]:
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {error}") from error
    if not isinstance(value, dict):
        raise CheckpointError(f"{path} is not a JSON object")
    return value


def _shards(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index} has no weight_map")
    return [index.parent / name for name in dict.fromkeys(weight_map.values())]


def _weight_files(part_dir: Path, part: str) -> Optional[list[Path]]:
    """The weight files of one part: the plain file before the fp16 variant, safetensors before pickles."""
    for variant in VARIANTS:
        for extension in EXTENSIONS:
            for base in WEIGHT_BASE_NAMES[part]:
                name = f"{base}{variant}{extension}"
                if (part_dir / name).is_file():
                    return [part_dir / name]
                if (part_dir / f"{name}.index.json").is_file():
                    return _shards(part_dir / f"{name}.index.json")
    return None


def _check_architecture(path: Path, index: dict[str, Any], configs: dict[str, dict[str, Any]]) -> None:
    """Refuse SD 2 and SDXL folders, which the model_index or the text encoder's width give away."""
    pipeline = index.get("_class_name", "a diffusers pipeline")
    if any(part in index or (path / part).is_dir() for part in SDXL_PARTS) or \
            configs["unet"].get("cross_attention_dim") == SDXL_CONTEXT_WIDTH:
        raise CheckpointError(f"{path} is an SDXL folder ({pipeline} with text_encoder_2); this package runs "
                              "Stable Diffusion v1 models only")
    width = configs["text_encoder"].get("hidden_size")
    if width == SD2_TEXT_WIDTH or configs["unet"].get("cross_attention_dim") == SD2_TEXT_WIDTH:
        raise CheckpointError(f"{path} is a Stable Diffusion 2 folder (a {SD2_TEXT_WIDTH}-wide OpenCLIP text "
                              "encoder); this package runs Stable Diffusion v1 models (768-wide CLIP ViT-L/14) only")


def inspect_folder(path: str | os.PathLike) -> DiffusersFolder:
    """Check that `path` is a diffusers Stable Diffusion v1 folder with every part this package loads, reading only
    its JSON files; raises `CheckpointError` naming what is missing or which architecture it is instead."""
    path = Path(path)
    if not is_diffusers_folder(path):
        raise CheckpointError(f"{path} is not a diffusers folder: it has no {MODEL_INDEX}")
    index = _read_json(path / MODEL_INDEX)
    configs: dict[str, dict[str, Any]] = {}
    weights: dict[str, list[Path]] = {}
    for part in WEIGHT_PARTS:
        part_dir = path / part
        if not (part_dir / CONFIG_NAME).is_file():
            raise CheckpointError(f"the diffusers folder {path} has no {part} ({part}/{CONFIG_NAME} is missing); "
                                  "copy the whole folder again")
        configs[part] = _read_json(part_dir / CONFIG_NAME)
    _check_architecture(path, index, configs)
    for part in WEIGHT_PARTS:
        files = _weight_files(path / part, part)
        if files is None:
            names = " or ".join(f"{base}.safetensors" for base in WEIGHT_BASE_NAMES[part][:1])
            raise CheckpointError(f"the diffusers folder {path} has no weights for its {part} (no {part}/{names} "
                                  "or .bin); copy the whole folder again")
        missing = [file for file in files if not file.is_file()]
        if missing:
            raise CheckpointError(f"the diffusers folder {path} lacks the {part} shard {missing[0].name}")
        weights[part] = files
    return DiffusersFolder(path=path, configs=configs, weights=weights)
