"""Reading checkpoints safely and loading them into models without a wasted initialisation.

* `.ckpt` (a Lightning dict with `state_dict`, or a bare state dict) is unpickled with
  `torch.load(weights_only=True)`: a file that asks to run code is refused. The few classes a
  Lightning 1.x checkpoint names (its ModelCheckpoint callback key, numpy scalars) are allowed
  as inert stand-ins. Zip-format files are memory-mapped.
* `.safetensors` is read without pickle at all.
* Models are built with their weights on the meta device and without running their initialisers, and the
  checkpoint's tensors are assigned in place, so loading touches each weight once and needs no second copy.
  Only the thread that builds the model is affected: no class or global of torch is changed.
"""
from __future__ import annotations

import itertools
import logging
import os
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn
from torch.overrides import TorchFunctionMode

from ldm.config_files import read_plain_config
from ldm.errors import CheckpointError, describe_pickle_refusal, first_line
from ldm.safetensors_mmap import SafetensorsFormatError, load_mapped
from ldm.schedule_buffers import SCHEDULE_BUFFERS
from ldm.util import instantiate_from_config

logger = logging.getLogger(__name__)

TEXT_MODEL_PREFIX = "cond_stage_model.transformer."
STALE_KEY_SUFFIXES = ("embeddings.position_ids",)
MAX_KEYS_IN_MESSAGE = 5


class _InertLightningObject:
    """Stand-in for a class that a Lightning checkpoint names only as a dictionary key."""


# What numpy scalars pickle as (`numpy.core.multiarray.scalar` in numpy 1, `numpy._core...` in numpy 2), found
# through their public pickling protocol rather than numpy's private modules.
_NUMPY_SCALAR = np.float64(0.0).__reduce__()[0]

_SAFE_GLOBALS: list[Any] = [
    (_InertLightningObject, "pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint"),
    (_InertLightningObject, "lightning.pytorch.callbacks.model_checkpoint.ModelCheckpoint"),
    (_NUMPY_SCALAR, "numpy.core.multiarray.scalar"),
    _NUMPY_SCALAR,
    np.dtype,
    *(getattr(np.dtypes, name) for name in ("Float64DType", "Float32DType", "Int64DType", "Int32DType")),
]


def _sniff_format(path: Path) -> str:
    """'zip', 'legacy' (old torch pickle), 'safetensors' or 'unknown', from the file's first bytes."""
    with open(path, "rb") as handle:
        head = handle.read(16)
    if head.startswith(b"PK\x03\x04"):
        return "zip"
    if head[:1] == b"\x80":
        return "legacy"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"
    return "unknown"


def _load_pickle_checkpoint(path: Path, fmt: str) -> Any:
    try:
        with torch.serialization.safe_globals(_SAFE_GLOBALS):
            return torch.load(path, map_location="cpu", weights_only=True, mmap=(fmt == "zip"))
    except Exception as error:
        refused = describe_pickle_refusal(error)
        if refused is not None:
            raise CheckpointError(
                f"refused to load {path}: {refused}. Checkpoints are loaded as weights only, never as code: "
                "use a checkpoint from a trusted source, or convert it to .safetensors"
            ) from error
        raise CheckpointError(
            f"cannot read checkpoint {path}: it is truncated or not a PyTorch checkpoint ({first_line(error)}); "
            "download it again"
        ) from error


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        tensors = load_mapped(path)
    except SafetensorsFormatError as error:
        raise CheckpointError(f"cannot read {path}: {error}; download it again") from error
    if tensors is not None:
        return tensors
    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError, ValueError) as error:
        raise CheckpointError(f"cannot read {path}: {first_line(error)}; download it again") from error


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """The checkpoint as a dictionary: a Lightning dict, or `{"state_dict": ...}` for bare weights."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir():
        raise CheckpointError(f"checkpoint path {path} is a directory; give the .ckpt or .safetensors file")
    if path.stat().st_size == 0:
        raise CheckpointError(f"checkpoint {path} is empty (0 bytes); download it again")
    fmt = _sniff_format(path)
    if fmt == "safetensors":
        return {"state_dict": _read_safetensors(path)}
    if fmt in ("zip", "legacy"):
        obj = _load_pickle_checkpoint(path, fmt)
    else:
        raise CheckpointError(f"{path} is not a checkpoint (.ckpt or .safetensors); check the path")
    if not isinstance(obj, Mapping):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict or a Lightning checkpoint")
    if "state_dict" in obj and isinstance(obj["state_dict"], Mapping):
        return dict(obj)
    if obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
        return {"state_dict": dict(obj)}
    raise CheckpointError(f"{path} has no 'state_dict' and is not a bare state dict of tensors")


def read_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Only the tensors of a checkpoint, by key."""
    return dict(read_checkpoint(path)["state_dict"])


