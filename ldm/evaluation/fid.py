"""Fréchet Inception Distance (Heusel et al. 2017, "GANs Trained by a Two Time-Scale Update Rule Converge to a
Local Nash Equilibrium"), computed by torch-fidelity: the 2048 pool3 features of the TF FID Inception-v3
(pt_inception-2015-12-05), each image resized to 299x299 by torch-fidelity's port of TF1's bilinear resize, and
the FID of the two feature sets' Gaussians. torch-fidelity reproduces the original TF implementation's numbers
(docs/evaluation.md, "Metrics").

The reference images' statistics are computed once per folder and cached (keyed by the file names and sizes and
the feature extractor), so a sweep over scales and checkpoints reads the reference folder once."""
from __future__ import annotations

import hashlib
import io
import json
import logging
import os
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from PIL import Image

from ldm.errors import UserInputError
from ldm.evaluation.files import IMAGE_SUFFIXES, atomic_write, image_files
from ldm.evaluation.metric import Sample

logger = logging.getLogger(__name__)

FeatureExtractor = Callable[[torch.Tensor], torch.Tensor]  # uint8 [N, 3, H, W] -> float [N, D]
Statistics = dict[str, np.ndarray]  # torch-fidelity's {"mu": [D], "sigma": [D, D]}


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """The Fréchet distance of N(mu1, sigma1) and N(mu2, sigma2) in closed form, ||mu1 - mu2||² + Tr(sigma1 +
    sigma2 - 2 (sigma1 sigma2)^½), in float64; Tr((S1 S2)^½) is taken as Tr((S1^½ S2 S1^½)^½), whose argument
    is symmetric. A reference for the library's computation, which FID itself uses."""
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    sigma1, sigma2 = np.asarray(sigma1, np.float64), np.asarray(sigma2, np.float64)
    values, vectors = np.linalg.eigh(sigma1)
    root = (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T
    middle = root @ sigma2 @ root
    trace_root = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2), 0.0, None)).sum()
    diff = mu1 - mu2
    return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * trace_root)


def feature_statistics(features: torch.Tensor) -> Statistics:
    """Mean and covariance of features [N, D] (torch-fidelity's `fid_features_to_statistics`)."""
    from torch_fidelity.metric_fid import fid_features_to_statistics

    if features.shape[0] < 2:
        raise UserInputError(f"FID needs at least 2 images, got {features.shape[0]}")
    return fid_features_to_statistics(features.detach().cpu().to(torch.float32))


def statistics_distance(first: Statistics, second: Statistics) -> float:
    """The FID of two feature statistics (torch-fidelity's `fid_statistics_to_metric`)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    return float(fid_statistics_to_metric(first, second, verbose=False)[KEY_METRIC_FID])


def inception_extractor(device: str | torch.device = "cpu") -> FeatureExtractor:
    """torch-fidelity's TF-compatible Inception-v3 returning the 2048 pool3 features; its weights come from
    ldm.evaluation.pretrained (downloaded once, or a clear error offline)."""
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    from ldm.evaluation.pretrained import fetch, inception_weights

    network = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                          feature_extractor_weights_path=str(fetch(inception_weights())))
    network = network.to(device)

    def extract(images: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return network(images.to(device))[0]

    extract.name = "inception-v3-compat-2048"  # type: ignore[attr-defined]
    return extract


def read_uint8(path: Path) -> torch.Tensor:
    """An image file as uint8 [3, H, W] RGB, center-cropped to a square when it is not one (the generated
    images are square; the extractor then resizes every image to 299x299)."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read the image {path} ({error})") from error
    width, height = image.size
    side = min(width, height)
    if width != height:
        left, top = (width - side) // 2, (height - side) // 2
        image = image.crop((left, top, left + side, top + side))
    return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)


def square_side(path: Path) -> int:
    """The side of the square `read_uint8` makes of an image, from its header alone."""
    try:
        with Image.open(path) as image:
            return min(image.size)
    except (OSError, SyntaxError, ValueError) as error:
        raise UserInputError(f"cannot read the image {path} ({error})") from error


