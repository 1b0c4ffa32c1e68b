"""LPIPS, the learned perceptual image distance of Zhang et al. 2018 (arXiv:1801.03924), VGG16 variant,
with the module and key names of the original (`net.slice<k>.<i>`, `lin<k>.model.1.weight`).

d(x, y) = sum_l mean_hw || w_l * (f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)|) ||^2   (eq. 1 of the paper)

It needs two pretrained files:
* torchvision's ImageNet VGG16 (`vgg16-397923af.pth`), for the features f_l, fetched once into torch's hub cache;
* the LPIPS linear weights w_l: `weights/v0.1/vgg.pth` of the `lpips` package (a dependency; the same file,
  same checksum, as the `vgg.pth` of taming-transformers), path overridable with $LDM_LPIPS_WEIGHTS.
When they cannot be had, building the loss raises `UserInputError` saying what is missing.
"""
from __future__ import annotations

import hashlib
import importlib.util
import logging
import os
import shutil
import urllib.request
from pathlib import Path
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from ldm.errors import UserInputError

logger = logging.getLogger(__name__)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
VGG16_SHA256_PREFIX = "397923af"
LPIPS_PACKAGE_WEIGHTS = Path("weights") / "v0.1" / "vgg.pth"
LPIPS_VGG_MD5 = "d507d7349b931f0638a25a48a722f98a"
LPIPS_WEIGHTS_ENV = "LDM_LPIPS_WEIGHTS"
DOWNLOAD_TIMEOUT_S = 30

# VGG16 convolution widths ("M" = max-pool) and where LPIPS taps the features (after relu1_2 ... relu5_3).
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)
SLICE_ENDS = (4, 9, 16, 23, 30)
CHANNELS = (64, 128, 256, 512, 512)


def _slices() -> Iterator[tuple[int, range]]:
    """(k, indices of the VGG16 feature layers in slice k)."""
    start = 0
    for k, end in enumerate(SLICE_ENDS, start=1):
        yield k, range(start, end)
        start = end


def vgg16_weights_path() -> Path:
    return Path(torch.hub.get_dir()) / "checkpoints" / Path(VGG16_URL).name


def lpips_weights_path() -> Path:
    """$LDM_LPIPS_WEIGHTS, else the linear weights that ship inside the `lpips` package (found without importing it)."""
    override = os.environ.get(LPIPS_WEIGHTS_ENV)
    if override:
        return Path(override).expanduser()
    spec = importlib.util.find_spec("lpips")
    if spec is None or not spec.submodule_search_locations:
        raise UserInputError("the LPIPS perceptual loss needs its linear-layer weights from the lpips package: "
                             f"pip install lpips (or set {LPIPS_WEIGHTS_ENV} to a vgg.pth), or set "
                             "perceptual_weight: 0 in the loss config to train without LPIPS")
    return Path(list(spec.submodule_search_locations)[0]) / LPIPS_PACKAGE_WEIGHTS


def download(url: str, destination: Path) -> None:
    """Fetch `url` into `destination` through a temporary file (never a partial file at `destination`)."""
    destination.parent.mkdir(parents=True, exist_ok=True)
    partial = destination.with_name(destination.name + ".part")
    logger.info("downloading %s to %s", url, destination)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(partial, "wb") as handle:
        shutil.copyfileobj(response, handle)
    os.replace(partial, destination)


def _file_digest(path: Path, algorithm: str) -> str:
    digest = hashlib.new(algorithm)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def fetch_pretrained(url: str, path: Path, check: Callable[[Path], bool], what: str) -> Path:
    """`path` if it holds the expected file, else download it there; `UserInputError` if that fails."""
    if not path.is_file():
        try:
            download(url, path)
        except OSError as error:
            raise UserInputError(
                f"the LPIPS perceptual loss needs {what}: {path} does not exist and downloading {url} failed ({error}). "
                f"Put the file there, or set perceptual_weight: 0 in the loss config to train without LPIPS"
            ) from error
    if not check(path):
        raise UserInputError(f"{path} is not the expected {what} (checksum mismatch); delete it to download it again")
    return path


def _load_weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, map_location="cpu", weights_only=True)


class ScalingLayer(nn.Module):
    """Maps images in [-1, 1] to the input statistics of the LPIPS VGG."""

    def __init__(self):
        super().__init__()
        self.register_buffer("shift", torch.tensor([-0.030, -0.088, -0.188])[None, :, None, None])
        self.register_buffer("scale", torch.tensor([0.458, 0.448, 0.450])[None, :, None, None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.shift) / self.scale


class NetLinLayer(nn.Module):
    """The learned per-channel weights w_l, as a 1x1 convolution (after dropout, as in the original)."""

    def __init__(self, chn_in: int, chn_out: int = 1, use_dropout: bool = False):
        super().__init__()
        layers: list[nn.Module] = [nn.Dropout()] if use_dropout else []
        layers.append(nn.Conv2d(chn_in, chn_out, 1, stride=1, padding=0, bias=False))
        self.model = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x)


