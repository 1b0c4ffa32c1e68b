"""Recognising LoRAs made for other base models than SD v1 (SD 2.x, SDXL), so that the error says so.

SDXL files name two text encoders (`lora_te1_`, `lora_te2_`, `text_encoder_2.`); kohya's training scripts record
the base model in the metadata (`ss_base_model_version`, `ss_v2`); otherwise the widths give it away: the
UNet's cross-attention reads the text encoder's output, 768 wide for SD v1, 1024 for SD 2.x, 2048 for SDXL, and
the text encoder itself is 768 (SD v1), 1024 (SD 2.x) or 768 and 1280 (SDXL) wide.
"""
from __future__ import annotations

import re
from typing import Optional

from ldm.lora.files import LoraFile
from ldm.lora.layers import LoraLayer

SDXL_PREFIXES = ("lora_te1_", "lora_te2_", "text_encoder_2.")
CONTEXT_WIDTHS = {1024: "SD 2.x", 2048: "SDXL"}
TEXT_WIDTHS = {1024: "SD 2.x", 1280: "SDXL"}
CROSS_ATTENTION_INPUT = re.compile(r"attn2[._]to_[kv]$")
TEXT_LAYER = re.compile(r"^(lora_te_|text_encoder\.)")


def family_from_names(lora: LoraFile) -> Optional[str]:
    """'SDXL' or 'SD 2.x' when the file's names or metadata say so, else None."""
    if any(key.startswith(SDXL_PREFIXES) for key in lora.tensors):
        return "SDXL"
    if str(lora.metadata.get("ss_base_model_version", "")).startswith("sdxl"):
        return "SDXL"
    if str(lora.metadata.get("ss_v2", "")) == "True":
        return "SD 2.x"
    return None


def family_from_widths(layers: list[LoraLayer]) -> Optional[str]:
    """'SDXL' or 'SD 2.x' when a cross-attention input or a text-encoder layer has their width, else None."""
    for layer in layers:
        width = layer.down.shape[1] if layer.down.ndim >= 2 else None
        if CROSS_ATTENTION_INPUT.search(layer.name) and width in CONTEXT_WIDTHS:
            return CONTEXT_WIDTHS[width]
        if TEXT_LAYER.match(layer.name) and width in TEXT_WIDTHS:
            return TEXT_WIDTHS[width]
    return None
