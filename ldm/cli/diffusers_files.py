"""Writing what the converters make: a diffusers folder and a `.safetensors` checkpoint, each built under a
temporary name beside its target and then put in place in one step, never over anything that exists.

The folder is what `StableDiffusionPipeline.save_pretrained` writes for Stable Diffusion v1 (the released
CompVis/stable-diffusion-v1-4 layout) without the safety checker and its feature extractor
(`requires_safety_checker: false`): model_index.json, unet/, vae/, text_encoder/ (transformers' CLIPTextModel),
tokenizer/ and scheduler/ (PNDM, as the released folders).

The tokenizer's `vocab.json` and `merges.txt` are derived offline from CLIP's merge table, the
`bpe_simple_vocab_16e6.txt.gz` that open_clip ships, through the same tokenizer the model uses
(`ldm.modules.encoders.clip_tokenizer`): its vocabulary is CLIP's (the 256 byte characters, the same with `</w>`,
the merges joined, then `<|startoftext|>` and `<|endoftext|>`), its merge ranks the table's order.
"""
from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Mapping

import torch

from ldm.diffusers_format import SCHEDULE_TYPE, ConversionPlan
from ldm.errors import UserInputError

MERGES_HEADER = "#version: 0.2"


def check_new_output(path: str | os.PathLike, folder: bool) -> Path:
    """Refuse an output that exists (an empty directory may take a folder), or whose parent cannot be written."""
    path = Path(path)
    if path.exists() and not (folder and path.is_dir() and not any(path.iterdir())):
        raise UserInputError(f"{path} exists; choose a new output path (nothing is overwritten)")
    parent = path.absolute().parent
    probe = parent
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        raise UserInputError(f"cannot write {path}: {probe} is not a writable directory")
    return path


def _creation_mode(base: int) -> int:
    """`base` (0o777 for a directory, 0o666 for a file) under the process umask, as mkdir and open apply it;
    tempfile's own modes are private (0o700, 0o600)."""
    umask = os.umask(0o022)
    os.umask(umask)
    return base & ~umask


def _dump_json(path: Path, value: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def _save_tensors(path: Path, tensors: Mapping[str, torch.Tensor]) -> None:
    from safetensors.torch import save_file

    save_file({key: value.contiguous() for key, value in tensors.items()}, str(path), metadata={"format": "pt"})


def _diffusers_config(class_name: str, config: Mapping[str, Any]) -> dict[str, Any]:
    import diffusers

    return {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}


def text_encoder_config(plan: ConversionPlan, dtype: torch.dtype) -> Any:
    """transformers' `CLIPTextConfig` of the model's text encoder (its own widths: a small test model's too)."""
    from transformers import CLIPTextConfig

    from ldm.modules.encoders.clip_tokenizer import EOT_TOKEN_ID, SOT_TOKEN_ID

    text = plan.text_config
    return CLIPTextConfig(**text, projection_dim=text["hidden_size"], bos_token_id=SOT_TOKEN_ID,
                          eos_token_id=EOT_TOKEN_ID, pad_token_id=EOT_TOKEN_ID, architectures=["CLIPTextModel"],
                          dtype=str(dtype).removeprefix("torch."))


def scheduler_config(plan: ConversionPlan) -> dict[str, Any]:
    """The PNDM scheduler of the released SD v1 folders, on the config's noise schedule."""
    params = plan.params
    return _diffusers_config("PNDMScheduler", {
        "beta_start": params.get("linear_start", 1e-4), "beta_end": params.get("linear_end", 2e-2),
        "beta_schedule": SCHEDULE_TYPE, "num_train_timesteps": params.get("timesteps", 1000),
        "prediction_type": "epsilon", "skip_prk_steps": True, "set_alpha_to_one": False, "steps_offset": 1,
        "clip_sample": False, "trained_betas": None})


def write_tokenizer(directory: Path, max_length: int) -> None:
    """vocab.json, merges.txt and the configs of transformers' CLIPTokenizer, from CLIP's merge table."""
    from ldm.modules.encoders.clip_tokenizer import END_OF_TEXT, START_OF_TEXT, CLIPTokenizer

    bpe = CLIPTokenizer().bpe
    merges = sorted(bpe.bpe_ranks, key=bpe.bpe_ranks.get)
    directory.mkdir()
    _dump_json(directory / "vocab.json", dict(sorted(bpe.encoder.items(), key=lambda item: item[1])))
    (directory / "merges.txt").write_text("\n".join([MERGES_HEADER, *(" ".join(pair) for pair in merges)]) + "\n",
                                          encoding="utf-8")
    special = {"bos_token": START_OF_TEXT, "eos_token": END_OF_TEXT, "unk_token": END_OF_TEXT,
               "pad_token": END_OF_TEXT}
    _dump_json(directory / "special_tokens_map.json", special)
    _dump_json(directory / "tokenizer_config.json", {**special, "tokenizer_class": "CLIPTokenizer",
                                                     "model_max_length": max_length, "do_lower_case": True,
                                                     "errors": "replace", "add_prefix_space": False})


def _model_index(plan: ConversionPlan) -> dict[str, Any]:
    pipeline = "StableDiffusionInpaintPipeline" if plan.in_channels == 9 else "StableDiffusionPipeline"
    return _diffusers_config(pipeline, {
        "unet": ["diffusers", "UNet2DConditionModel"], "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"], "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "PNDMScheduler"], "safety_checker": [None, None],
        "feature_extractor": [None, None], "requires_safety_checker": False})


