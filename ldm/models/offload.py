"""Low-memory inference: the large parts of a latent diffusion model wait in CPU memory and visit the
compute device one at a time.

`enable_offload(model, device)` leaves the text encoder, the UNet and the autoencoder on the CPU and puts
the rest of the model (noise schedule, textual-inversion embeddings: a few megabytes) on `device`. From
then on, the model methods that use a part move it to `device` first, after sending the part that was
there back to the CPU: prompt encoding brings the text encoder, the sampler's first step the UNet (which
stays for the remaining steps), the decode or encode the autoencoder. The device never holds more than
one of the three, so it needs room for the largest (Stable Diffusion v1's UNet: 860M parameters, 3.4 GB
in float32) and its activations instead of the whole model (1.07B parameters); the cost is copying each
part over once per use. On the CPU every move is a no-op and the results are unchanged.
"""
from __future__ import annotations

import contextlib
import functools
import logging
import operator
from typing import Any, Callable, Iterator, Optional

import torch
from torch import nn

logger = logging.getLogger(__name__)

# The model method -> the part it needs (attribute path on a LatentDiffusion).
PART_OF_METHOD = {
    "get_learned_conditioning": "cond_stage_model",
    "apply_model": "model.diffusion_model",
    "encode_first_stage": "first_stage_model",
    "decode_first_stage": "first_stage_model",
    "differentiable_decode_first_stage": "first_stage_model",
}
# Large state that no inference method needs on the device: the EMA copy of the UNet, if the model has one.
PARKED = ("model_ema",)


class ComponentOffloader:
    """Moves the parts of `model` between `offload_device` and `device` so that at most one is on `device`."""

    def __init__(self, model: nn.Module, device: torch.device | str,
                 offload_device: torch.device | str = "cpu"):
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.parts: dict[str, nn.Module] = {}
        for path in dict.fromkeys(PART_OF_METHOD.values()):
            part = _get(model, path)
            if isinstance(part, nn.Module):
                self.parts[path] = part
        self.resident: Optional[str] = None

    def load(self, path: str) -> None:
        """Make the part at `path` the one on the device, sending the previous one back."""
        if path == self.resident:
            return
        if self.resident is not None:
            self.parts[self.resident].to(self.offload_device)
            logger.debug("offloaded %s to %s", self.resident, self.offload_device)
        self.parts[path].to(self.device)
        self.resident = path
        logger.debug("moved %s to %s", path, self.device)


def enable_offload(model: nn.Module, device: torch.device | str,
                   offload_device: torch.device | str = "cpu") -> ComponentOffloader:
    """Keep the text encoder, UNet and autoencoder of `model` on `offload_device` and move each to
    `device` only while the methods that need it run (see the module docstring); the rest of the model
    goes to `device` now. Returns the offloader, whose `resident` names the part on the device."""
    offloader = ComponentOffloader(model, device, offload_device)
    parked = [path for path in PARKED if isinstance(getattr(model, path, None), nn.Module)]
    with _detached(model, [*offloader.parts, *parked]) as detached:
        for module in detached.values():
            module.to(offloader.offload_device)
        model.to(offloader.device)
    for method, path in PART_OF_METHOD.items():
        if path in offloader.parts and callable(getattr(model, method, None)):
            setattr(model, method, _loading(offloader, path, getattr(model, method)))
    if offloader.device == offloader.offload_device:
        logger.info("low-memory mode: the model runs on %s, where it already is; nothing moves", offloader.device)
    else:
        logger.info("low-memory mode: %s wait on %s and visit %s one at a time", ", ".join(offloader.parts),
                    offloader.offload_device, offloader.device)
    return offloader


def _loading(offloader: ComponentOffloader, path: str, method: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(method)
    def call(*args: Any, **kwargs: Any) -> Any:
        offloader.load(path)
        return method(*args, **kwargs)

    return call


def _get(model: nn.Module, path: str) -> Any:
    try:
        return operator.attrgetter(path)(model)
    except AttributeError:
        return None


@contextlib.contextmanager
def _detached(model: nn.Module, paths: list[str]) -> Iterator[dict[str, nn.Module]]:
    """Take the submodules at `paths` out of `model` for the duration of the block (so that `model.to`
    leaves them alone), and put them back afterwards."""
    detached: dict[str, nn.Module] = {}
    try:
        for path in paths:
            owner_path, _, name = path.rpartition(".")
            owner = _get(model, owner_path) if owner_path else model
            detached[path] = getattr(owner, name)
            setattr(owner, name, None)
        yield detached
    finally:
        for path, module in detached.items():
            owner_path, _, name = path.rpartition(".")
            setattr(_get(model, owner_path) if owner_path else model, name, module)
