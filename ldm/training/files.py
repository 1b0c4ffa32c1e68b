"""Writing files so that a crash never leaves a half-written one: write beside, flush, rename."""
from __future__ import annotations

import os
import tempfile
from typing import BinaryIO, Callable


def atomic_write_bytes(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(handle)` on a temporary file in `path`'s folder, then move it onto `path` in one step."""
    path = os.fspath(path)
    directory = os.path.dirname(path) or "."
    os.makedirs(directory, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        if os.path.exists(temporary):
            os.remove(temporary)
        raise
