"""Reading a `.safetensors` file as memory-mapped tensors, checked against the format's rules.

The format (https://github.com/huggingface/safetensors) is an 8-byte little-endian header length, a JSON
header mapping each name to `dtype`, `shape` and `data_offsets` (begin, end relative to the data that follows
the header), then the raw little-endian data. One private (copy-on-write) mapping of the whole file serves
every tensor, so reading costs no copy and no per-tensor system call, and writing to a tensor never changes
the file.
"""
from __future__ import annotations

import json
import math
import os
import struct
import sys
from typing import Any, Optional

import torch

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
HEADER_LENGTH_BYTES = 8
METADATA_KEY = "__metadata__"


class SafetensorsFormatError(ValueError):
    """The file breaks the format's rules (truncated, corrupt header, overlapping or misdescribed tensors)."""


def read_header(path: str | os.PathLike) -> tuple[dict[str, Any], int, int]:
    """The JSON header, the offset of the data that follows it, and the file's size."""
    size = os.path.getsize(path)
    with open(path, "rb") as handle:
        raw_length = handle.read(HEADER_LENGTH_BYTES)
        if len(raw_length) < HEADER_LENGTH_BYTES:
            raise SafetensorsFormatError("the file is shorter than its header length field")
        header_length = struct.unpack("<Q", raw_length)[0]
        if header_length > size - HEADER_LENGTH_BYTES:
            raise SafetensorsFormatError("the file is truncated")
        try:
            header = json.loads(handle.read(header_length))
        except ValueError as error:
            raise SafetensorsFormatError("the header is corrupt") from error
    if not isinstance(header, dict):
        raise SafetensorsFormatError("the header is not a JSON object")
    return header, HEADER_LENGTH_BYTES + header_length, size


def _checked_entries(header: dict[str, Any], data_bytes: int
                     ) -> Optional[list[tuple[str, torch.dtype, list[int], int, int]]]:
    """(name, dtype, shape, begin, end) for every tensor, or None when some tensor has a dtype this reader does not
    map. Raises `SafetensorsFormatError` when the entries contradict each other or the file's size."""
    entries = []
    for name, entry in header.items():
        if name == METADATA_KEY:
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
        except (KeyError, TypeError, ValueError) as error:
            raise SafetensorsFormatError(f"the header entry of {name} is malformed") from error
        if dtype_name not in DTYPES:
            return None
        dtype = DTYPES[dtype_name]
        if not (isinstance(begin, int) and isinstance(end, int) and all(isinstance(d, int) and d >= 0 for d in shape)):
            raise SafetensorsFormatError(f"the header entry of {name} is malformed")
        if not 0 <= begin <= end <= data_bytes:
            raise SafetensorsFormatError("the file is truncated")
        if end - begin != math.prod(shape) * dtype.itemsize:
            raise SafetensorsFormatError(f"the size of {name} does not match its shape")
        entries.append((name, dtype, list(shape), begin, end))
    spans = sorted((begin, end) for *_, begin, end in entries)
    if any(later[0] < earlier[1] for earlier, later in zip(spans, spans[1:])):
        raise SafetensorsFormatError("two tensors overlap")
    return entries


def load_mapped(path: str | os.PathLike) -> Optional[dict[str, torch.Tensor]]:
    """Every tensor of the file as a view of one private memory mapping, or None where this fast path does not
    apply (a big-endian machine, a dtype it does not map, data not aligned to its element size); the caller then
    reads the file with the safetensors library. Raises `SafetensorsFormatError` for a broken file."""
    header, data_start, size = read_header(path)
    entries = _checked_entries(header, size - data_start)
    if entries is None or sys.byteorder != "little":
        return None
    if any((data_start + begin) % dtype.itemsize for _, dtype, _, begin, _ in entries):
        return None
    mapping = torch.UntypedStorage.from_file(str(path), shared=False, nbytes=size)
    # Each tensor gets its own storage (a slice of the mapping): saving one saves its bytes only, and savers
    # that refuse tensors sharing memory accept them.
    return {name: torch.empty(0, dtype=dtype).set_(mapping[data_start + begin:data_start + end], 0, shape)
            for name, dtype, shape, begin, end in entries}
