"""The text-conditioned transformer of the latent diffusion UNet (Rombach et al. 2022, sec. 3.3).

Attention runs through `scaled_dot_product_attention`, which never materialises the
[tokens x tokens] attention matrix when a fused kernel is available. Feature maps may be
channels-last: then the pixels-as-tokens view is free (no copy) in both directions.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.modules.diffusionmodules import chunks
from ldm.modules.diffusionmodules.util import Conv2d, GroupNorm32, Linear, checkpoint, emulated_bf16, zero_module


def Normalize(in_channels: int) -> nn.GroupNorm:
    """GroupNorm with 32 groups and eps 1e-6, computed in float32."""
    return GroupNorm32(num_groups=32, num_channels=in_channels, eps=1e-6, affine=True)


class GEGLU(nn.Module):
    """Gated GELU projection (Shazeer 2020, "GLU Variants Improve Transformer")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    """The transformer's position-wise feed-forward layer (Vaswani et al. 2017), gated by GEGLU when `glu`.

    On the CPU, tokens go through in chunks whose widest intermediate stays under `chunks.CHUNK_BYTES`
    (unchunked, the layers allocated about 1 GB of freshly mapped memory per 512x512 UNet step). Each token's
    output is the same.
    """

    def __init__(self, dim: int, dim_out: Optional[int] = None, mult: int = 4, glu: bool = False,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = int(dim * mult)
        dim_out = dim_out or dim
        project_in = GEGLU(dim, inner_dim) if glu else nn.Sequential(Linear(dim, inner_dim), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), Linear(inner_dim, dim_out))
        self.widest = 2 * inner_dim if glu else inner_dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = chunks.rows_per_chunk(self.widest * x.element_size())
        if x.device.type != "cpu" or torch.compiler.is_compiling() or x.shape[:-1].numel() <= rows:
            return self.net(x)
        tokens = x.reshape(-1, x.shape[-1])
        return torch.cat([self.net(part) for part in tokens.split(rows)]).view(*x.shape[:-1], -1)


# On the CPU, float32 attention over at least this many keys pads heads whose width is not a multiple of
# HEAD_WIDTH_MULTIPLE with zeros up to one: the flash kernel's matrix products run 4-5 % faster on such widths (the
# UNet's 4096-token self-attention, heads of 40), and the zeros add nothing to any dot product (the results were
# bit-identical on AVX-512). Over fewer keys (the 77 text tokens) the copies cost more than they save.
HEAD_PADDING_MIN_KEYS = 1024
HEAD_WIDTH_MULTIPLE = 16


def multi_head_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """softmax(q k^T / sqrt(d)) v over `heads` heads; inputs and output are [batch, tokens, heads*d]."""
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
    `UNetModel._guided_pair`), spread over them."""
    return x if x.shape[0] == rows else torch.cat([x] * (rows // x.shape[0]))


class CrossAttention(nn.Module):
    """Multi-head attention of x on `context` (self-attention when no context is given)."""

    def __init__(self, query_dim: int, context_dim: Optional[int] = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner_dim = dim_head * heads
        context_dim = context_dim or query_dim
        self.scale = dim_head ** -0.5
        self.heads = heads
        self.to_q = Linear(query_dim, inner_dim, bias=False)
        self.to_k = Linear(context_dim, inner_dim, bias=False)
        self.to_v = Linear(context_dim, inner_dim, bias=False)
        self.to_out = nn.Sequential(Linear(inner_dim, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if mask is not None:
            raise NotImplementedError("attention masks are not used by any latent diffusion model")
        context = x if context is None else context.to(x.dtype)
        out = multi_head_attention(self.to_q(x), self.to_k(context), self.to_v(context), self.heads)
        return self.to_out(out)


class BasicTransformerBlock(nn.Module):
    """Self-attention, cross-attention on the text, GEGLU feed-forward; pre-norm with residuals."""

    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: Optional[int] = None,
                 gated_ff: bool = True, checkpoint: bool = True):
        super().__init__()
        self.attn1 = CrossAttention(query_dim=dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=gated_ff)
        self.attn2 = CrossAttention(query_dim=dim, context_dim=context_dim, heads=n_heads, dim_head=d_head,
                                    dropout=dropout)
        self.norm1 = nn.LayerNorm(dim)
        self.norm2 = nn.LayerNorm(dim)
        self.norm3 = nn.LayerNorm(dim)
        self.checkpoint = checkpoint

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        return checkpoint(self._forward, (x, context), self.parameters(), self.checkpoint)

    def _forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        if context is not None and context.shape[0] > x.shape[0] and context.shape[0] % x.shape[0] == 0:
            x = spread_rows(x, context.shape[0])
        x = self.attn2(self.norm2(x), context=context) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """Transformer over the pixels of a feature map: norm, 1x1 projection in, blocks, 1x1 projection out, residual."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: Optional[int] = None, use_checkpoint: bool = True):
        super().__init__()
        self.in_channels = in_channels
        inner_dim = n_heads * d_head
        self.norm = Normalize(in_channels)
        self.proj_in = Conv2d(in_channels, inner_dim, kernel_size=1)
        self.transformer_blocks = nn.ModuleList(
            BasicTransformerBlock(inner_dim, n_heads, d_head, dropout=dropout, context_dim=context_dim,
                                  checkpoint=use_checkpoint)
            for _ in range(depth)
        )
        self.proj_out = zero_module(Conv2d(inner_dim, in_channels, kernel_size=1))

    def forward(self, x: torch.Tensor, context: Optional[torch.Tensor] = None) -> torch.Tensor:
        h, w = x.shape[-2:]
        x_in = x
        x = self.proj_in(self.norm(x))
        x = x.flatten(2).transpose(1, 2)
        for block in self.transformer_blocks:
            x = block(x, context=context)
        x = x.transpose(1, 2).unflatten(2, (h, w))  # a channels-last view
        if not x_in.is_contiguous(memory_format=torch.channels_last):
            x = x.contiguous()  # keep a contiguous network contiguous (mixed layouts make oneDNN copy weights)
        return self.proj_out(x) + spread_rows(x_in, x.shape[0])
