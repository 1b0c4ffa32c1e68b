"""Helpers for the command-line tests: a small random checkpoint, running the scripts as subprocesses
(offline, one thread), and reading back what they wrote."""
from __future__ import annotations

import hashlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from PIL import Image
from safetensors.torch import save_file

from tests.model_factory import REPO_DIR, TINY_SD_CONFIG, random_tiny_model

SCRIPTS = REPO_DIR / "scripts"
FAST = ["--config", str(TINY_SD_CONFIG), "--H", "64", "--W", "64", "--ddim_steps", "2"]


def load_script(name: str) -> ModuleType:
    """The module of `scripts/<name>`, imported from its file (the scripts are not a package)."""
    spec = importlib.util.spec_from_file_location(name.removesuffix(".py"), SCRIPTS / name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def write_tiny_checkpoint(path: Path, seed: int = 3) -> Path:
    """A random tiny SD-shaped model of tests/configs/tiny-sd.yaml, saved as safetensors."""
    state = {key: value.contiguous() for key, value in random_tiny_model(seed=seed).state_dict().items()}
    save_file(state, str(path))
    return path


def script_env(tmp: Path, **extra: str) -> dict[str, str]:
    """The environment of a script run: offline, one thread, caches under `tmp`."""
    env = {key: value for key, value in os.environ.items() if key != "LDM_SAFETY_CHECKER"}
    env.update(OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_HOME=str(tmp / "hf-home"),
               XDG_CACHE_HOME=str(tmp / "cache"), PYTHONPATH=str(REPO_DIR))
    env.update(extra)
    return env


def run_script(name: str, *args: str, tmp: Path, cwd: Path | None = None, timeout: float = 120,
               **env: str) -> subprocess.CompletedProcess:
    """Run scripts/`name` with `args`; returns the finished process with text stdout and stderr."""
    return subprocess.run([sys.executable, str(SCRIPTS / name), *map(str, args)], cwd=cwd or tmp,
                          env=script_env(tmp, **env), capture_output=True, text=True, timeout=timeout)


def snapshot(directory: Path) -> dict[str, str]:
    """Relative path -> SHA-256 of every file under `directory` (empty if it does not exist)."""
    if not directory.exists():
        return {}
    return {str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB"))


def parameters(path: Path) -> str:
    """The `parameters` text chunk of a PNG."""
    with Image.open(path) as image:
        return image.text["parameters"]


def sample_names(outdir: Path) -> list[str]:
    return sorted(p.name for p in (outdir / "samples").iterdir())
