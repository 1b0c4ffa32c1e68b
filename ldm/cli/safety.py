"""The NSFW safety checker of the original scripts: diffusers' `StableDiffusionSafetyChecker` with its
CLIP feature extractor, loaded only when a run needs it (never at import time).

The weights come from a local directory (`--safety_checker DIR` or $LDM_SAFETY_CHECKER) or from the
Hugging Face Hub (`CompVis/stable-diffusion-safety-checker`, cached after the first download). When
they cannot be had, the run says so once and goes on unchecked, unless the checker is required.
"""
from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

DEFAULT_SOURCE = "CompVis/stable-diffusion-safety-checker"
ENV_VAR = "LDM_SAFETY_CHECKER"
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
HUB_PATTERNS = (["*.json", "*.safetensors"], ["*.json", "pytorch_model.bin"])


def _first_line(error: Exception) -> str:
    lines = str(error).strip().splitlines()
    return f"{type(error).__name__}: {lines[0]}" if lines else type(error).__name__


class SafetyChecker:
    """Flags images with the Stable Diffusion safety checker; `source` is a local directory or a hub id."""

    def __init__(self, source: Optional[str] = None, required: bool = False):
        self.source = source or os.environ.get(ENV_VAR) or DEFAULT_SOURCE
        self.required = required
        self.directory: Optional[Path] = None
        self.checker: Any = None
        self.extractor: Any = None
        self.device: Any = None

    @property
    def available(self) -> bool:
        return self.checker is not None

    def _unavailable(self, reason: str) -> None:
        message = f"the safety checker ({self.source}) cannot be loaded: {reason}"
        if self.required:
            raise UserInputError(message)
        logger.warning("%s. Images are NOT checked for NSFW content. Download it once while online, or point "
                       "--safety_checker / $%s to a local copy; --no_safety_checker turns the check off.",
                       message, ENV_VAR)

    def resolve(self) -> bool:
        """Find (or download) the checker's files; False, after a warning, when they cannot be had."""
        local = Path(self.source).expanduser()
        if local.is_dir():
            self.directory = local
            return True
        if not HUB_ID.match(self.source):
            raise UserInputError(f"safety checker directory not found: {self.source}")
        try:
            self.directory = self._snapshot()
            if self.directory is not None:
                return True
            self._unavailable("the download has no weights")
        except UserInputError:
            raise
        except Exception as error:  # offline, no network, no access: all mean "not available"
            self._unavailable(f"not in the local cache and not downloadable ({_first_line(error)})")
        return False

    def _snapshot(self) -> Optional[Path]:
        """The checker's files from the Hugging Face cache, else from the Hub; None if they hold no weights."""
        from huggingface_hub import snapshot_download

        for patterns in HUB_PATTERNS:
            try:
                directory = Path(snapshot_download(self.source, allow_patterns=patterns, local_files_only=True))
            except Exception:  # not cached: download
                directory = Path(snapshot_download(self.source, allow_patterns=patterns))
            if any(directory.glob("*.safetensors")) or any(directory.glob("*.bin")):
                return directory
        return None

    def load(self, device: Any) -> bool:
        """Build the checker and its feature extractor from the resolved files on `device`."""
        if self.directory is None:
            return False
        try:
            from diffusers.pipelines.stable_diffusion.safety_checker import StableDiffusionSafetyChecker
            from transformers import CLIPImageProcessor

            self.extractor = CLIPImageProcessor.from_pretrained(self.directory)
            self.checker = StableDiffusionSafetyChecker.from_pretrained(self.directory).to(device).eval()
            logging.getLogger(StableDiffusionSafetyChecker.__module__).setLevel(logging.ERROR)  # we report flags
            self.device = device
        except Exception as error:  # a broken or foreign directory: report it like missing weights
            self._unavailable(f"cannot read {self.directory} ({_first_line(error)})")
            return False
        return True

    def __call__(self, images: np.ndarray) -> list[bool]:
        """Which of `images` (N, H, W, 3 floats in [0, 1]) show NSFW content; all False when unavailable."""
        if not self.available:
            return [False] * len(images)
        import torch

        uint8 = [(255.0 * image).round().astype(np.uint8) for image in images]
        features = self.extractor(uint8, return_tensors="pt").pixel_values.to(self.device, torch.float32)
        with torch.no_grad():
            _, flags = self.checker(clip_input=features, images=images.copy())
        return [bool(flag) for flag in flags]
