"""GroupNorm, swish and a 3x3 convolution over a large feature map, a band of rows at a time.

conv(silu(groupnorm(x))) needs the normalised map only a band (and a row above and below it) at a time: the
group statistics come first from the whole map, then each band is normalised, passed through swish and
convolved into its rows of the output. At the 512x512 end of the autoencoder's decoder this keeps a
full-resolution map (256 MiB at 256 channels) out of the decode's peak memory. CPU inference only.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from ldm.accel import chunks


def channel_var_mean(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each channel's variance and mean over the pixels of a map, [batch, channels] each (channels-last maps are
    read in place, others copied).

    Sums of the values shifted by the channel's first value (against cancellation), a band of pixels at a time:
    reducing the map over its outer dimensions directly is ten times slower."""
    batch, channels, height, width = x.shape
    pixels = x.permute(0, 2, 3, 1).reshape(batch, height * width, channels)
    shift = pixels[:, 0]
    sum1 = torch.zeros(batch, channels, dtype=torch.float64, device=x.device)
    sum2 = torch.zeros_like(sum1)
    for part in pixels.split(chunks.rows_per_chunk(batch * channels * x.element_size()), dim=1):
        centred = part - shift[:, None]
        sum1 += centred.sum(1)
        sum2 += centred.square_().sum(1)
    mean = sum1 / pixels.shape[1]
    var = (sum2 / pixels.shape[1] - mean.square()).clamp_(min=0)
    return var.to(x.dtype), (mean + shift).to(x.dtype)


def group_norm_affine(norm: nn.GroupNorm, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image and channel, scale and shift with norm(x) = scale * x + shift (Wu & He 2018, eq. 1 and 2).

    The group's mean and variance come from its channels' by the parallel-variance formula (the channels of a
    group have equally many values)."""
    batch, channels = x.shape[:2]
    var, mean = (t.view(batch, norm.num_groups, -1) for t in channel_var_mean(x))
    group_mean = mean.mean(-1, keepdim=True)
    group_var = (var + (mean - group_mean).square()).mean(-1, keepdim=True)
    rstd = (group_var + norm.eps).rsqrt()
    scale = rstd.expand_as(mean).reshape(batch, channels)
    shift = -(group_mean * rstd).expand_as(mean).reshape(batch, channels)
    if norm.affine:
        scale, shift = scale * norm.weight, shift * norm.weight + norm.bias
    return scale, shift


def banded_norm_swish_conv3x3(norm: nn.GroupNorm, conv: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """conv(silu(norm(x))) for a 3x3 convolution with stride 1 and padding 1; channels-last output."""
    batch, channels, height, width = x.shape
    scale, shift = (t[:, :, None, None] for t in group_norm_affine(norm, x))
    out = torch.empty(batch, conv.out_channels, height, width, dtype=x.dtype, device=x.device,
                      memory_format=torch.channels_last)
    band = chunks.rows_per_chunk(batch * channels * width * x.element_size())
    for top in range(0, height, band):
        rows = min(band, height - top)
        first, last = max(top - 1, 0), min(top + rows + 1, height)
        part = F.silu(torch.addcmul(shift, x[:, :, first:last], scale), inplace=True)
        out[:, :, top:top + rows] = conv(part)[:, :, top - first:top - first + rows]
    return out


def _bandable(norm: nn.Module, conv: nn.Module, x: torch.Tensor, dropout: Optional[nn.Module]) -> bool:
    return (not torch.is_grad_enabled() and x.device.type == "cpu" and x.ndim == 4 and x.dtype == torch.float32
            and x.is_contiguous(memory_format=torch.channels_last)
            and not torch.compiler.is_compiling() and not torch.is_autocast_enabled("cpu")
            and isinstance(norm, nn.GroupNorm)
            and isinstance(conv, nn.Conv2d) and conv.kernel_size == (3, 3) and conv.stride == (1, 1)
            and conv.padding == (1, 1) and conv.dilation == (1, 1) and conv.groups == 1
            and (dropout is None or not dropout.training or dropout.p == 0)
            and x.numel() * x.element_size() > chunks.CHUNK_BYTES)


def norm_swish_conv(norm: nn.Module, conv: nn.Module, x: torch.Tensor,
                    dropout: Optional[nn.Module] = None) -> torch.Tensor:
    """conv(dropout(silu(norm(x)))): banded for large CPU maps where autograd records nothing; elsewhere the
    plain layers (swish in place where autograd records nothing)."""
    if _bandable(norm, conv, x, dropout):
        return banded_norm_swish_conv3x3(norm, conv, x)
    h = F.silu(norm(x), inplace=not torch.is_grad_enabled())
    return conv(h if dropout is None else dropout(h))
