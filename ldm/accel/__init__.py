"""Speed work for a built model, behind one call and one switch.

`optimize(model, device)` swaps the layers of the model's networks (the UNet, the autoencoder's encoder and
decoder) for subclasses that compute the same maths faster on the CPU: Winograd and GEMM convolutions, oneDNN
linear products, padded attention heads, chunked feed-forward layers, banded decoding, channels-last maps and
a guided step whose shared layers run once (see the modules of this package). The parameters stay the same
objects, so loading weights, merging into them or editing them in place goes on working; caches of
transformed weights follow the weights' versions. Like diffusers' attention processors, each layer keeps its
state dict and can be swapped back (`restore`).

The fast layers are for inference: `optimize` refuses a model in training mode, and where autograd records
(or under `torch.compile`, or off the CPU) each fast layer computes as its plain self. Set `LDM_ACCEL=0`
(or pass `--no_accel` to the scripts) to switch it off.
"""
from __future__ import annotations

import os
from typing import TypeVar

import torch
from torch import nn

from ldm.accel.attention import FastBasicTransformerBlock, FastCrossAttention, FastFeedForward, FastSpatialTransformer
from ldm.accel.autoencoder import FastAEUpsample, FastAttnBlock, FastDecoder, FastEncoder, FastResnetBlock
from ldm.accel.conv import FastConv2d, FastGroupNorm32, FastLinear
from ldm.accel.unet import FastUNetModel, FastUpsample
from ldm.modules.diffusionmodules.model import Decoder, Encoder
from ldm.modules.diffusionmodules.openaimodel import UNetModel

ENV_SWITCH = "LDM_ACCEL"
FAST_CLASSES: tuple[type[nn.Module], ...] = (
    FastConv2d, FastLinear, FastGroupNorm32, FastCrossAttention, FastFeedForward, FastBasicTransformerBlock,
    FastSpatialTransformer, FastUpsample, FastUNetModel, FastResnetBlock, FastAttnBlock, FastAEUpsample,
    FastEncoder, FastDecoder,
)
_FAST_BY_PLAIN = {cls.__bases__[0]: cls for cls in FAST_CLASSES}
_PLAIN_BY_FAST = {fast: plain for plain, fast in _FAST_BY_PLAIN.items()}
NETWORKS = (UNetModel, Encoder, Decoder)

ModuleT = TypeVar("ModuleT", bound=nn.Module)


def enabled() -> bool:
    """False when the environment variable LDM_ACCEL says 0, false, no or off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "no", "off")


def optimize(model: ModuleT, device: torch.device | str = "cpu") -> ModuleT:
    """Swap in the fast layers inside `model`'s networks for inference on `device`; returns `model`.

    A no-op where LDM_ACCEL is off and on devices other than the CPU (whose fast paths are all CPU kernels)."""
    if model.training:
        raise ValueError("ldm.accel.optimize is for inference: call model.eval() first (training never uses it)")
    if not enabled() or torch.device(device).type != "cpu":
        return model
    for network in [m for m in model.modules() if type(m) in NETWORKS]:
        for module in network.modules():
            fast = _FAST_BY_PLAIN.get(type(module))
            if fast is not None:
                module.__class__ = fast
    return model


def restore(model: ModuleT) -> ModuleT:
    """Swap every fast layer inside `model` back to its plain class; returns `model`."""
    for module in model.modules():
        plain = _PLAIN_BY_FAST.get(type(module))
        if plain is not None:
            module.__class__ = plain
    return model


def is_optimized(model: nn.Module) -> bool:
    """Whether any layer of `model` is a fast one."""
    return any(type(module) in _PLAIN_BY_FAST for module in model.modules())
