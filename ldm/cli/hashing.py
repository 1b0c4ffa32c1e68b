"""The file hashes written into each PNG: the first 10 hex digits of the file's SHA-256 (the 'Model hash' and
'VAE hash' of the popular web UIs; LoRAs get their own, see `lora_short_hash`). A multi-gigabyte file is hashed
in a background thread while the model loads and samples, and the result is cached by path, size and
modification time. A diffusers folder's hash is the SHA-256 of the list of its weight files' hashes
(`sha256_folder`)."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Mapping, Optional

from ldm.diffusers_folder import inspect_folder
from ldm.errors import CheckpointError

logger = logging.getLogger(__name__)

SHORT_LENGTH = 10
LORA_SHORT_LENGTH = 12  # the web UIs' LoRA "shorthash"
CHUNK = 1 << 22


def cache_file() -> Path:
    """Where hashes are cached: $XDG_CACHE_HOME (or ~/.cache)/latent-diffusion-sd/checkpoint-hashes.json."""
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "latent-diffusion-sd" / "checkpoint-hashes.json"


def _cache_key(path: Path) -> str:
    stat = path.stat()
    return f"{path.resolve()}|{stat.st_size}|{stat.st_mtime_ns}"


def _read_cache() -> dict[str, str]:
    try:
        return json.loads(cache_file().read_text())
    except (OSError, ValueError):
        return {}


def _write_cache(key: str, digest: str) -> None:
    target = cache_file()
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        cache = {**_read_cache(), key: digest}
        handle, name = tempfile.mkstemp(dir=target.parent, prefix=".hashes-")
        with os.fdopen(handle, "w") as stream:
            json.dump(cache, stream)
        os.replace(name, target)
    except OSError as error:
        logger.debug("cannot cache the checkpoint hash in %s: %s", target, error)


def _sha256_from(path: Path, start: int, cache_suffix: str) -> str:
    """The hex SHA-256 of a file's bytes from `start` on, from the cache when the file has not changed."""
    key = _cache_key(path) + cache_suffix
    cached = _read_cache().get(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        stream.seek(start)
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    _write_cache(key, digest.hexdigest())
    return digest.hexdigest()


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, from the cache when the file has not changed."""
    return _sha256_from(Path(path), 0, "")


def lora_short_hash(path: str | os.PathLike, metadata: Mapping[str, str]) -> str:
    """The hash the web UIs write for a LoRA in 'Lora hashes' (12 hex digits): the file's own `sshs_model_hash`
    if it records one, else for .safetensors kohya's "addnet" hash (the SHA-256 of the tensor data after the
    header, Civitai's AutoV3), else the SHA-256 of the whole file."""
    path = Path(path)
    if metadata.get("sshs_model_hash"):
        return metadata["sshs_model_hash"][:LORA_SHORT_LENGTH]
    if path.suffix.lower() != ".safetensors":
        return sha256_file(path)[:LORA_SHORT_LENGTH]
    with open(path, "rb") as stream:
        header_size = int.from_bytes(stream.read(8), "little")
    return _sha256_from(path, 8 + header_size, "|addnet")[:LORA_SHORT_LENGTH]


def sha256_folder(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a diffusers folder: of one line per weight file, '<its SHA-256>  <part>/<name>', in the
    order unet, vae, text_encoder; each file's hash is cached as `sha256_file`'s."""
    folder = inspect_folder(path)
    lines = [f"{sha256_file(file)}  {file.relative_to(folder.path).as_posix()}"
             for files in folder.weights.values() for file in files]
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


class BackgroundHash:
    """Hashes a file in a daemon thread (so Ctrl-C never waits for it); `short()` waits for the result."""

    def __init__(self, path: str | os.PathLike):
        self._result: Optional[str] = None
        self._thread = threading.Thread(target=self._run, args=(Path(path),), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = sha256_folder(path) if path.is_dir() else sha256_file(path)
        except (OSError, CheckpointError) as error:
            logger.warning("cannot hash %s: %s", path, error)

    def short(self) -> Optional[str]:
        """The first 10 hex digits of the hash, or None if the file could not be read."""
        self._thread.join()
        return self._result[:SHORT_LENGTH] if self._result else None