def _fill_folder(root: Path, parts: Mapping[str, Mapping[str, torch.Tensor]], plan: ConversionPlan,
                 latent_scale: float, dtype: torch.dtype) -> None:
    for part, class_name in (("unet", "UNet2DConditionModel"), ("vae", "AutoencoderKL")):
        (root / part).mkdir()
        config = plan.unet_config if part == "unet" else {**plan.vae_config, "scaling_factor": latent_scale}
        _dump_json(root / part / "config.json", _diffusers_config(class_name, config))
        _save_tensors(root / part / "diffusion_pytorch_model.safetensors", parts[part])
    (root / "text_encoder").mkdir()
    text_encoder_config(plan, dtype).to_json_file(str(root / "text_encoder" / "config.json"))
    _save_tensors(root / "text_encoder" / "model.safetensors", parts["text_encoder"])
    write_tokenizer(root / "tokenizer", int(plan.template.cond_stage_model.max_length))
    (root / "scheduler").mkdir()
    _dump_json(root / "scheduler" / "scheduler_config.json", scheduler_config(plan))
    _dump_json(root / "model_index.json", _model_index(plan))


def write_diffusers_folder(target: str | os.PathLike, parts: Mapping[str, Mapping[str, torch.Tensor]],
                           plan: ConversionPlan, latent_scale: float, dtype: torch.dtype) -> Path:
    """Write the diffusers folder `target` (new, or an empty directory) from the parts' state dicts (of
    `ldm.diffusers_format.to_diffusers`): built in a temporary sibling, then renamed into place."""
    target = check_new_output(target, folder=True)
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    building = Path(tempfile.mkdtemp(dir=target.absolute().parent, prefix=f".{target.name}.", suffix=".partial"))
    try:
        os.chmod(building, _creation_mode(0o777))
        _fill_folder(building, parts, plan, latent_scale, dtype)
        os.rename(building, target)  # fails if something else has meanwhile put files there
    except OSError as error:
        raise UserInputError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def save_new_safetensors(target: str | os.PathLike, tensors: Mapping[str, torch.Tensor]) -> Path:
    """Write `tensors` to the new file `target` (.safetensors): written beside it, then linked into place, which
    fails rather than replace a file that appeared meanwhile."""
    target = check_new_output(target, folder=False)
    target.absolute().parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=target.absolute().parent, prefix=f".{target.name}.", suffix=".partial")
    os.close(handle)
    try:
        _save_tensors(Path(temporary), tensors)
        os.chmod(temporary, _creation_mode(0o666))
        try:
            os.link(temporary, target)
        except FileExistsError as error:
            raise UserInputError(f"{target} exists; choose a new output path (nothing is overwritten)") from error
    except OSError as error:
        raise UserInputError(f"cannot write {target}: {error.strerror or error}") from error
    finally:
        os.unlink(temporary)
    return target
