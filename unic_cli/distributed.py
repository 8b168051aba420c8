"""The one place that reads the torchrun environment (rank, world size), plus collective helpers.

Below `commands/`, nothing else reads environment variables. When no process group is initialised (the
single-process case), every helper is a no-op, so library code can call them unconditionally.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistInfo:
    """Where this process sits in a torchrun launch."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def dist_info() -> DistInfo:
    """Rank, world size and local rank from torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK)."""
    env = os.environ
    return DistInfo(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))


def is_initialized() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def all_reduce_mean_(tensor: torch.Tensor) -> torch.Tensor:
    """Average `tensor` in place across processes (no-op without a process group); no host sync."""
    if is_initialized() and (world_size := torch.distributed.get_world_size()) > 1:
        torch.distributed.all_reduce(tensor)  # SUM then divide: gloo has no AVG
        tensor.div_(world_size)
    return tensor
