"""3x3 convolutions by Winograd's minimal filtering (Lavin & Gray 2016, arXiv:1509.09308).

F(m x m, 3 x 3) computes each m x m output tile from an (m+2) x (m+2) input tile d and the kernel g as
Y = A^T [(G g G^T) * (B^T d B)] A (their eq. 8). Summed over input channels, the elementwise products become
(m+2)^2 matrix products [tiles x in] @ [in x out], so a convolution costs (m+2)^2 / (9 m^2) of the direct
multiply-adds: 16/36 for m = 2 and 36/144 for m = 4. The transforms are small matrix products over all tiles.
The matrices are those of the paper (interpolation points 0, +-1 for m = 2 and 0, +-1, +-2 for m = 4).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch

from ldm.accel import chunks

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


@functools.cache
def _transforms(tile: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
    """G (x) G, B^T (x) B^T and A^T (x) A^T: with tiles flattened row-major, vec(M d M^T) = (M (x) M) vec(d),
    so each two-sided transform of every tile at once is one matrix product."""
    def kron_square(name: str) -> torch.Tensor:
        matrix = torch.tensor(_MATRICES[tile][name], dtype=torch.float64)
        return torch.kron(matrix, matrix).to(dtype=dtype, device=device)

    return kron_square("G"), kron_square("BT"), kron_square("AT")


def transform_kernel(weight: torch.Tensor, tile: int) -> torch.Tensor:
    """[out, in, 3, 3] kernels -> [(m+2)^2, in, out], the G g G^T of every channel pair, reading the kernels in
    the layout they have (contiguous or channels-last) without copying them."""
    out_channels, in_channels = weight.shape[:2]
    kernel_transform = _transforms(tile, weight.dtype, weight.device)[0]
    if weight.is_contiguous():
        taps = weight.view(out_channels * in_channels, 9)
        return torch.mm(kernel_transform, taps.t()).view(-1, out_channels, in_channels).transpose(1, 2)
    taps = weight.permute(0, 2, 3, 1).reshape(out_channels, 9, in_channels)
    return torch.matmul(kernel_transform, taps).permute(1, 2, 0)


def _chunks(batch: int, tile_rows: int, rows_per_chunk: int) -> list[tuple[slice, int, int]]:
    """(images, first tile row, tile rows) of each chunk: whole images together where they fit (larger matrix
    products), else bands of one image's rows."""
    if rows_per_chunk >= tile_rows:
        images = rows_per_chunk // tile_rows
        return [(slice(first, first + images), 0, tile_rows) for first in range(0, batch, images)]
    return [(slice(image, image + 1), first, min(rows_per_chunk, tile_rows - first))
            for image in range(batch) for first in range(0, tile_rows, rows_per_chunk)]


def _gathered_tiles(pixels: torch.Tensor, first: int, rows: int, tile: int, tile_cols: int) -> torch.Tensor:
    """[(m+2)^2, images * rows * tile_cols * in]: the (m+2) x (m+2) input tiles of `rows` tile rows from tile row
    `first` of channels-last `pixels` [images, height, width, in], zero padding included."""
    size = tile + 2
    images, height, width, in_channels = pixels.shape
    # The chunk's input rows with the zero padding, padded here rather than copying the whole map.
    band = pixels.new_zeros(images, tile * rows + 2, tile * tile_cols + 2, in_channels)
    top = tile * first - 1
    inside = slice(max(top, 0), min(top + band.shape[1], height))
    band[:, inside.start - top:inside.stop - top, 1:width + 1] = pixels[:, inside]
    image_stride, row_stride = band.stride(0), band.stride(1)
    tiles = band.as_strided((size, size, images, rows, tile_cols, in_channels),
                            (row_stride, in_channels, image_stride, tile * row_stride, tile * in_channels, 1))
    return tiles.reshape(size * size, -1)


