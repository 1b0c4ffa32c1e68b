"""The metrics' pretrained weights: one file each, downloaded once into the cache its library uses and read from
there afterwards. Offline, a missing file is a `UserInputError` that names the file, its URL and the path to put
it at, so that it can be copied over from a machine that has it.

The libraries read these files with loaders that can run code (torch-fidelity unpickles the Inception weights with
`weights_only=False`; OpenAI's CLIP files are TorchScript archives), so a file is checked before they see it: its
SHA-256 where it is published (OpenAI's URLs hold it), and a pickle by loading it weights-only first (a pickle that
passes the weights-only unpickler asks for nothing but tensors and containers, whichever unpickler reads it)."""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ldm.errors import CheckpointError, UserInputError, first_line

logger = logging.getLogger(__name__)

# torch-fidelity's port of the TF FID Inception (pt_inception-2015-12-05), as torch_fidelity.feature_extractor_
# inceptionv3.URL_INCEPTION_V3 names it; kept here so that the offline message needs no import of the library.
INCEPTION_URL = ("https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/"
                 "weights-inception-2015-12-05-6726825d.pth")


@dataclass(frozen=True)
class WeightsFile:
    """A file of weights: what it is (for messages), where it comes from, where it is kept, and the start of its
    SHA-256 where it is published (checked on download)."""

    description: str
    url: str
    path: Path
    sha256_prefix: Optional[str] = None


def inception_weights() -> WeightsFile:
    """The FID Inception-v3 weights, in torch hub's checkpoint folder (where torch-fidelity caches them too)."""
    import torch

    path = Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_URL.rsplit("/", 1)[1]
    return WeightsFile("the FID Inception-v3 weights (TF pt_inception-2015-12-05, torch-fidelity's port)",
                       INCEPTION_URL, path)


def clip_weights(model_name: str) -> WeightsFile:
    """OpenAI's CLIP weights of an open_clip model name ("ViT-L-14", "ViT-B-32"), in open_clip's (and OpenAI
    clip's) cache folder ~/.cache/clip."""
    from open_clip.pretrained import get_pretrained_url

    url = get_pretrained_url(model_name, "openai")
    if not url:
        raise UserInputError(f"open_clip has no OpenAI weights for the CLIP model {model_name!r}; use ViT-L-14 or "
                             "ViT-B-32")
    path = Path(os.path.expanduser("~/.cache/clip")) / url.rsplit("/", 1)[1]
    sha256 = url.rsplit("/", 2)[1]  # OpenAI's URLs hold the file's SHA-256, which open_clip's downloader checks too
    return WeightsFile(f"OpenAI's CLIP {model_name} weights", url, path, sha256)


def _sha256(path: Path) -> str:
    import hashlib

    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _check(weights: WeightsFile) -> Path:
    """The file, once it is known to be the published one (SHA-256) or to hold only weights (a pickle loaded
    weights-only)."""
    if weights.sha256_prefix:
        if not _sha256(weights.path).startswith(weights.sha256_prefix):
            raise UserInputError(f"{weights.path} is not {weights.description} (its SHA-256 differs from the "
                                 f"published one); delete it, and download {weights.url} again")
        return weights.path
    from ldm.checkpoint import read_state_dict

    try:
        read_state_dict(weights.path)
    except CheckpointError as error:
        raise UserInputError(f"{weights.path} is not {weights.description} ({error}); delete it, and download "
                             f"{weights.url} again") from error
    return weights.path


def fetch(weights: WeightsFile) -> Path:
    """`weights.path`, downloaded first when missing (atomically, by torch hub), and checked (see the module's
    docstring). Raises UserInputError when it is missing and cannot be downloaded (offline), saying which file to
    put where, or when the file there is not the expected one."""
    if weights.path.is_file():
        return _check(weights)
    import torch

    logger.info("downloading %s from %s to %s", weights.description, weights.url, weights.path)
    try:
        weights.path.parent.mkdir(parents=True, exist_ok=True)
        torch.hub.download_url_to_file(weights.url, str(weights.path), hash_prefix=weights.sha256_prefix,
                                       progress=False)
    except Exception as error:  # offline, blocked, interrupted: the user has to bring the file
        raise UserInputError(f"{weights.description} are needed and could not be downloaded ({first_line(error)}): "
                             f"download {weights.url} and save it as {weights.path}") from error
    return _check(weights)
