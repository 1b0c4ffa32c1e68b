"""Vector quantisation of a latent map onto a learned codebook (van den Oord et al. 2017, "Neural Discrete
Representation Learning", eqs. 1-3; the codebook layer of VQGAN, Esser et al. 2021, eq. 4), as the VQ first
stages of latent diffusion use it (Rombach et al. 2022, sec. 3.1).

Names (`VectorQuantizer2`, `n_e`, `e_dim`, `beta`, `legacy`, the `embedding` parameter) follow
taming-transformers' `taming.modules.vqvae.quantize.VectorQuantizer2`, so its checkpoints load unchanged.
"""
from __future__ import annotations

from typing import Optional, Sequence

import torch
from torch import nn


class VectorQuantizer2(nn.Module):
    """z [B, e_dim, H, W] -> its nearest codebook entries z_q (straight-through gradient), the codebook and
    commitment loss, and (None, None, indices), the tuple layout of the original.

    `legacy=True` (the original's default) keeps the original's weighting, which puts `beta` on the codebook
    term instead of the commitment term of van den Oord et al. eq. 3; `legacy=False` weights as the paper.
    Index remapping (`remap`, a .npy of used codes) is not supported and is refused.
    """

    def __init__(self, n_e: int, e_dim: int, beta: float, remap: Optional[str] = None,
                 unknown_index: str | int = "random", sane_index_shape: bool = False, legacy: bool = True):
        super().__init__()
        if remap is not None:
            raise ValueError(f"VectorQuantizer2(remap={remap!r}): remapping codebook indices is not supported; "
                             "remove 'remap' from the first stage's params")
        self.n_e = n_e
        self.e_dim = e_dim
        self.beta = beta
        self.legacy = legacy
        self.remap = None
        self.unknown_index = unknown_index
        self.re_embed = n_e
        self.sane_index_shape = sane_index_shape
        self.embedding = nn.Embedding(n_e, e_dim)
        with torch.no_grad():
            nn.init.uniform_(self.embedding.weight, -1.0 / n_e, 1.0 / n_e)

    def nearest_indices(self, z_flat: torch.Tensor) -> torch.Tensor:
        """argmin_j |z_i - e_j|^2 for each row z_i of `z_flat` [N, e_dim], through |z|^2 + |e|^2 - 2 z.e (the
        original's expansion, which needs no [N, n_e, e_dim] difference tensor)."""
        codebook = self.embedding.weight
        distances = (z_flat.pow(2).sum(dim=1, keepdim=True) + codebook.pow(2).sum(dim=1)
                     - 2.0 * z_flat @ codebook.t())
        return distances.argmin(dim=1)

    def forward(self, z: torch.Tensor, temp: Optional[float] = None, rescale_logits: bool = False,
                return_logits: bool = False) -> tuple[torch.Tensor, torch.Tensor, tuple]:
        if (temp is not None and temp != 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits are for a Gumbel quantiser's interface; "
                             "VectorQuantizer2 takes none of them")
        z = z.permute(0, 2, 3, 1).contiguous()
        indices = self.nearest_indices(z.reshape(-1, self.e_dim))
        z_q = self.embedding(indices).view(z.shape)
        codebook_term = torch.mean((z_q - z.detach()) ** 2)
        commitment_term = torch.mean((z_q.detach() - z) ** 2)
        if self.legacy:
            loss = commitment_term + self.beta * codebook_term
        else:
            loss = self.beta * commitment_term + codebook_term
        z_q = z + (z_q - z).detach()  # straight-through estimator (van den Oord et al. 2017, sec. 3.1)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()
        if self.sane_index_shape:
            indices = indices.reshape(z_q.shape[0], z_q.shape[2], z_q.shape[3])
        return z_q, loss, (None, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: Optional[Sequence[int]]) -> torch.Tensor:
        """The codebook vectors of `indices`; with `shape` (batch, height, width, channel) as a [B, C, H, W] map."""
        z_q = self.embedding(indices)
        if shape is not None:
            z_q = z_q.view(*shape).permute(0, 3, 1, 2).contiguous()
        return z_q


VectorQuantizer = VectorQuantizer2
