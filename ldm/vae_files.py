"""Loading a separately released autoencoder ("VAE") file over a model's first stage, e.g.
`vae-ft-mse-840000-ema-pruned.ckpt`.

The file may hold a full model (`first_stage_model.*` keys, the rest ignored), bare autoencoder keys (`encoder.`,
`decoder.`, `quant_conv.`, `post_quant_conv.`; a training checkpoint's `model_ema.` and `loss.` keys are
dropped), or diffusers' AutoencoderKL layout (`encoder.down_blocks.…`), mapped back through diffusers' own
conversion (`ldm.original_names`). Every weight of the model's autoencoder must be there with its shape; the
values are copied into the existing weights (cast to their dtype, on their device).
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import torch
from torch import nn

from ldm.checkpoint import read_state_dict
from ldm.errors import UserInputError
from ldm.original_names import ndims, vae_names

logger = logging.getLogger(__name__)

FULL_MODEL_PREFIX = "first_stage_model."
TRAINING_PREFIXES = ("model_ema.", "loss.")
DIFFUSERS_BLOCKS = ("encoder.down_blocks.", "decoder.up_blocks.", "encoder.mid_block.", "decoder.mid_block.")
# Attention names of diffusers' AutoencoderKL before diffusers 0.14, as the current ones.
OLD_DIFFUSERS_ATTENTION = ((re.compile(r"\.query\."), ".to_q."), (re.compile(r"\.key\."), ".to_k."),
                           (re.compile(r"\.value\."), ".to_v."), (re.compile(r"\.proj_attn\."), ".to_out.0."))
MAX_NAMES = 3


def _from_diffusers(tensors: dict[str, torch.Tensor], autoencoder: nn.Module) -> dict[str, torch.Tensor]:
    ours = autoencoder.state_dict()
    names = vae_names(ndims(ours), autoencoder.encoder.num_resolutions)
    state = {}
    for key, value in tensors.items():
        for pattern, new in OLD_DIFFUSERS_ATTENTION:
            key = pattern.sub(new, key)
        original = names.get(key, key)
        if original in ours and value.numel() == ours[original].numel():
            value = value.reshape(ours[original].shape)  # diffusers' linear attention weights, our 1x1 convs
        state[original] = value
    return state


def autoencoder_state(tensors: dict[str, torch.Tensor], autoencoder: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors of a VAE file in the layout of `autoencoder`'s state dict."""
    if any(key.startswith(FULL_MODEL_PREFIX) for key in tensors):
        return {key[len(FULL_MODEL_PREFIX):]: value for key, value in tensors.items()
                if key.startswith(FULL_MODEL_PREFIX)}
    tensors = {key: value for key, value in tensors.items() if not key.startswith(TRAINING_PREFIXES)}
    if any(key.startswith(DIFFUSERS_BLOCKS) for key in tensors):
        return _from_diffusers(tensors, autoencoder)
    return tensors


def _examples(names: list[str]) -> str:
    return ", ".join(names[:MAX_NAMES]) + (f" (and {len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def load_vae(model: nn.Module, path: str | os.PathLike) -> None:
    """Replace the weights of `model.first_stage_model` with those of the VAE file at `path`."""
    path = Path(path)
    autoencoder = model.first_stage_model
    expected = autoencoder.state_dict(keep_vars=True)
    state = autoencoder_state(read_state_dict(path), autoencoder)
    missing = [key for key in expected if key not in state]
    if missing:
        raise UserInputError(f"{path} is not an autoencoder for this model: {len(missing)} of its "
                             f"{len(expected)} weights are missing, e.g. {_examples(missing)}; give a VAE file "
                             "made for SD v1 (e.g. vae-ft-mse-840000-ema-pruned.safetensors)")
    wrong = [key for key in expected if state[key].shape != expected[key].shape]
    if wrong:
        key = wrong[0]
        raise UserInputError(f"VAE {path} does not fit this model: {key} is "
                             f"{'x'.join(map(str, state[key].shape))} in the file and "
                             f"{'x'.join(map(str, expected[key].shape))} in the model ({len(wrong)} weights "
                             "differ); give a VAE made for SD v1, not for SD 3/Flux or another autoencoder")
    broken = [key for key in expected if state[key].is_floating_point() and not torch.isfinite(state[key]).all()]
    if broken:
        raise UserInputError(f"VAE {path}: {_examples(broken)} hold NaN or infinite values; the file is damaged: "
                             "download it again")
    ignored = sorted(set(state) - set(expected))
    if ignored:
        logger.warning("VAE %s: ignored %d keys that this autoencoder does not have, e.g. %s", path, len(ignored),
                       _examples(ignored))
    with torch.no_grad():
        for key, target in expected.items():
            target.copy_(state[key])
    logger.info("VAE loaded from %s", path)
