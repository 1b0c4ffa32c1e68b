"""The UNet's fast CPU forward: channels-last feature maps, the fused upsampling convolution, and a guided step
whose shared layers run once."""
from __future__ import annotations

from typing import Optional

import torch

from ldm.accel.attention import spread_rows
from ldm.accel.conv import FastConv2d
from ldm.accel.cpu import cpu_inference
from ldm.modules.attention import SpatialTransformer
from ldm.modules.diffusionmodules.openaimodel import UNetModel, Upsample


class FastUpsample(Upsample):
    """`Upsample` whose 2D convolution reads the map before upsampling (`FastConv2d.upsampled`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 2 and self.use_conv and isinstance(self.conv, FastConv2d):
            return self.conv.upsampled(x)
        return super().forward(x)


class FastUNetModel(UNetModel):
    """`UNetModel` with channels-last feature maps all the way (convolutions need no layout reorders, attention
    no transposing copies), and, for a step its caller marks `guided_pair=True` (the same latents, timesteps and
    labels under the unconditional and the conditional context), the layers before the first cross-attention
    run once at half the batch: the first level's convolutions and its self-attention over every pixel. The
    first transformer block spreads the rows over the contexts (`FastBasicTransformerBlock`). Each output row
    is the one the full batch gives, up to float rounding."""

    def _shares_prefix(self, x: torch.Tensor, context: Optional[torch.Tensor]) -> bool:
        return (context is not None and cpu_inference(x) and not x.shape[0] % 2
                and context.shape[0] == x.shape[0]
                and any(isinstance(layer, SpatialTransformer) for block in self.input_blocks for layer in block))

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: Optional[torch.Tensor] = None,
                y: Optional[torch.Tensor] = None, guided_pair: bool = False, **kwargs) -> torch.Tensor:
        if guided_pair and self._shares_prefix(x, context):
            half = x.shape[0] // 2
            x, y = x[:half], None if y is None else y[:half]
            timesteps = timesteps if timesteps.ndim == 0 else timesteps[:half]
        emb = self.time_embedding(timesteps, x.shape[0], y)
        h, context = self.inputs_in_weight_dtype(x, context)
        h = h.contiguous(memory_format=torch.channels_last)
        skips = []
        for module in self.input_blocks:
            h = module(h, emb, context)
            if h.shape[0] != emb.shape[0]:  # the first transformer spread the shared rows over the contexts
                emb, skips = spread_rows(emb, h.shape[0]), [spread_rows(skip, h.shape[0]) for skip in skips]
            skips.append(h)
        h = self.middle_block(h, emb, context)
        for module in self.output_blocks:
            h = module(torch.cat([h, skips.pop()], dim=1), emb, context)
        return self.out(h).to(dtype=x.dtype, memory_format=torch.contiguous_format)
