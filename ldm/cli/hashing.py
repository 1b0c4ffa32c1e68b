"""The checkpoint hash written into each PNG: the first 10 hex digits of the file's SHA-256 (the
'Model hash' of the popular web UIs). A multi-gigabyte file is hashed in a background thread while
the model loads and samples, and the result is cached by path, size and modification time."""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import threading
from pathlib import Path
from typing import Optional

logger = logging.getLogger(__name__)

SHORT_LENGTH = 10
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


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file, from the cache when the file has not changed."""
    path = Path(path)
    key = _cache_key(path)
    cached = _read_cache().get(key)
    if cached:
        return cached
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for block in iter(lambda: stream.read(CHUNK), b""):
            digest.update(block)
    _write_cache(key, digest.hexdigest())
    return digest.hexdigest()


class BackgroundHash:
    """Hashes a file in a daemon thread (so Ctrl-C never waits for it); `short()` waits for the result."""

    def __init__(self, path: str | os.PathLike):
        self._result: Optional[str] = None
        self._thread = threading.Thread(target=self._run, args=(Path(path),), daemon=True)
        self._thread.start()

    def _run(self, path: Path) -> None:
        try:
            self._result = sha256_file(path)
        except OSError as error:
            logger.warning("cannot hash %s: %s", path, error)

    def short(self) -> Optional[str]:
        """The first 10 hex digits of the hash, or None if the file could not be read."""
        self._thread.join()
        return self._result[:SHORT_LENGTH] if self._result else None