def normalize_state_dict(state_dict: Mapping[str, torch.Tensor], model: nn.Module | Iterable[str]
                         ) -> dict[str, torch.Tensor]:
    """Map keys to the layout of `model` (or of its state-dict keys): CLIP text keys with or without
    `text_model.` (transformers 4 vs 5), stale `position_ids` buffers dropped."""
    expected = set(model.state_dict().keys() if isinstance(model, nn.Module) else model)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if key.endswith(STALE_KEY_SUFFIXES) and key not in expected:
            continue
        if key not in expected and key.startswith(TEXT_MODEL_PREFIX):
            rest = key[len(TEXT_MODEL_PREFIX):]
            alternative = (TEXT_MODEL_PREFIX + "text_model." + rest if not rest.startswith("text_model.")
                           else TEXT_MODEL_PREFIX + rest[len("text_model."):])
            if alternative in expected:
                key = alternative
        out[key] = value
    return out


# The initialisers of torch.nn's layers that check for a torch function mode first; on a weight built on the meta
# device they have nothing to do, and skipping them before they compute fans saves most of a layer's build time.
_INITIALISERS = frozenset({nn.init.kaiming_uniform_, nn.init.uniform_, nn.init.normal_, nn.init.constant_})


class _WeightsOnMeta(TorchFunctionMode):
    """A torch function mode (active in the thread that enters it only) in which `torch.empty` without a device, the
    storage of every torch.nn layer's weights, makes meta tensors, and initialisers skip meta tensors. Tensors made
    from values (`torch.tensor`, `zeros`, `full`, ...: the noise schedule, a learned log-variance) stay real."""

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: Optional[dict] = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.empty:
            if kwargs.get("device") is None:
                kwargs["device"] = "meta"
        elif func in _INITIALISERS:
            tensor = args[0] if args else kwargs["tensor"]
            if tensor.is_meta:
                return tensor
        return func(*args, **kwargs)


def no_weight_init() -> TorchFunctionMode:
    """A context in which modules are built with their weights on the meta device and without running their random
    initialisers: no memory is allocated or written for weights a checkpoint is about to replace. Load with
    `assign=True` (`load_state_dict_into` does so for such models); weights the checkpoint lacks are then given
    real storage by `materialise_missing`. Tensors made from values stay real (buffers such as the noise schedule
    are small and often computed). It changes nothing outside the thread that enters it: models built at the same
    time in other threads are built as usual."""
    return _WeightsOnMeta()


def materialise_missing(model: nn.Module) -> list[str]:
    """Give every tensor still on the meta device real storage and a proper initialisation: a module whose
    own parameters are all missing is reset with its initialiser, single missing tensors are zeroed
    (a lone bias, a textual-inversion vector set later). Returns the names of the tensors materialised."""
    materialised = []
    for owner_name, module in model.named_modules():
        own = [(name, t) for name, t in itertools.chain(module._parameters.items(), module._buffers.items())
               if t is not None and t.is_meta]
        if not own:
            continue
        all_parameters_missing = all(t is None or t.is_meta for t in module._parameters.values())
        for name, tensor in own:
            data = torch.zeros(tensor.shape, dtype=tensor.dtype)
            if name in module._parameters:
                module._parameters[name] = nn.Parameter(data, requires_grad=tensor.requires_grad)
            else:
                module._buffers[name] = data
            materialised.append(f"{owner_name}.{name}" if owner_name else name)
        if all_parameters_missing and hasattr(module, "reset_parameters"):
            module.reset_parameters()
    return materialised


def _describe(keys: Sequence[str]) -> str:
    shown = ", ".join(list(keys)[:MAX_KEYS_IN_MESSAGE])
    more = len(keys) - MAX_KEYS_IN_MESSAGE
    return shown + (f" and {more} more" if more > 0 else "")


