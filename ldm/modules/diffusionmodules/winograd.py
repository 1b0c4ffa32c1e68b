"""3x3 convolutions by Winograd's minimal filtering (Lavin & Gray 2016, arXiv:1509.09308).

F(m x m, 3 x 3) computes each m x m output tile from an (m+2) x (m+2) input tile d and the kernel g as
Y = A^T [(G g G^T) * (B^T d B)] A (their eq. 8). Summed over input channels, the elementwise products become
(m+2)^2 matrix products [tiles x in] @ [in x out], so a convolution costs (m+2)^2 / (9 m^2) of the direct
multiply-adds: 16/36 for m = 2 and 36/144 for m = 4. The transforms are a few additions per value.
The matrices are those of the paper (interpolation points 0, +-1 for m = 2 and 0, +-1, +-2 for m = 4).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import torch

from ldm.modules.diffusionmodules import chunks

_MATRICES = {
    2: dict(BT=[[1, 0, -1, 0], [0, 1, 1, 0], [0, -1, 1, 0], [0, 1, 0, -1]],
            G=[[1, 0, 0], [1 / 2, 1 / 2, 1 / 2], [1 / 2, -1 / 2, 1 / 2], [0, 0, 1]],
            AT=[[1, 1, 1, 0], [0, 1, -1, -1]]),
    4: dict(BT=[[4, 0, -5, 0, 1, 0], [0, -4, -4, 1, 1, 0], [0, 4, -4, -1, 1, 0],
                [0, -2, -1, 2, 1, 0], [0, 2, -1, -2, 1, 0], [0, 4, 0, -5, 0, 1]],
            G=[[1 / 4, 0, 0], [-1 / 6, -1 / 6, -1 / 6], [-1 / 6, 1 / 6, -1 / 6],
               [1 / 24, 1 / 12, 1 / 6], [1 / 24, -1 / 12, 1 / 6], [0, 0, 1]],
            AT=[[1, 1, 1, 1, 1, 0], [0, 1, -1, 2, -2, 0], [0, 1, 1, 4, 4, 0], [0, 1, -1, 8, -8, 1]]),
}
TILE_SIZES = tuple(_MATRICES)

Terms = Sequence[Sequence[tuple[int, float]]]


@functools.cache
def _nonzero_terms(tile: int, name: str) -> Terms:
    """The nonzero entries of each row of one of the tile's matrices, as (column, value) pairs."""
    return tuple(tuple((j, float(c)) for j, c in enumerate(row) if c) for row in _MATRICES[tile][name])


@functools.cache
def _kernel_transform(tile: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """G (x) G, which maps a flattened 3x3 kernel to its flattened (m+2)x(m+2) transform G g G^T."""
    g = torch.tensor(_MATRICES[tile]["G"], dtype=torch.float64)
    return torch.kron(g, g).to(dtype=dtype, device=device)


def _combine(terms: Terms, parts: Sequence[torch.Tensor], outs: Sequence[torch.Tensor]) -> None:
    """outs[i] = sum_j matrix[i][j] * parts[j], over the matrix's nonzero entries only."""
    for row, out in zip(terms, outs):
        (first, coefficient), rest = row[0], row[1:]
        if coefficient == 1:
            out.copy_(parts[first])
        else:
            torch.mul(parts[first], coefficient, out=out)
        for j, c in rest:
            out.add_(parts[j], alpha=c)


def transform_kernel(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """[out, in, 3, 3] kernels -> [(m+2)^2, out, in], the G g G^T of every channel pair."""
    out_channels, in_channels = weight.shape[:2]
    flat = weight.reshape(out_channels * in_channels, 9)
    return torch.mm(_kernel_transform(tile, weight.dtype, weight.device), flat.t()).view(-1, out_channels,
                                                                                        in_channels)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     tile: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for 3x3 kernels through F(tile x tile, 3x3); channels-last output."""
    size = tile + 2
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    b_terms, a_terms = _nonzero_terms(tile, "BT"), _nonzero_terms(tile, "AT")
    kernels = transform_kernel(weight, tile).transpose(1, 2)  # [(m+2)^2, in, out]
    tile_rows, tile_cols = -(-height // tile), -(-width // tile)
    pixels = x.permute(0, 2, 3, 1)
    out = x.new_empty(batch, tile_rows, tile, tile_cols, tile, out_channels)
    bytes_per_row = size * size * tile_cols * max(in_channels, out_channels) * x.element_size()
    rows_per_chunk = chunks.rows_per_chunk(bytes_per_row)
    for image in range(batch):
        for first in range(0, tile_rows, rows_per_chunk):
            rows = min(rows_per_chunk, tile_rows - first)
            # The chunk's input rows with the zero padding, padded here rather than copying the whole map.
            band = x.new_zeros(tile * rows + 2, tile * tile_cols + 2, in_channels)
            top = tile * first - 1
            inside = slice(max(top, 0), min(top + band.shape[0], height))
            band[inside.start - top:inside.stop - top, 1:width + 1] = pixels[image, inside]
            # B^T d B: rows first, then columns, each as sparse combinations of strided views.
            row_mixed = x.new_empty(size, rows, band.shape[1], in_channels)
            _combine(b_terms, [band[j:j + tile * rows:tile] for j in range(size)], row_mixed)
            transformed = x.new_empty(size, size, rows, tile_cols, in_channels)
            for i in range(size):
                _combine(b_terms, [row_mixed[i][:, j:j + tile * tile_cols:tile] for j in range(size)],
                         transformed[i])
            products = torch.bmm(transformed.view(size * size, rows * tile_cols, in_channels), kernels)
            products = products.view(size, size, rows, tile_cols, out_channels)
            # A^T M A, written straight into the output tiles.
            row_reduced = x.new_empty(tile, size, rows, tile_cols, out_channels)
            _combine(a_terms, products, row_reduced)
            target = out[image, first:first + rows]
            for i in range(tile):
                _combine(a_terms, row_reduced[i], [target[:, i, :, j] for j in range(tile)])
            if bias is not None:
                target.add_(bias)
    out = out.view(batch, tile * tile_rows, tile * tile_cols, out_channels)
    if out.shape[1:3] != (height, width):
        out = out[:, :height, :width].contiguous()
    return out.permute(0, 3, 1, 2)
