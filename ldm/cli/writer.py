"""What happens to decoded samples: safety check, watermark, numbered PNG with its parameters, grid."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
from PIL import Image

from ldm.cli.images import to_uint8
from ldm.cli.outputs import (
    GRID_PATTERN,
    describe_numbered,
    infotext,
    make_grid,
    png_parameters,
    save_numbered,
)
from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

Checker = Callable[[np.ndarray], Sequence[bool]]
Marker = Callable[[Image.Image], Image.Image]
PER_SAMPLE_FIELDS = ("Batch pos", "Iteration", "Prompt batch")


class ImageWriter:
    """Saves each sample as `outdir/samples/NNNNN.png` and, at the end, `outdir/grid-NNNN.png`.

    `safety` flags images, which are then saved as plain black images; `watermark` marks each saved image.
    Every PNG carries its prompt and `fields` in its `parameters` text chunk.
    """

    def __init__(self, outdir: str | os.PathLike, negative_prompt: str = "", grid_columns: int = 1,
                 skip_save: bool = False, skip_grid: bool = False, safety: Optional[Checker] = None,
                 watermark: Optional[Marker] = None):
        self.outdir = Path(outdir)
        self.sample_dir = self.outdir / "samples"
        self.negative_prompt = negative_prompt
        self.grid_columns = grid_columns
        self.skip_save, self.skip_grid = skip_save, skip_grid
        self.safety, self.watermark = safety, watermark
        self.saved: list[Path] = []
        self.flagged = 0
        self._grid: list[np.ndarray] = []
        self._grid_info: Optional[tuple[str, Mapping[str, Any]]] = None

    def prepare(self) -> None:
        """Create the output directories."""
        try:
            self.sample_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise UserInputError(f"cannot create output directory {self.sample_dir}: {error.strerror}") from error

    def _encode(self, pixels: np.ndarray, prompt: str, fields: Mapping[str, Any]) -> tuple[Image.Image, Any]:
        image = Image.fromarray(pixels)
        if self.watermark is not None:
            image = self.watermark(image)
        return image, png_parameters(infotext(prompt, self.negative_prompt, fields))

    def add(self, images: np.ndarray, prompts: Sequence[str], fields: Sequence[Mapping[str, Any]]) -> None:
        """Check and save a batch of images (N, H, W, 3 floats in [0, 1]) with their prompts and fields."""
        flags = self.safety(images) if self.safety is not None else [False] * len(images)
        for image, flag, prompt, info in zip(images, flags, prompts, fields):
            pixels = np.zeros(image.shape, dtype=np.uint8) if flag else to_uint8(image)
            if self._grid_info is None:
                self._grid_info = (prompt, info)
            if not self.skip_save:
                image_file, pnginfo = self._encode(pixels, prompt, info)
                self.saved.append(save_numbered(image_file, self.sample_dir, pnginfo=pnginfo))
            if flag:
                self.flagged += 1
                where = self.saved[-1] if not self.skip_save else f"sample {len(self._grid) + 1} of the grid"
                logger.warning("the safety checker flagged %s (prompt %r); it was replaced by a black image",
                               where, prompt)
            if not self.skip_grid:
                self._grid.append(pixels)

    def finish(self) -> Optional[Path]:
        """Save the grid of every sample added (unless skipped); returns its path."""
        if self.skip_grid or not self._grid:
            return None
        prompt, info = self._grid_info
        grid_fields = {**{k: v for k, v in info.items() if k not in PER_SAMPLE_FIELDS}, "Grid": len(self._grid)}
        image, pnginfo = self._encode(make_grid(self._grid, self.grid_columns), prompt, grid_fields)
        return save_numbered(image, self.outdir, name_format="grid-{:04}.png", pattern=GRID_PATTERN, pnginfo=pnginfo)

    def summary(self, grid: Optional[Path]) -> str:
        """One line that says where the images went."""
        parts = []
        if self.saved:
            # Only this run's files: another run writing into the same directory may have numbers in between.
            parts.append(f"{len(self.saved)} images in {self.sample_dir} "
                         f"({describe_numbered(path.name for path in self.saved)})"
                         if len(self.saved) > 1 else f"1 image: {self.saved[0]}")
        if grid is not None:
            parts.append(f"grid: {grid}")
        if not parts:
            return "nothing saved (--skip_save and --skip_grid)"
        return "Your samples are ready and waiting for you here: " + "; ".join(parts)
