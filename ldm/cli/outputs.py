"""Writing numbered PNGs that never overwrite, grids, and the `parameters` text chunk.

A file is written under a temporary name and then claimed under the next free number with
`os.link`, which fails if the name exists; so runs writing into one directory at the same
time each get their own numbers, and no reader ever sees half a PNG.
"""
from __future__ import annotations

import functools
import json
import os
import re
import tempfile
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image
from PIL.PngImagePlugin import PngInfo

SAMPLE_PATTERN = re.compile(r"^(\d{5,})\.png$")
GRID_PATTERN = re.compile(r"^grid-(\d{4,})\.png$")
GRID_PADDING = 2


@functools.lru_cache(maxsize=None)
def _file_mode() -> int:
    """The permissions a newly created file gets under the process umask."""
    umask = os.umask(0o022)
    os.umask(umask)
    return 0o666 & ~umask


def next_number(directory: Path, pattern: re.Pattern) -> int:
    """One more than the highest number among the files of `directory` that match `pattern`."""
    numbers = [int(m.group(1)) for m in map(pattern.match, os.listdir(directory)) if m]
    return max(numbers, default=-1) + 1


def _claim(temporary: Path, directory: Path, pattern: re.Pattern, name_format: str) -> Path:
    """Give `temporary` the first free numbered name in `directory`; returns the final path."""
    number = next_number(directory, pattern)
    while True:
        target = directory / name_format.format(number)
        try:
            os.link(temporary, target)
            return target
        except FileExistsError:
            number += 1
        except OSError:
            return _claim_without_links(temporary, target, directory, pattern, name_format)


def _claim_without_links(temporary: Path, target: Path, directory: Path, pattern: re.Pattern,
                         name_format: str) -> Path:
    """For file systems without hard links: reserve the name with O_EXCL, then move the file onto it."""
    number = int(pattern.match(target.name).group(1))
    while True:
        target = directory / name_format.format(number)
        try:
            os.close(os.open(target, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
        except FileExistsError:
            number += 1
            continue
        os.replace(temporary, target)
        return target


def save_numbered(image: Image.Image, directory: str | os.PathLike, name_format: str = "{:05}.png",
                  pattern: re.Pattern = SAMPLE_PATTERN, pnginfo: Optional[PngInfo] = None) -> Path:
    """Save `image` as the next free `name_format` number in `directory` and return its path."""
    directory = Path(directory)
    handle, temporary_name = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=directory)
    temporary = Path(temporary_name)
    try:
        os.chmod(temporary, _file_mode())
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=pnginfo)
        return _claim(temporary, directory, pattern, name_format)
    finally:
        temporary.unlink(missing_ok=True)


def save_new(image: Image.Image, path: str | os.PathLike, pnginfo: Optional[PngInfo] = None) -> Path:
    """Save `image` as the PNG `path`, which must not exist yet: written under a temporary name, then linked (or,
    without hard links, moved onto a name reserved with O_EXCL) into place. Raises FileExistsError, leaving the
    existing file untouched, if the name is taken, even by a file that appeared while this one was written."""
    path = Path(path)
    handle, temporary_name = tempfile.mkstemp(prefix=".partial-", suffix=".png", dir=path.parent)
    temporary = Path(temporary_name)
    try:
        os.chmod(temporary, _file_mode())
        with os.fdopen(handle, "wb") as stream:
            image.save(stream, format="PNG", pnginfo=pnginfo)
        try:
            os.link(temporary, path)
        except FileExistsError:
            raise
        except OSError:
            os.close(os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
            os.replace(temporary, path)
        return path
    finally:
        temporary.unlink(missing_ok=True)


def describe_numbered(names: Iterable[str], pattern: re.Pattern = SAMPLE_PATTERN) -> str:
    """Numbered file names as runs of consecutive numbers, in order: "00003-00005.png, 00008.png"."""
    numbered = sorted((int(match.group(1)), match.group(1), match.group(0)) for match in map(pattern.match, names))
    runs: list[list[tuple[int, str, str]]] = []
    for entry in numbered:
        if runs and entry[0] == runs[-1][-1][0] + 1:
            runs[-1].append(entry)
        else:
            runs.append([entry])
    return ", ".join(run[0][2] if len(run) == 1 else f"{run[0][1]}-{run[-1][2]}" for run in runs)


def make_grid(images: Sequence[np.ndarray], columns: int, padding: int = GRID_PADDING) -> np.ndarray:
    """Images (H, W, 3 uint8) tiled `columns` to a row with black borders, laid out as torchvision's make_grid."""
    columns = max(1, min(columns, len(images)))
    rows = -(-len(images) // columns)
    height, width = images[0].shape[0] + padding, images[0].shape[1] + padding
    grid = np.zeros((rows * height + padding, columns * width + padding, 3), dtype=np.uint8)
    for index, image in enumerate(images):
        top, left = (index // columns) * height + padding, (index % columns) * width + padding
        grid[top:top + image.shape[0], left:left + image.shape[1]] = image
    return grid


def _quote(value: Any) -> str:
    text = str(value)
    return json.dumps(text, ensure_ascii=False) if any(c in text for c in ',:\n"') else text


def infotext(prompt: str, negative_prompt: str, fields: Mapping[str, Any]) -> str:
    """Generation parameters in the text format the popular web UIs read from a PNG's `parameters` chunk:
    the prompt, an optional 'Negative prompt:' line, then 'Key: value' pairs separated by commas."""
    lines = [prompt]
    if negative_prompt:
        lines.append(f"Negative prompt: {negative_prompt}")
    lines.append(", ".join(f"{key}: {_quote(value)}" for key, value in fields.items() if value is not None))
    return "\n".join(lines)


def parse_infotext(text: str) -> tuple[str, str, dict[str, str]]:
    """The inverse of `infotext`: (prompt, negative prompt, fields)."""
    *head, last = text.split("\n")
    fields = {}
    for match in re.finditer(r'\s*([^:,]+):\s*("(?:\\.|[^\\"])*"|[^,]*)(?:,|$)', last):
        key, value = match.group(1).strip(), match.group(2).strip()
        fields[key] = json.loads(value) if value.startswith('"') else value
    negative = ""
    negative_lines = [i for i, line in enumerate(head) if line.startswith("Negative prompt: ")]
    if negative_lines:
        index = negative_lines[0]
        negative = "\n".join(head[index:])[len("Negative prompt: "):]
        head = head[:index]
    return "\n".join(head), negative, fields


def png_parameters(text: str) -> PngInfo:
    """A PngInfo holding `text` as the `parameters` chunk."""
    info = PngInfo()
    info.add_text("parameters", text)
    return info
