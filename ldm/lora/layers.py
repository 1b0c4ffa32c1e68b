"""A LoRA file's keys grouped into layers: for each adapted module its down (A) and up (B) matrices and its
alpha, in the layouts the tools write:

* kohya / web UI: `NAME.lora_down.weight`, `NAME.lora_up.weight`, `NAME.alpha`;
* diffusers/PEFT: `unet.MODULE.lora_A.weight`, `…lora_B.weight`, alpha in the file's `lora_adapter_metadata`;
* older diffusers: `…lora.down.weight`/`…lora.up.weight`, `…lora_linear_layer.down.weight`, and the attention
  processors' `…attn1.processor.to_q_lora.down.weight`.

The layer's update is ΔW = (alpha / rank) · up · down (LoRA, Hu et al. 2021); without an alpha it is up · down.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from typing import Optional

import torch

from ldm.errors import UserInputError
from ldm.lora.files import LoraFile

ROLE_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_linear_layer.down.weight", "down"), (".lora_linear_layer.up.weight", "up"),
    (".lora.down.weight", "down"), (".lora.up.weight", "up"),
    (".down.weight", "down"), (".up.weight", "up"),
    (".alpha", "alpha"),
)
# Parts of LyCORIS and DoRA files, which change weights in other ways than up · down.
OTHER_ADAPTERS = re.compile(r"hada_|lokr_|lora_mid|dora_scale|magnitude_vector|\boft_|\bboft_|\.diff(_b)?$")
# The attention processors' names of old diffusers files, per component.
PROCESSOR_NAMES = {
    "unet": ((".processor.to_q_lora", ".to_q"), (".processor.to_k_lora", ".to_k"), (".processor.to_v_lora", ".to_v"),
             (".processor.to_out_lora", ".to_out.0")),
    "text_encoder": ((".to_q_lora", ".q_proj"), (".to_k_lora", ".k_proj"), (".to_v_lora", ".v_proj"),
                     (".to_out_lora", ".out_proj")),
}
UNET_BLOCKS = re.compile(r"^(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)\b")
PEFT_METADATA = "lora_adapter_metadata"
MAX_NAMES = 3


@dataclass
class LoraLayer:
    """One adapted module: `name` as the file writes it, its matrices, and its scale alpha / rank."""

    name: str
    down: Optional[torch.Tensor] = None
    up: Optional[torch.Tensor] = None
    alpha: Optional[float] = None
    rank_stabilized: bool = False

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        """alpha / rank (alpha / sqrt(rank) for rank-stabilised PEFT LoRAs); 1 without an alpha."""
        if self.alpha is None:
            return 1.0
        return self.alpha / (math.sqrt(self.rank) if self.rank_stabilized else self.rank)


def _split(key: str) -> tuple[str, str] | None:
    """(module name, role) of a key, or None when the key is not a part of a LoRA layer."""
    for suffix, role in ROLE_SUFFIXES:
        if key.endswith(suffix):
            return key[: -len(suffix)], role
    return None


def _normalise(module: str) -> str:
    """Old diffusers names in today's: a `unet.` prefix where it was left out, attention processor names as the
    modules they adapt."""
    if UNET_BLOCKS.match(module):
        module = "unet." + module
    component = module.split(".", 1)[0]
    for old, new in PROCESSOR_NAMES.get(component, ()):
        module = module.replace(old, new)
    return module


def _examples(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_NAMES])
    return shown + (f" (and {len(names) - MAX_NAMES} more)" if len(names) > MAX_NAMES else "")


def _peft_alphas(lora: LoraFile) -> dict[str, dict]:
    """component ('unet', 'text_encoder') -> its PEFT LoraConfig fields, from diffusers' metadata."""
    text = lora.metadata.get(PEFT_METADATA)
    if not text:
        return {}
    try:
        packed = json.loads(text)
    except ValueError as error:
        raise UserInputError(f"LoRA file {lora.path}: its {PEFT_METADATA} is not JSON ({error}); download it "
                             "again") from error
    configs: dict[str, dict] = {}
    for key, value in packed.items():
        component, _, field_name = key.partition(".")
        configs.setdefault(component, {})[field_name] = value
    return configs


def _peft_alpha(layer: LoraLayer, configs: dict[str, dict]) -> None:
    """Set a PEFT layer's alpha from its component's LoraConfig (`alpha_pattern` first, then `lora_alpha`)."""
    component, _, module = layer.name.partition(".")
    config = configs.get(component)
    if not config:
        return
    alpha = config.get("lora_alpha")
    for pattern, value in (config.get("alpha_pattern") or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", module):
            alpha = value
            break
    if alpha is not None:
        layer.alpha = float(alpha)
    layer.rank_stabilized = bool(config.get("use_rslora"))


def read_layers(lora: LoraFile) -> list[LoraLayer]:
    """The layers of `lora`; keys that are no part of a LoRA layer, and layers without both matrices, are an
    error."""
    other = [key for key in lora.tensors if OTHER_ADAPTERS.search(key)]
    if other:
        raise UserInputError(f"LoRA file {lora.path} holds LyCORIS (LoHa, LoKr, Tucker) or DoRA layers, e.g. "
                             f"{_examples(other)}; only plain LoRA and LoCon layers (up · down) are supported")
    layers: dict[str, LoraLayer] = {}
    unknown = []
    for key, tensor in lora.tensors.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        module, role = _normalise(split[0]), split[1]
        layer = layers.setdefault(module, LoraLayer(name=module))
        if role == "alpha":
            layer.alpha = float(tensor.item())
        else:
            setattr(layer, role, tensor)
    if unknown:
        raise UserInputError(f"LoRA file {lora.path} has keys that are no part of a LoRA layer: "
                             f"{_examples(unknown)}; is it a LoRA file?")
    incomplete = [name for name, layer in layers.items() if layer.down is None or layer.up is None]
    if incomplete:
        raise UserInputError(f"LoRA file {lora.path} is incomplete: {_examples(incomplete)} lack their down or up "
                             "weight; download it again")
    configs = _peft_alphas(lora)
    for layer in layers.values():
        if layer.alpha is None:
            _peft_alpha(layer, configs)
    return list(layers.values())
