"""Several processes through torchrun / DistributedDataParallel: one process per device.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK (and the rendezvous address); a plain
``ei train`` sees none of them and runs as a world of one with the same code path.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .config import ConfigError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        """Only the main process writes files and prints."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1


def pick_device(requested: str, local_rank: int, key: str = "runtime.device") -> torch.device:
    """`requested` (auto, cpu, cuda or cuda:N) as a device; `key` names it in errors."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    if requested != "cpu" and re.fullmatch(r"cuda(:\d+)?", requested) is None:
        raise ConfigError(f"{key}: expected auto, cpu, cuda or cuda:N, got {requested!r}")
    if requested.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{key}: {requested!r} asked for, but CUDA is not available")
        index = int(requested.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise ConfigError(f"{key}: {requested!r} asked for, but this machine has "
                              f"{torch.cuda.device_count()} CUDA devices")
        # Under torchrun each process takes the GPU of its local rank.
        return torch.device(requested if ":" in requested else f"cuda:{local_rank}")
    return torch.device("cpu")


def init(requested_device: str = "auto") -> World:
    """Join the process group torchrun describes (gloo on CPU, nccl on GPU), if any."""
    size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(requested_device, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return World(rank, size, local_rank, device)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def all_ranks(flag: bool, world: World, device: torch.device) -> bool:
    """Whether `flag` holds on every rank: a decision all ranks act on together, so none is
    left waiting in a collective the others have left."""
    if not world.distributed:
        return flag
    value = torch.tensor(int(flag), device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MIN)
    return bool(value.item())


def all_gather_objects(obj, world: World) -> list:
    """Every rank's `obj`, in rank order (a list of one without a process group)."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def shutdown(world: World) -> None:
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()
