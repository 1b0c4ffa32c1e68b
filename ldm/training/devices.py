"""Which devices a run trains on: `--gpus` (Lightning's device list) and the config's trainer settings."""
from __future__ import annotations

from typing import Any, Optional

import torch

from ldm.errors import UserInputError


def parse_gpus(gpus: Optional[str]) -> Optional[list[int]]:
    """Lightning's device list: "0," -> [0], "0,1" -> [0, 1]; None or "" -> None (train on the CPU)."""
    if gpus is None or not str(gpus).strip(" ,"):
        return None
    try:
        return [int(item) for item in str(gpus).split(",") if item.strip()]
    except ValueError as error:
        raise UserInputError(f"--gpus must list device numbers like 0, or 0,1 (got {gpus!r})") from error


def device_settings(trainer_config: dict[str, Any], gpus: Optional[str]) -> int:
    """Fill accelerator/devices/strategy into `trainer_config` in place; return the number of devices."""
    legacy_gpus = trainer_config.pop("gpus", None)
    if trainer_config.get("accelerator") in ("ddp", "dp"):
        trainer_config["strategy"] = trainer_config.pop("accelerator")
    devices = parse_gpus(gpus if gpus is not None else legacy_gpus)
    if devices is not None:
        if torch.cuda.is_available():
            trainer_config["accelerator"] = "gpu"
            trainer_config["devices"] = devices
        elif torch.backends.mps.is_available() and len(devices) == 1:
            trainer_config["accelerator"] = "mps"
            trainer_config["devices"] = 1
        else:
            raise UserInputError(f"--gpus {gpus} asks for GPUs but none is available here; leave --gpus out to "
                                 "train on the CPU")
    else:
        trainer_config.setdefault("accelerator", "cpu")
        trainer_config.setdefault("devices", 1)
    count = trainer_config["devices"]
    count = len(count) if isinstance(count, (list, tuple)) else int(count)
    if count > 1 or int(trainer_config.get("num_nodes", 1)) > 1:
        trainer_config.setdefault("strategy", "ddp")
    return count
