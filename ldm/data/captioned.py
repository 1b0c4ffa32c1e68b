"""A folder of captioned images for fine-tuning (and, without captions, for the autoencoder).

Two layouts:
* images with a same-name caption file beside them: `cat.jpg` + `cat.txt` (subfolders are searched);
* a metadata file, `.csv` or `.jsonl`, with an image path column (`file_name`, `path`, `image` or
  `filename`, relative to `data_root`) and a caption column (`caption`, `text`, `txt` or `prompt`).

Images are read upright (EXIF orientation), resized, cropped to a square and randomly flipped
(`ldm.data.base.ImageTransform`), and returned as HWC float32 in [-1, 1] under `image_key`, with the
caption under `caption_key` (Stable Diffusion configs use `jpg` and `txt`).
"""
from __future__ import annotations

import csv
import json
import logging
import os
from pathlib import Path
from typing import Any, Optional

from PIL import Image
from torch.utils.data import Dataset

from ldm.data.base import ImageTransform
from ldm.data.image_io import IMAGE_EXTENSIONS, UnreadableImageError, is_image_file, load_rgb_image
from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

PATH_COLUMNS = ("file_name", "path", "image", "filename")
CAPTION_COLUMNS = ("caption", "text", "txt", "prompt")


class CaptionedImages(Dataset):
    """Captioned images under `data_root`, as `{image_key: HWC array in [-1, 1], caption_key: str}`.

    `caption_key=None` returns images only. `repeats` lists every image that many times per epoch
    (useful for small sets). Files that cannot be read are skipped with a warning that counts them;
    a data set without a single readable image is an error.
    """

    def __init__(self, data_root: str, size: int = 512, metadata: Optional[str] = None, image_key: str = "image",
                 caption_key: Optional[str] = "caption", crop: str = "random", flip_p: float = 0.5,
                 interpolation: str = "bicubic", repeats: int = 1):
        root = Path(os.path.expanduser(str(data_root)))
        if not root.is_dir():
            raise UserInputError(f"data directory not found: {root}; set the data set's data_root to a folder of images")
        if repeats < 1:
            raise UserInputError(f"repeats must be at least 1, got {repeats}")
        self.data_root = root
        self.image_key = image_key
        self.caption_key = caption_key
        self.repeats = int(repeats)
        self.transform = ImageTransform(size, crop=crop, flip_p=flip_p, interpolation=interpolation)
        if metadata is not None:
            entries = self._read_metadata(self._metadata_path(metadata))
        else:
            entries = self._scan_folder()
        self.entries = self._readable(entries)

    def __len__(self) -> int:
        return len(self.entries) * self.repeats

    def __getitem__(self, index: int) -> dict[str, Any]:
        count = len(self.entries)
        for offset in range(count):
            path, caption = self.entries[(index + offset) % count]
            try:
                image = load_rgb_image(path)
            except UnreadableImageError as error:
                logger.warning("skipping an image that cannot be decoded (%s); using the next one", error)
                continue
            example: dict[str, Any] = {self.image_key: self.transform(image)}
            if self.caption_key is not None:
                example[self.caption_key] = caption
            return example
        raise UserInputError(f"none of the {count} images under {self.data_root} can be decoded")

    def _metadata_path(self, metadata: str) -> Path:
        path = Path(os.path.expanduser(str(metadata)))
        if not path.is_absolute() and not path.exists():
            path = self.data_root / path
        if not path.is_file():
            raise UserInputError(f"caption metadata file not found: {metadata} (looked in {self.data_root} too)")
        return path

    def _read_metadata(self, path: Path) -> list[tuple[Path, str]]:
        if path.suffix.lower() == ".csv":
            with open(path, newline="", encoding="utf-8") as handle:
                rows = list(csv.DictReader(handle))
        elif path.suffix.lower() in (".jsonl", ".json"):
            rows = []
            with open(path, encoding="utf-8") as handle:
                for number, line in enumerate(handle, start=1):
                    if not line.strip():
                        continue
                    try:
                        row = json.loads(line)
                    except ValueError as error:
                        raise UserInputError(f"{path}, line {number}: not valid JSON ({error})") from error
                    if not isinstance(row, dict):
                        raise UserInputError(f"{path}, line {number}: expected a JSON object with a path and a caption")
                    rows.append(row)
        else:
            raise UserInputError(f"caption metadata must be a .csv or .jsonl file, got {path}")
        if not rows:
            raise UserInputError(f"caption metadata file {path} lists no images")
        path_column = _pick_column(rows[0], PATH_COLUMNS, path, "image path")
        caption_column = _pick_column(rows[0], CAPTION_COLUMNS, path, "caption") if self.caption_key else None
        entries = []
        for row in rows:
            image_path = Path(str(row.get(path_column) or ""))
            if not image_path.is_absolute():
                image_path = self.data_root / image_path
            caption = str(row.get(caption_column) or "").strip() if caption_column else ""
            entries.append((image_path, caption))
        return entries

    def _scan_folder(self) -> list[tuple[Path, str]]:
        entries, uncaptioned = [], 0
        for directory, subdirectories, files in os.walk(self.data_root):
            subdirectories[:] = sorted(d for d in subdirectories if not d.startswith("."))
            for name in sorted(files):
                if name.startswith(".") or not is_image_file(name):
                    continue
                path = Path(directory) / name
                caption = ""
                if self.caption_key is not None:
                    caption_file = path.with_suffix(".txt")
                    if caption_file.is_file():
                        caption = caption_file.read_text(encoding="utf-8", errors="replace").strip()
                    else:
                        uncaptioned += 1
                entries.append((path, caption))
        if not entries:
            raise UserInputError(f"no images found in {self.data_root} (looked for {', '.join(IMAGE_EXTENSIONS)})")
        if uncaptioned:
            logger.warning("%d of %d images in %s have no .txt caption beside them; they train with an empty caption",
                           uncaptioned, len(entries), self.data_root)
        return entries

    def _readable(self, entries: list[tuple[Path, str]]) -> list[tuple[Path, str]]:
        """The entries whose file opens as an image (header check; decoding errors are caught when loading)."""
        readable, example = [], None
        for path, caption in entries:
            try:
                Image.open(path).close()
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                example = example or f"{path}: {error}"
                continue
            readable.append((path, caption))
        skipped = len(entries) - len(readable)
        if skipped:
            logger.warning("skipped %d of %d image files that cannot be read (e.g. %s)", skipped, len(entries), example)
        if not readable:
            raise UserInputError(f"none of the {len(entries)} image files under {self.data_root} can be read")
        return readable


def _pick_column(row: dict, candidates: tuple[str, ...], path: Path, what: str) -> str:
    for name in candidates:
        if name in row:
            return name
    raise UserInputError(f"{path} has no {what} column: expected one of {', '.join(candidates)}, "
                         f"found {', '.join(map(str, row)) or 'none'}")