def image_features(paths: Sequence[Path], extractor: FeatureExtractor, batch_size: int) -> torch.Tensor:
    """The features [N, D] of the images at `paths`, in order. Images of one size are batched together, and at
    most one batch of images is in memory at a time."""
    sizes: dict[int, list[int]] = {}
    for index, path in enumerate(paths):
        sizes.setdefault(square_side(path), []).append(index)
    rows: list[Optional[torch.Tensor]] = [None] * len(paths)
    for indices in sizes.values():
        for start in range(0, len(indices), batch_size):
            chunk = indices[start:start + batch_size]
            images = torch.stack([read_uint8(paths[i]) for i in chunk])
            for i, row in zip(chunk, extractor(images).detach().cpu().to(torch.float32)):
                rows[i] = row
    return torch.stack(rows)  # type: ignore[arg-type]


def reference_images(reference_dir: Path) -> list[Path]:
    """The image files directly inside `reference_dir`, sorted; an error when there are none."""
    if not reference_dir.is_dir():
        raise UserInputError(f"reference image folder not found: {reference_dir}")
    paths = image_files(reference_dir)
    if not paths:
        raise UserInputError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in the reference folder {reference_dir}")
    return paths


def default_cache_dir() -> Path:
    """$XDG_CACHE_HOME/ldm-evaluation (~/.cache/ldm-evaluation)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")) / "ldm-evaluation"


class FID:
    """FID of each group of samples against the images of `reference_dir` (Heusel et al. 2017); lower is
    better. `feature_extractor` replaces the Inception network (tests); its `name` attribute, if any, keys the
    reference statistics' cache in `cache_dir` (default: default_cache_dir())."""

    name = "fid"
    higher_is_better = False

    def __init__(self, reference_dir: str | os.PathLike, device: str | torch.device = "cpu",
                 cache_dir: Optional[str | os.PathLike] = None, batch_size: int = 50,
                 feature_extractor: Optional[FeatureExtractor] = None):
        self.reference_dir = Path(reference_dir)
        self.device = device
        self.cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self.batch_size = batch_size
        self._extractor = feature_extractor
        self._reference: Optional[Statistics] = None

    @property
    def extractor(self) -> FeatureExtractor:
        if self._extractor is None:
            self._extractor = inception_extractor(self.device)
        return self._extractor

    def cache_path(self, paths: Sequence[Path]) -> Path:
        """Where the statistics of these reference files are cached: a name from their names and sizes, and the
        extractor's name."""
        listing = [[path.name, path.stat().st_size] for path in paths]
        extractor = getattr(self.extractor, "name", type(self.extractor).__name__)
        key = hashlib.sha256(json.dumps([extractor, listing]).encode("utf-8")).hexdigest()[:24]
        return self.cache_dir / f"fid-reference-{key}.npz"

    def reference_statistics(self) -> Statistics:
        """The reference folder's statistics: from this object, else from the cache, else computed (and cached)."""
        if self._reference is None:
            paths = reference_images(self.reference_dir)
            cache = self.cache_path(paths)
            if cache.is_file():
                with np.load(cache) as stored:
                    self._reference = {"mu": stored["mu"], "sigma": stored["sigma"]}
                logger.info("FID reference statistics of %s read from %s", self.reference_dir, cache)
            else:
                logger.info("computing the FID reference statistics of %d images in %s", len(paths),
                            self.reference_dir)
                self._reference = feature_statistics(image_features(paths, self.extractor, self.batch_size))
                buffer = io.BytesIO()
                np.savez(buffer, **self._reference)
                atomic_write(cache, lambda stream: stream.write(buffer.getvalue()))
        return self._reference

    def compute(self, samples: Sequence[Sample]) -> float:
        """FID of the samples' images against the reference images."""
        if len(samples) < 2:
            raise UserInputError(f"FID needs at least 2 images, got {len(samples)}")
        generated = feature_statistics(image_features([s.path for s in samples], self.extractor, self.batch_size))
        return statistics_distance(generated, self.reference_statistics())
