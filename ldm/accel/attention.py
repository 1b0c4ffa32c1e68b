"""Fast CPU attention and feed-forward for the UNet's transformer blocks (ldm.modules.attention)."""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F

from ldm.accel import chunks
from ldm.accel.cpu import emulated_bf16
from ldm.modules.attention import BasicTransformerBlock, CrossAttention, FeedForward, GEGLU, SpatialTransformer

# On the CPU, float32 attention over at least this many keys pads heads whose width is not a multiple of
# HEAD_WIDTH_MULTIPLE with zeros up to one: the flash kernel's matrix products run faster on such widths (the
# UNet's 4096-token self-attention, heads of 40), and the zeros add nothing to any dot product. Over fewer keys
# (the 77 text tokens) the copies cost more than they save. Measurements: docs/benchmarks.md.
HEAD_PADDING_MIN_KEYS = 1024
HEAD_WIDTH_MULTIPLE = 16


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """`ldm.modules.attention.multi_head_attention`, with the CPU's fast variants: bfloat16 computed in float32
    where the CPU only emulates bf16, float32 heads padded to a multiple of HEAD_WIDTH_MULTIPLE over many keys."""
    batch, _, inner = q.shape
    dim_head = inner // heads
    q, k, v = (t.unflatten(-1, (heads, dim_head)).transpose(1, 2) for t in (q, k, v))
    if emulated_bf16(q):
        with torch.autocast("cpu", enabled=False):
            out = F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(torch.bfloat16)
    elif (q.device.type == "cpu" and q.dtype == torch.float32 and k.shape[2] >= HEAD_PADDING_MIN_KEYS
          and dim_head % HEAD_WIDTH_MULTIPLE and not torch.compiler.is_compiling()
          and not (torch.is_grad_enabled() and q.requires_grad)):
        padding = (0, -dim_head % HEAD_WIDTH_MULTIPLE)
        q, k, v = (F.pad(t, padding) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=dim_head ** -0.5)[..., :dim_head]
    else:
        out = F.scaled_dot_product_attention(q, k, v)
    return out.transpose(1, 2).reshape(batch, -1, inner)


def spread_rows(x: torch.Tensor, rows: int) -> torch.Tensor:
    """`x` repeated along the batch to `rows` rows: the rows that the contexts of a guided step share (see
    `FastUNetModel`), spread over them."""
    return x if x.shape[0] == rows else torch.cat([x] * (rows // x.shape[0]))


class FastCrossAttention(CrossAttention):
    """`CrossAttention` through the fast `multi_head_attention`."""

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("attention masks are not used by any latent diffusion model")
        context = x if context is None else context.to(x.dtype)
        return self.to_out(multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads))


class FastFeedForward(FeedForward):
    """`FeedForward` whose tokens go through in chunks on the CPU, so that its widest intermediate stays under
    `chunks.CHUNK_BYTES` (unchunked, the layers map fresh memory on every call). Each token's output is the same."""

    @property
    def widest(self) -> int:
        project_in = self.net[0]
        return project_in.proj.out_features if isinstance(project_in, GEGLU) else project_in[0].out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = chunks.rows_per_chunk(self.widest * x.element_size())
        if x.device.type != "cpu" or torch.compiler.is_compiling() or x.shape[:-1].numel() <= rows:
            return self.net(x)
        tokens = x.reshape(-1, x.shape[-1])
        return torch.cat([self.net(part) for part in tokens.split(rows)]).view(*x.shape[:-1], -1)


class FastBasicTransformerBlock(BasicTransformerBlock):
    """`BasicTransformerBlock` that, in a guided step whose shared rows ran once (`FastUNetModel`), spreads them
    over the contexts after self-attention, the last layer the two halves share."""

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if context is not None and context.shape[0] > x.shape[0] and context.shape[0] % x.shape[0] == 0:
            x = spread_rows(x, context.shape[0])
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class FastSpatialTransformer(SpatialTransformer):
    """`SpatialTransformer` that keeps a contiguous network contiguous (mixed layouts make oneDNN copy weights)
    and spreads its residual over the contexts with its blocks (`FastBasicTransformerBlock`)."""

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        h = self.transformed(x, context)  # a channels-last view when x is channels-last
        if not x.is_contiguous(memory_format=torch.channels_last):
            h = h.contiguous()
        return self.proj_out(h) + spread_rows(x, h.shape[0])
