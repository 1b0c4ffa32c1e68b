"""Merging LoRA layers into a model's weights, and taking them out again.

Each adapted weight becomes W + weight · (alpha / rank) · up · down (LoRA, Hu et al. 2021), computed in float32
and cast once to the weight's dtype, written in place (the parameter stays the same object and its version
counter moves, so caches of transformed weights such as ldm.accel's follow). Sampling then costs what it cost
without the LoRA. A removable merge keeps a CPU copy of every weight it touches, and `remove_lora` copies them
back: the original weights return bit for bit. Several LoRAs stack; they come off in the reverse order.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass, field
from typing import Union

import torch
from torch import nn

from ldm.errors import UserInputError
from ldm.lora.architecture import family_from_names, family_from_widths
from ldm.lora.files import LoraFile, read_lora
from ldm.lora.layers import MAX_NAMES, LoraLayer, read_layers
from ldm.lora.targets import TEXT_PREFIX, UNET_PREFIX, lora_targets

logger = logging.getLogger(__name__)

APPLIED = "_applied_loras"  # the model attribute listing its removable merges, oldest first


@dataclass(eq=False)
class LoraHandle:
    """A LoRA merged into `model`: which weights it changed, and (when removable) their values before."""

    model: nn.Module
    name: str
    weight: float
    changed: list[str]
    originals: dict[str, torch.Tensor] = field(default_factory=dict)
    removable: bool = True

    def remove(self) -> None:
        """Put back the weights as they were before this LoRA (see `remove_lora`)."""
        remove_lora(self.model, self)


def _for_another_model(lora: LoraFile, family: str, detail: str) -> UserInputError:
    return UserInputError(f"LoRA {lora.path} is for {family}, not SD v1 ({detail}); use a LoRA trained on "
                          "SD v1.x")


def _match(lora: LoraFile, layers: list[LoraLayer], targets: dict[str, str]) -> list[tuple[LoraLayer, str]]:
    unmatched = [layer.name for layer in layers if layer.name not in targets]
    if unmatched:
        family = family_from_widths(layers)
        if family:
            raise _for_another_model(lora, family, f"{len(unmatched)} of its layers are not in this model")
        shown = ", ".join(unmatched[:MAX_NAMES]) + (f" (and {len(unmatched) - MAX_NAMES} more)"
                                                    if len(unmatched) > MAX_NAMES else "")
        raise UserInputError(f"LoRA {lora.path}: {len(unmatched)} of its {len(layers)} layers match no layer of "
                             f"this model: {shown}; is it a LoRA for SD v1 (not SD 2.x/SDXL, not another kind "
                             "of adapter)?")
    return [(layer, targets[layer.name]) for layer in layers]


def _check_shapes(lora: LoraFile, pairs: list[tuple[LoraLayer, str]], params: dict[str, nn.Parameter]) -> None:
    for layer, target in pairs:
        shape = params[target].shape
        down, up = layer.down.flatten(1), layer.up.flatten(1)
        if up.shape[1] == down.shape[0] and (up.shape[0], down.shape[1]) == (shape[0], math.prod(shape[1:])):
            continue
        family = family_from_widths([pair[0] for pair in pairs])
        detail = (f"{layer.name} changes a {up.shape[0]}x{down.shape[1]} weight, this model's "
                  f"{target} is {'x'.join(map(str, shape))}")
        if family:
            raise _for_another_model(lora, family, detail)
        raise UserInputError(f"LoRA {lora.path} does not fit this model: {detail}; is it for SD 2.x/SDXL, not "
                             "SD v1?")


def _delta(layer: LoraLayer, shape: torch.Size, device: torch.device) -> torch.Tensor:
    """(alpha / rank) · up · down in float32, shaped like the weight (linear, 1x1 and LoCon 3x3 convolutions)."""
    down = layer.down.to(device=device, dtype=torch.float32).flatten(1)
    up = layer.up.to(device=device, dtype=torch.float32).flatten(1)
    return (up @ down).mul_(layer.scale).reshape(shape)


def apply_lora(model: nn.Module, lora: Union[LoraFile, str, os.PathLike], weight: float = 1.0, *,
               removable: bool = True) -> LoraHandle:
    """Merge `lora` (a file or its path) into `model`'s weights at strength `weight`; returns the handle that
    `remove_lora` takes. Nothing changes when the LoRA does not fit. `removable=False` keeps no copies of the
    original weights (for a run that never takes the LoRA out)."""
    if not math.isfinite(weight):
        raise UserInputError(f"the LoRA weight must be a finite number, got {weight}")
    if getattr(model, "use_ema", False):
        raise UserInputError("this model keeps EMA weights that replace the merged ones while sampling (use_ema: "
                             "true); load it with an inference config (use_ema: false) to use a LoRA")
    if not isinstance(lora, LoraFile):
        lora = read_lora(lora)
    family = family_from_names(lora)
    if family:
        raise _for_another_model(lora, family, "its names or metadata say so")
    pairs = _match(lora, read_layers(lora), lora_targets(model))
    params = dict(model.named_parameters())
    _check_shapes(lora, pairs, params)
    handle = LoraHandle(model=model, name=lora.name, weight=weight, changed=[], removable=removable)
    with torch.no_grad():
        for layer, target in pairs:
            param = params[target]
            if removable and target not in handle.originals:
                handle.originals[target] = param.detach().to("cpu", copy=True)
            param.copy_(param.float() + weight * _delta(layer, param.shape, param.device))
            handle.changed.append(target)
    if removable:
        model.__dict__.setdefault(APPLIED, []).append(handle)
    unet = sum(target.startswith(UNET_PREFIX) for target in handle.changed)
    text = sum(target.startswith(TEXT_PREFIX) for target in handle.changed)
    logger.info("LoRA %s merged at weight %g: %d UNet and %d text-encoder weights", lora.name, weight, unet, text)
    return handle


def remove_lora(model: nn.Module, handle: LoraHandle) -> None:
    """Copy back the weights `handle`'s LoRA changed, bit-identical to before; LoRAs merged after it must be
    removed first."""
    if not handle.removable:
        raise ValueError(f"LoRA {handle.name} was merged with removable=False: its original weights were not kept")
    applied = model.__dict__.get(APPLIED, [])
    if handle not in applied:
        raise ValueError(f"LoRA {handle.name} is not merged into this model (removed already?)")
    if applied[-1] is not handle:
        later = ", ".join(h.name for h in applied[applied.index(handle) + 1:])
        raise ValueError(f"remove the LoRAs merged after {handle.name} first: {later}")
    params = dict(model.named_parameters())
    with torch.no_grad():
        for target, original in handle.originals.items():
            params[target].copy_(original)
    applied.pop()
    logger.info("LoRA %s removed", handle.name)
