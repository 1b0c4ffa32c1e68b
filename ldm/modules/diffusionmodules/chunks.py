"""How much of a large CPU intermediate to compute at once.

glibc serves blocks of 32 MiB and more (its largest mmap threshold) as fresh mappings, whose pages the kernel
faults in and zeroes on every call; intermediates under CHUNK_BYTES come from the heap and are reused. Working
a band of rows (or tokens) at a time also bounds the memory a large feature map adds at its peak.
"""
from __future__ import annotations

CHUNK_BYTES = 16 << 20


def rows_per_chunk(bytes_per_row: int) -> int:
    """How many rows of `bytes_per_row` bytes of intermediates fit in one chunk (at least one)."""
    return max(1, CHUNK_BYTES // max(1, bytes_per_row))