class VGG16Features(nn.Module):
    """VGG16's convolutional part in five slices, returning the activations after each slice."""

    def __init__(self):
        super().__init__()
        layers: list[nn.Module] = []
        channels = 3
        for width in VGG16_LAYOUT:
            if width == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
            else:
                layers += [nn.Conv2d(channels, width, kernel_size=3, padding=1), nn.ReLU(inplace=True)]
                channels = width
        for k, indices in _slices():
            block = nn.Sequential()
            for index in indices:
                block.add_module(str(index), layers[index])
            setattr(self, f"slice{k}", block)

    def load_torchvision_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        """Load torchvision's `vgg16` weights (`features.<i>.*`)."""
        slice_of = {index: k for k, indices in _slices() for index in indices}
        mapped = {}
        for key, value in state_dict.items():
            prefix, _, rest = key.partition(".")
            if prefix != "features":
                continue
            index = int(rest.split(".")[0])
            mapped[f"slice{slice_of[index]}.{rest}"] = value
        self.load_state_dict(mapped)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        outputs = []
        for k in range(1, len(SLICE_ENDS) + 1):
            x = getattr(self, f"slice{k}")(x)
            outputs.append(x)
        return outputs


def normalize_tensor(x: torch.Tensor, eps: float = 1e-10) -> torch.Tensor:
    """Unit-normalise along channels."""
    return x / (torch.sqrt(torch.sum(x ** 2, dim=1, keepdim=True)) + eps)


class LPIPS(nn.Module):
    """Perceptual distance [B, 1, 1, 1] between two image batches in [-1, 1]. Frozen and always in eval mode."""

    def __init__(self, use_dropout: bool = True, pretrained: bool = True,
                 vgg_weights: Optional[str] = None, lpips_weights: Optional[str] = None):
        super().__init__()
        self.scaling_layer = ScalingLayer()
        self.net = VGG16Features()
        self.lin0, self.lin1, self.lin2, self.lin3, self.lin4 = (NetLinLayer(c, use_dropout=use_dropout)
                                                                 for c in CHANNELS)
        if pretrained:
            self.load_pretrained(Path(vgg_weights) if vgg_weights else vgg16_weights_path(),
                                 Path(lpips_weights) if lpips_weights else lpips_weights_path())
        for param in self.parameters():
            param.requires_grad = False
        self.eval()

    def load_pretrained(self, vgg_path: Path, lpips_path: Path) -> None:
        if not lpips_path.is_file() or _file_digest(lpips_path, "md5") != LPIPS_VGG_MD5:
            raise UserInputError(f"{lpips_path} is not the LPIPS linear-layer weight file vgg.pth (missing or another "
                                 f"checksum); reinstall lpips or point {LPIPS_WEIGHTS_ENV} at the right file")
        vgg_path = fetch_pretrained(VGG16_URL, vgg_path, lambda p: _file_digest(p, "sha256").startswith(
            VGG16_SHA256_PREFIX), "torchvision's ImageNet VGG16 weights")
        self.net.load_torchvision_state_dict(_load_weights(vgg_path))
        weights = _load_weights(lpips_path)
        for k, lin in enumerate(self.lins):
            found = [value for key, value in weights.items() if key.startswith(f"lin{k}.")]
            if len(found) != 1:
                raise UserInputError(f"{lpips_path} is not an LPIPS weight file: no single weight for lin{k}")
            lin.model[-1].weight.data.copy_(found[0])

    @property
    def lins(self) -> tuple[NetLinLayer, ...]:
        return (self.lin0, self.lin1, self.lin2, self.lin3, self.lin4)

    def train(self, mode: bool = True) -> "LPIPS":
        """A fixed metric: stays in eval mode (no dropout) whatever the surrounding model does."""
        return super().train(False)

    def forward(self, input: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        features0 = self.net(self.scaling_layer(input))
        features1 = self.net(self.scaling_layer(target))
        value = 0.0
        for lin, f0, f1 in zip(self.lins, features0, features1):
            diff = (normalize_tensor(f0) - normalize_tensor(f1)) ** 2
            value = value + lin(diff).mean(dim=(2, 3), keepdim=True)
        return value
