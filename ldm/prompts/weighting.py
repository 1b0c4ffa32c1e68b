"""Emphasis on the text encoder's output, the web UIs' way ("Original" emphasis of AUTOMATIC1111): every output
vector of a chunk is multiplied by its token's weight, then the chunk is rescaled so that its mean is the
unweighted chunk's mean again, z * (original_mean / new_mean).

The mean is taken per prompt (over one row's tokens and channels), so a prompt's conditioning does not depend on
the other prompts of its batch; AUTOMATIC1111 takes it over the whole batch, which is the same when the batch
repeats one prompt.
"""
from __future__ import annotations

import torch


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """`z` [B, N, C] with row b's vector n scaled by weights[b, n], each row's mean restored. Rows whose weights
    are all 1 come back unchanged (bit for bit)."""
    weighted_rows = (weights != 1).any(dim=1)
    if not weighted_rows.any():
        return z
    original = z.float()
    weighted = original * weights.to(original)[..., None]
    rescaled = weighted * (original.mean(dim=(1, 2), keepdim=True) / weighted.mean(dim=(1, 2), keepdim=True))
    return torch.where(weighted_rows[:, None, None].to(z.device), rescaled.to(z.dtype), z)
