"""Decoding a large latent in overlapping tiles, so that memory stays that of one tile's decode.

Each tile of `tile_size` latent pixels is decoded on its own; neighbouring tiles overlap by `overlap`
latent pixels and are cross-faded there with linear weights, so no seam shows. A tile's decoder sees
only its own tile (its GroupNorm statistics and mid-block attention are the tile's), so the result is
close to, not equal to, the whole-image decode; with one tile covering the latent it is the plain decode.
"""
from __future__ import annotations

import math
from typing import Callable

import torch


def tile_layout(length: int, tile: int, overlap: int) -> tuple[list[int], int]:
    """(start offsets, tile length) of the fewest tiles of at most `tile` pixels that cover [0, length) with
    at least `overlap` pixels shared by neighbours. All tiles have one length and are spread evenly, so none
    is a thin sliver (which would normalise over too few pixels) and no pixel is decoded more often than
    needed."""
    if length <= tile:
        return [0], length
    count = math.ceil((length - overlap) / (tile - overlap))
    size = math.ceil((length + (count - 1) * overlap) / count)
    return [i * (length - size) // (count - 1) for i in range(count)], size


def _ramp(length: int, fade: int, fade_start: bool, fade_end: bool) -> torch.Tensor:
    """1 in the middle, rising linearly over `fade` pixels at the ends that meet a neighbouring tile."""
    weight = torch.ones(length)
    ramp = (torch.arange(fade, dtype=torch.float32) + 0.5) / fade
    if fade_start:
        weight[:fade] = ramp
    if fade_end:
        weight[length - fade:] = ramp.flip(0)
    return weight


@torch.no_grad()
def tiled_decode(decode: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor, tile_size: int = 64,
                 overlap: int = 16) -> torch.Tensor:
    """`decode(z)` for a latent z [B, C, h, w], tile by tile (tiles of `tile_size`, sharing `overlap` pixels).

    `decode` maps a latent tile to its image tile (a fixed upscaling factor, e.g. 8); the tiles (see
    `tile_layout`) are cross-faded linearly over `overlap` pixels where they meet.
    """
    if not 0 < overlap < tile_size:
        raise ValueError(f"the overlap ({overlap}) must be positive and smaller than the tile size ({tile_size})")
    height, width = z.shape[-2:]
    (rows, tile_height), (cols, tile_width) = (tile_layout(height, tile_size, overlap),
                                               tile_layout(width, tile_size, overlap))
    if len(rows) == len(cols) == 1:
        return decode(z)
    out = weights = None
    for top in rows:
        for left in cols:
            tile = decode(z[..., top:top + tile_height, left:left + tile_width])
            scale = tile.shape[-1] // tile_width
            if out is None:
                out = tile.new_zeros(*tile.shape[:2], height * scale, width * scale)
                weights = tile.new_zeros(height * scale, width * scale)
            th, tw = tile.shape[-2:]
            fade = overlap * scale
            weight = torch.outer(_ramp(th, fade, top > 0, top + tile_height < height),
                                 _ramp(tw, fade, left > 0, left + tile_width < width)).to(tile)
            y, x = top * scale, left * scale
            out[..., y:y + th, x:x + tw] += tile * weight
            weights[y:y + th, x:x + tw] += weight
    return out / weights
