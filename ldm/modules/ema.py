"""Exponential moving average of model weights, stored as buffers so it lands in checkpoints
under `model_ema.<name without dots>` as in the original `LitEma`."""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA of a model's trainable parameters; decay warms up as min(decay, (1+n)/(10+n))."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError("EMA decay must be between 0 and 1")
        self.m_name2s_name: dict[str, str] = {}
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int))
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow_name = name.replace(".", "")
                self.m_name2s_name[name] = shadow_name
                self.register_buffer(shadow_name, param.detach().clone())
        self.collected_params: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """Move the shadow weights one step towards the model's weights."""
        decay = self.decay.item()
        if self.num_updates >= 0:
            self.num_updates += 1
            decay = min(decay, (1 + self.num_updates.item()) / (10 + self.num_updates.item()))
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                shadow = shadows[self.m_name2s_name[name]]
                shadow.lerp_(param.detach().to(shadow.dtype), 1.0 - decay)

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the EMA weights into `model`."""
        shadows = dict(self.named_buffers())
        for name, param in model.named_parameters():
            if param.requires_grad:
                param.copy_(shadows[self.m_name2s_name[name]])

    def store(self, parameters: Iterable[torch.Tensor]) -> None:
        """Keep a copy of the current weights, to put back with `restore`."""
        self.collected_params = [param.detach().clone() for param in parameters]

    @torch.no_grad()
    def restore(self, parameters: Iterable[torch.Tensor]) -> None:
        for saved, param in zip(self.collected_params, parameters):
            param.copy_(saved)
        self.collected_params = []