def _shape_mismatches(own: Mapping[str, torch.Tensor], state_dict: Mapping[str, torch.Tensor]) -> list[str]:
    return [f"{key} {tuple(value.shape)} vs model {tuple(own[key].shape)}" for key, value in state_dict.items()
            if key in own and tuple(own[key].shape) != tuple(value.shape)]


def _initialise_missing(model: nn.Module) -> None:
    """Give weights the checkpoint lacks a proper initialisation (they were built without storage)."""
    materialised = materialise_missing(model)
    if getattr(model, "use_ema", False) and any(key.startswith("model_ema.") for key in materialised):
        model.model_ema = type(model.model_ema)(model.model)  # a fresh EMA, seeded from the loaded weights


def load_state_dict_into(model: nn.Module, source: str | os.PathLike | Mapping[str, torch.Tensor],
                         ignore_prefixes: Sequence[str] = (), strip_prefix: str = "",
                         dtype: Optional[torch.dtype] = None, assign: bool = False,
                         min_matched_fraction: float = 0.5) -> tuple[list[str], list[str]]:
    """Load a checkpoint (path or state dict) into `model`; returns (missing, unexpected) keys.

    Keys starting with any of `ignore_prefixes` are dropped; `strip_prefix` is removed from the
    keys that have it. Shape mismatches, or a checkpoint that shares too few keys with the model,
    raise `CheckpointError` naming a few keys.
    """
    name = str(source) if not isinstance(source, Mapping) else "the state dict"
    state_dict = dict(source) if isinstance(source, Mapping) else read_state_dict(source)
    if strip_prefix:
        state_dict = {k[len(strip_prefix):]: v for k, v in state_dict.items() if k.startswith(strip_prefix)}
    state_dict = {k: v for k, v in state_dict.items() if not any(k.startswith(p) for p in ignore_prefixes)}
    slots = _tensor_slots(model)
    own = {key: getattr(module, "_parameters" if is_parameter else "_buffers")[name]
           for key, (module, name, is_parameter) in slots.items()}
    state_dict = normalize_state_dict(state_dict, own.keys())
    if not getattr(model, "use_ema", False):
        dropped = [k for k in state_dict if k.startswith("model_ema.")]
        if dropped:
            logger.info("ignoring %d EMA tensors (use_ema is off; the model's own weights are used)", len(dropped))
            state_dict = {k: v for k, v in state_dict.items() if not k.startswith("model_ema.")}
    mismatched = _shape_mismatches(own, state_dict)
    if mismatched:
        raise CheckpointError(f"{name} does not fit this model's architecture: {len(mismatched)} tensors have "
                              f"other shapes, e.g. {_describe(mismatched)}; check that the config matches the "
                              "checkpoint")
    matched = [k for k in state_dict if k in own]
    if own and len(matched) < min_matched_fraction * len(own):
        foreign = [k for k in state_dict if k not in own]
        raise CheckpointError(f"{name} does not fit this model: only {len(matched)} of its {len(state_dict)} tensors "
                              f"are in the model (e.g. unknown: {_describe(foreign)}); check that the config matches "
                              "the checkpoint")
    if dtype is not None:
        state_dict = {k: cast_weight(v, dtype) if v.is_floating_point() and own[k].is_floating_point()
                      and not _is_schedule_buffer(k) else v
                      for k, v in state_dict.items() if k in own}
    built_empty = any(t.is_meta for t in own.values())
    if assign or built_empty:
        missing, unexpected = _assign_tensors(slots, own, state_dict)
    else:
        result = model.load_state_dict(state_dict, strict=False)
        missing, unexpected = list(result.missing_keys), list(result.unexpected_keys)
    if missing:
        logger.warning("%d keys missing from %s (initialised afresh): %s", len(missing), name, _describe(missing))
    if built_empty and any(own[k].is_meta for k in missing):
        _initialise_missing(model)
    if unexpected:
        logger.warning("%d unexpected keys in %s (ignored): %s", len(unexpected), name, _describe(unexpected))
    return missing, unexpected


