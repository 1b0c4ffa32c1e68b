"""The processes of one evaluation: one without torch.distributed, or the ranks `torchrun` starts (RANK,
WORLD_SIZE, LOCAL_RANK in the environment), joined with gloo on the CPU and NCCL on CUDA."""
from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Mapping, Optional

import torch

from ldm.errors import UserInputError

BARRIER_TIMEOUT = datetime.timedelta(hours=48)
"""How long the first rank to finish waits for the others (ranks may finish hours apart on a large sweep)."""


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def ranks_from_env(env: Optional[Mapping[str, str]] = None) -> Ranks:
    """This process's rank from torchrun's variables; one process when WORLD_SIZE is not set."""
    env = os.environ if env is None else env
    if "WORLD_SIZE" not in env:
        return Ranks()
    try:
        ranks = Ranks(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", env["RANK"])))
    except (KeyError, ValueError) as error:
        raise UserInputError(f"RANK, WORLD_SIZE and LOCAL_RANK must be integers (as torchrun sets them): {error}"
                             ) from error
    if not 0 <= ranks.rank < ranks.world_size:
        raise UserInputError(f"RANK {ranks.rank} is not below WORLD_SIZE {ranks.world_size}")
    return ranks


def rank_device(ranks: Ranks, device: torch.device) -> torch.device:
    """A CUDA device is `cuda:LOCAL_RANK` under torchrun; anything else as chosen."""
    if ranks.distributed and device.type == "cuda":
        return torch.device("cuda", ranks.local_rank)
    return device


def join(ranks: Ranks, device: torch.device) -> None:
    """Join the process group (NCCL on CUDA, gloo elsewhere); nothing with one process."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", rank=ranks.rank,
                            world_size=ranks.world_size, timeout=BARRIER_TIMEOUT)


def barrier(ranks: Ranks, device: torch.device) -> None:
    """Wait until every rank got here; nothing with one process."""
    if not ranks.distributed:
        return
    import torch.distributed as dist

    dist.barrier(device_ids=[device.index] if device.type == "cuda" else None)


def leave(ranks: Ranks) -> None:
    """Leave the process group, if this process joined one."""
    import torch.distributed as dist

    if ranks.distributed and dist.is_initialized():
        dist.destroy_process_group()
