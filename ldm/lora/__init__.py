"""LoRA adapters for SD v1 models (LoRA: Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models"):
read kohya / web-UI and diffusers/PEFT files, merge ΔW = weight · (alpha / rank) · up · down into the weights
(no cost per sampling step), and take it out again bit for bit. See docs/lora-vae.md."""
from ldm.lora.files import LoraFile, read_lora
from ldm.lora.merge import LoraHandle, apply_lora, remove_lora

__all__ = ["LoraFile", "LoraHandle", "apply_lora", "read_lora", "remove_lora"]
