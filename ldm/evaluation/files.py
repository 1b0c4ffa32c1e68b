"""Writing the evaluation's files so that no reader ever sees half of one (a temporary file beside it, then a
rename), and telling a complete PNG from a missing, truncated or corrupt one."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from PIL import Image

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


def image_files(folder: Path) -> list[Path]:
    """The image files directly inside `folder` (by suffix), sorted."""
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], None]) -> None:
    """Call `write(handle)` on a temporary file in `path`'s folder, then move it onto `path` in one step."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as stream:
            write(stream)
        os.chmod(temporary, 0o666 & ~_umask())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write `text` (UTF-8) to `path` atomically."""
    atomic_write(path, lambda stream: stream.write(text.encode("utf-8")))


def is_complete_png(path: Path, size: Optional[tuple[int, int]] = None) -> bool:
    """Whether `path` is a whole PNG (every chunk's checksum verified) of `size` (width, height) when given."""
    try:
        with Image.open(path) as image:
            if image.format != "PNG" or (size is not None and image.size != size):
                return False
            image.verify()
        return True
    except (OSError, SyntaxError, ValueError):
        return False


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