def _tensor_slots(model: nn.Module) -> dict[str, tuple[nn.Module, str, bool]]:
    """Where each state-dict entry lives: key -> (owning module, attribute name, is a parameter). The keys are
    those of `model.state_dict()` (no module here customises it), found in one walk."""
    slots = {}
    for prefix, module in model.named_modules(remove_duplicate=False):
        dot = prefix + "." if prefix else ""
        for name, param in module._parameters.items():
            if param is not None:
                slots[dot + name] = (module, name, True)
        for name, buffer in module._buffers.items():
            if buffer is not None and name not in module._non_persistent_buffers_set:
                slots[dot + name] = (module, name, False)
    return slots


def _assign_tensors(slots: Mapping[str, tuple[nn.Module, str, bool]], own: Mapping[str, torch.Tensor],
                    state_dict: Mapping[str, torch.Tensor]) -> tuple[list[str], list[str]]:
    """`load_state_dict(assign=True)` without its per-module overhead: the checkpoint's tensors become the
    model's, parameters keep their `requires_grad`."""
    for key, value in state_dict.items():
        if key not in slots:
            continue
        module, name, is_parameter = slots[key]
        if is_parameter:
            module._parameters[name] = nn.Parameter(value, requires_grad=own[key].requires_grad)
        else:
            module._buffers[name] = value
    return [k for k in own if k not in state_dict], [k for k in state_dict if k not in own]


def _is_schedule_buffer(key: str) -> bool:
    return key in SCHEDULE_BUFFERS


def model_config_section(config: Any) -> Any:
    """The `model` section of a whole config (a path is read as plain containers), or the config itself if it
    already is one."""
    if isinstance(config, (str, os.PathLike)):
        config = read_plain_config(config)
    if "model" in config and "target" not in config:
        return config["model"]
    return config


def load_model_from_config(config: Any, ckpt: Optional[str | os.PathLike | Mapping[str, torch.Tensor]],
                           device: str | torch.device = "cpu",
                           dtype: Optional[torch.dtype] = None, verbose: bool = False,
                           eval_mode: bool = True) -> nn.Module:
    """Build the model of `config` (path, whole config or its `model` section) and load `ckpt` into it.

    The model is built without random initialisation and the checkpoint's tensors are assigned to it
    (memory-mapped where the format allows), so loading is fast and needs the weights' memory once.
    `ckpt` may also be a state dict already read. With `ckpt=None` the model is initialised normally. The model
    ends on `device`, in eval mode, with floating weights in `dtype` (float32 if None, as the original loads fp16
    checkpoints; the noise schedule stays float32).
    """
    dtype = dtype or torch.float32
    section = model_config_section(config)
    if ckpt is None:
        model = instantiate_from_config(section)
    else:
        checkpoint = {"state_dict": ckpt} if isinstance(ckpt, Mapping) else read_checkpoint(ckpt)
        with no_weight_init():
            model = instantiate_from_config(section)
        if "global_step" in checkpoint:
            logger.info("checkpoint %s: global step %s", ckpt, checkpoint["global_step"])
        missing, unexpected = load_state_dict_into(model, checkpoint["state_dict"], dtype=dtype, assign=True)
        if verbose:
            logger.info("missing keys: %s; unexpected keys: %s", missing, unexpected)
    _cast_weights(model, dtype)
    device = torch.device(device)
    if device.type != "cpu":  # built and read on the CPU: elsewhere the model moves
        model.to(device)
    if eval_mode:
        model.eval()
    return model


def cast_weight(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """`tensor` in `dtype`. A convolution kernel that is copied for the cast anyway comes out channels-last, the
    layout of the UNet's activations: convolutions then read it as it is instead of reordering it on every call
    (5% of a bf16 UNet step on the CPU). Kernels loaded without a cast keep the file's layout and memory."""
    if tensor.dtype == dtype:
        return tensor
    layout = torch.channels_last if tensor.ndim == 4 else torch.preserve_format
    return tensor.to(dtype, memory_format=layout)


def _cast_weights(model: nn.Module, dtype: torch.dtype) -> None:
    """Cast floating parameters and buffers to `dtype`, keeping the diffusion schedule in float32."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None and param.is_floating_point() and param.dtype != dtype:
                module._parameters[key] = nn.Parameter(cast_weight(param.detach(), dtype),
                                                       requires_grad=param.requires_grad)
        for key, buffer in module._buffers.items():
            if (buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype
                    and not (module is model and key in SCHEDULE_BUFFERS)):
                module._buffers[key] = cast_weight(buffer, dtype)
