"""How much of a large CPU intermediate to compute at once.

glibc serves blocks of 32 MiB and more (its largest mmap threshold) as fresh mappings, whose pages the kernel
faults in and zeroes on every call; intermediates under CHUNK_BYTES come from the heap and are reused. Working
a band of rows (or tokens) at a time also bounds the memory a large feature map adds at its peak.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import sys
from typing import Callable, Optional

CHUNK_BYTES = 16 << 20


def rows_per_chunk(bytes_per_row: int) -> int:
    """How many rows of `bytes_per_row` bytes of intermediates fit in one chunk (at least one)."""
    return max(1, CHUNK_BYTES // max(1, bytes_per_row))


@functools.cache
def _malloc_trim() -> Optional[Callable[[int], int]]:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def release_freed_memory() -> None:
    """Hand the heap memory that freed intermediates left behind back to the system (glibc's `malloc_trim`;
    nothing elsewhere). Between the autoencoder decoder's levels this is 70-150 MiB of the process's peak,
    for about 10 ms per call."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)
