"""The processes of a run: one, or torchrun's ranks stepping data-parallel with DDP (nccl on GPU, gloo on CPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch
import torch.distributed as dist

from ..inference.ranks import join_process_group


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @classmethod
    def from_env(cls) -> "Distributed":
        """torchrun's RANK / WORLD_SIZE / LOCAL_RANK; a single process otherwise."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world == 1:
            return cls(device=torch.device("cuda" if torch.cuda.is_available() else "cpu"))
        rank, device = join_process_group()
        return cls(rank, world, device)


def any_rank(flag: bool, device: torch.device) -> bool:
    """Whether `flag` holds on some rank (itself, in a single process). Decisions that change which collective
    calls a rank makes (skip a step's backward, stop) must be the same on every rank, or the others wait forever."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    vote = torch.tensor(float(flag), device=device)
    dist.all_reduce(vote, op=dist.ReduceOp.MAX)
    return bool(vote.item())
