"""The autoencoder's fast CPU forward: channels-last maps, the decoder's large maps a band of rows at a time,
residual sums in place, and freed heap memory handed back between the decoder's levels."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ldm.accel import chunks
from ldm.accel.banded import norm_swish_conv
from ldm.accel.conv import FastConv2d
from ldm.accel.cpu import emulated_bf16
from ldm.modules.diffusionmodules.model import AttnBlock, Decoder, Encoder, ResnetBlock, Upsample, nonlinearity


class FastResnetBlock(ResnetBlock):
    """`ResnetBlock` whose large CPU maps go through `norm_swish_conv` band by band where autograd records
    nothing, and whose residual sum overwrites the block's own output: a decode holds fewer full-resolution
    maps at once."""

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = norm_swish_conv(self.norm1, self.conv1, x)
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = norm_swish_conv(self.norm2, self.conv2, h, self.dropout)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        if torch.is_grad_enabled() or h.dtype != x.dtype:  # autocast: the sum takes the wider type, as x + h
            return x + h
        return h.add_(x)


class FastAttnBlock(AttnBlock):
    """`AttnBlock` whose bfloat16 attention runs in float32 on a CPU that only emulates bf16."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        if not emulated_bf16(h):
            return super().forward(x)
        b, c, height, width = h.shape
        q, k, v = (layer(h).flatten(2).transpose(1, 2)[:, None] for layer in (self.q, self.k, self.v))
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
        out = out[:, 0].transpose(1, 2).reshape(b, c, height, width)
        return x + self.proj_out(out)


class FastAEUpsample(Upsample):
    """The autoencoder's `Upsample`: its convolution reads the map before upsampling (`FastConv2d.upsampled`),
    and in CPU inference the heap memory freed by the level before goes back to the system first."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and not torch.is_grad_enabled():
            chunks.release_freed_memory()
        if self.with_conv and isinstance(self.conv, FastConv2d):
            return self.conv.upsampled(x)
        return super().forward(x)


class FastEncoder(Encoder):
    """`Encoder` on channels-last maps (faster convolutions, a free pixels-as-tokens view for attention)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.contiguous(memory_format=torch.channels_last)).contiguous()


class FastDecoder(Decoder):
    """`Decoder` on channels-last maps, whose last GroupNorm, swish and convolution run band by band."""

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.features(z.contiguous(memory_format=torch.channels_last))
        if self.give_pre_end:
            return h.contiguous()
        h = norm_swish_conv(self.norm_out, self.conv_out, h).contiguous()
        return torch.tanh(h) if self.tanh_out else h