def _output_blocks(out_channels: int, bytes_per_channel: int) -> list[slice]:
    """Ranges of output channels whose transformed kernels and products stay under `chunks.CHUNK_BYTES`: the
    widest multiple of 16 that divides the channels evenly, else an even split."""
    widest = chunks.rows_per_chunk(bytes_per_channel)
    even = [width for width in range(16, min(widest, out_channels) + 1, 16) if out_channels % width == 0]
    width = even[-1] if even else -(-out_channels // -(-out_channels // widest))
    return [slice(first, min(first + width, out_channels)) for first in range(0, out_channels, width)]


def _transformed_tiles(pixels: torch.Tensor, part: tuple[slice, int, int], tile: int, tile_cols: int,
                       input_transform: torch.Tensor) -> torch.Tensor:
    """[(m+2)^2, tiles, in]: B^T d B of every input tile of one chunk."""
    images, first, rows = part
    gathered = _gathered_tiles(pixels[images], first, rows, tile, tile_cols)
    return torch.mm(input_transform, gathered).view(input_transform.shape[0], -1, pixels.shape[-1])


def _write_outputs(out: torch.Tensor, part: tuple[slice, int, int], products: torch.Tensor,
                   output_transform: torch.Tensor, bias: Optional[torch.Tensor], block: slice) -> None:
    """A^T [U * V] A (+ bias) of one chunk's tiles into output channels `block` of `out` [batch, tile rows, m,
    tile cols, m, out]; `products` [(m+2)^2, tiles, block width] holds the products U * V of those channels."""
    images, first, rows = part
    tile, tile_cols = out.shape[2], out.shape[3]
    results = torch.mm(output_transform, products.view(products.shape[0], -1))
    results = results.view(tile, tile, -1, rows, tile_cols, products.shape[-1]).permute(2, 3, 0, 4, 1, 5)
    target = out[images, first:first + rows, :, :, :, block]
    if bias is None:
        target.copy_(results)
    else:
        torch.add(results, bias[block], out=target)


def winograd_conv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                     tile: int) -> torch.Tensor:
    """F.conv2d(x, weight, bias, padding=1) for 3x3 kernels through F(tile x tile, 3x3); channels-last output.

    The (m+2) x (m+2) input tiles of a chunk of tile rows are gathered (overlapping by two pixels) into
    [(m+2)^2, tiles * in], transformed by one product with B^T (x) B^T, multiplied by the transformed kernels as
    (m+2)^2 matrix products, transformed back by one product with A^T (x) A^T and written into the output tiles.

    No intermediate outgrows `chunks.CHUNK_BYTES` where that costs no extra memory: when the transformed input
    tiles of all chunks together take no more room than the transformed kernels, they are kept, and the kernels
    are transformed and applied one block of output channels at a time. (The transformed kernels of a wide
    layer, 105 MB for 1280 channels, would be fresh memory on every call, and the page faults of fresh memory
    cost as much time again as the transform.) Otherwise, on large maps, the kernels are transformed once and
    each chunk's intermediates are freed as soon as the next one exists (they are the autoencoder decoder's
    peak)."""
    size = tile + 2
    batch, in_channels, height, width = x.shape
    out_channels = weight.shape[0]
    _, input_transform, output_transform = _transforms(tile, x.dtype, x.device)
    tile_rows, tile_cols = -(-height // tile), -(-width // tile)
    pixels = x.permute(0, 2, 3, 1)
    out = x.new_empty(batch, tile_rows, tile, tile_cols, tile, out_channels)
    tile_bytes = size * size * x.element_size()
    if batch * tile_rows * tile_cols <= max(out_channels, chunks.rows_per_chunk(tile_bytes * in_channels)):
        parts = _chunks(batch, tile_rows, chunks.rows_per_chunk(tile_bytes * tile_cols * in_channels))
        inputs = [(part, _transformed_tiles(pixels, part, tile, tile_cols, input_transform)) for part in parts]
        most_tiles = max(transformed.shape[1] for _, transformed in inputs)
        for block in _output_blocks(out_channels, tile_bytes * max(in_channels, most_tiles)):
            kernels = transform_kernel(weight[block], tile)
            for part, transformed in inputs:
                _write_outputs(out, part, torch.bmm(transformed, kernels), output_transform, bias, block)
    else:
        kernels = transform_kernel(weight, tile)  # [(m+2)^2, in, out]
        bytes_per_row = tile_bytes * tile_cols * max(in_channels, out_channels)
        for part in _chunks(batch, tile_rows, chunks.rows_per_chunk(bytes_per_row)):
            products = torch.bmm(_transformed_tiles(pixels, part, tile, tile_cols, input_transform), kernels)
            _write_outputs(out, part, products, output_transform, bias, slice(0, out_channels))
            del products
    out = out.view(batch, tile * tile_rows, tile * tile_cols, out_channels)
    if out.shape[1:3] != (height, width):
        out = out[:, :height, :width].contiguous()
    return out.permute(0, 3, 1, 2)
