"""Config-driven construction (`target` / `params`) and small shared helpers."""
from __future__ import annotations

import importlib
import inspect
from inspect import isfunction
from typing import Any, Callable, Mapping, Optional, TypeVar

import torch
from torch import nn

from ldm.errors import UserInputError

T = TypeVar("T")


def get_obj_from_str(string: str, reload: bool = False) -> Any:
    """Import `package.module.Name` and return `Name`."""
    module_name, _, attribute = string.rpartition(".")
    if not module_name:
        raise UserInputError(f"config target {string!r} is not a dotted path such as 'ldm.models.diffusion.ddpm.LatentDiffusion'")
    try:
        module = importlib.import_module(module_name)
        if reload:
            module = importlib.reload(module)
    except ImportError as error:
        raise UserInputError(f"config target {string!r} cannot be imported ({error}); check the 'target' key of the config") from error
    try:
        return getattr(module, attribute)
    except AttributeError as error:
        raise UserInputError(f"config target {string!r}: module {module_name!r} has no {attribute!r}; check the 'target' key of the config") from error


def instantiate_from_config(config: Mapping[str, Any]) -> Any:
    """Build `config.target(**config.params)`, as in the original `ldm.util`."""
    if "target" not in config:
        if config == "__is_first_stage__" or config == "__is_unconditional__":
            return None
        raise UserInputError("config has no 'target' key: every model section needs 'target:' and optional 'params:'")
    params = config.get("params", None) or {}
    target = get_obj_from_str(config["target"])
    try:
        inspect.signature(target).bind(**params)
    except TypeError as error:
        raise UserInputError(f"config target {config['target']!r}: {error}; check its 'params'") from error
    except ValueError:
        pass
    return target(**params)


def exists(value: Any) -> bool:
    return value is not None


def default(value: Optional[T], fallback: T | Callable[[], T]) -> T:
    """`value` unless it is None, else `fallback` (called if it is a function)."""
    if exists(value):
        return value
    return fallback() if isfunction(fallback) else fallback


def ismap(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] > 3


def isimage(x: Any) -> bool:
    return isinstance(x, torch.Tensor) and x.ndim == 4 and x.shape[1] in (1, 3)


def mean_flat(tensor: torch.Tensor) -> torch.Tensor:
    """Mean over every dimension but the batch one."""
    return tensor.mean(dim=list(range(1, tensor.ndim)))


def count_params(model: nn.Module, verbose: bool = False) -> int:
    total = sum(p.numel() for p in model.parameters())
    if verbose:
        import logging

        logging.getLogger(__name__).info("%s has %.2f M params.", model.__class__.__name__, total * 1.0e-6)
    return total


def log_txt_as_img(wh: tuple[int, int], xc: list[str], size: int = 10) -> torch.Tensor:
    """Render captions as images [B, 3, H, W] in [-1, 1], for the training image logs."""
    import textwrap

    import numpy as np
    from PIL import Image, ImageDraw, ImageFont

    font = ImageFont.load_default()
    images = []
    for caption in xc:
        canvas = Image.new("RGB", wh, color="white")
        draw = ImageDraw.Draw(canvas)
        chars_per_line = max(1, int(40 * (wh[0] / 256)))
        draw.text((0, 0), "\n".join(textwrap.wrap(str(caption), chars_per_line)), fill="black", font=font)
        images.append(np.asarray(canvas).transpose(2, 0, 1) / 127.5 - 1.0)
    return torch.tensor(np.stack(images), dtype=torch.float32)
