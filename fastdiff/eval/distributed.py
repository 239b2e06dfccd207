"""Where a process stands in a torchrun-style launch, and the few collectives evaluation needs.

torchrun (and `accelerate launch`, SLURM's srun with the same variables) sets RANK, WORLD_SIZE and
LOCAL_RANK; the process group is torch.distributed's own (gloo on CPU, NCCL on CUDA), made from
them by `init_process_group("env://")`. One process (no WORLD_SIZE, or 1) needs no group and none
is made, so a plain run never touches torch.distributed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, List


@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun-style launch (RANK, WORLD_SIZE, LOCAL_RANK)."""
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_env(cls, environ=None) -> "Ranks":
        environ = os.environ if environ is None else environ
        values = {}
        for name, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
            text = environ.get(name)
            try:
                values[name] = default if text in (None, "") else int(text)
            except ValueError:
                raise ValueError(f"{name}={text!r} is not an integer (torchrun sets it)") from None
        rank, world = values["RANK"], values["WORLD_SIZE"]
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} and WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        local = rank if values["LOCAL_RANK"] is None else values["LOCAL_RANK"]
        return cls(rank, world, local)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


class ProcessGroup:
    """torch.distributed for a launch of several processes; nothing for one."""

    def __init__(self, ranks: Ranks, device):
        self.ranks, self.owned = ranks, False
        if not ranks.distributed:
            return
        import torch
        import torch.distributed as dist

        self.dist = dist
        self.device_ids = None
        if not dist.is_initialized():
            cuda = torch.device(device).type == "cuda"
            dist.init_process_group("nccl" if cuda else "gloo")
            self.owned = True
        if dist.get_backend() == "nccl":
            self.device_ids = [torch.device(device).index or 0]

    def barrier(self) -> None:
        if self.ranks.distributed:
            self.dist.barrier(device_ids=self.device_ids) if self.device_ids else self.dist.barrier()

    def gather(self, value: Any) -> List[Any]:
        """Every rank's `value` (picklable), in rank order, on every rank."""
        if not self.ranks.distributed:
            return [value]
        out: List[Any] = [None] * self.ranks.world_size
        self.dist.all_gather_object(out, value)
        return out

    def close(self) -> None:
        if self.owned:
            self.dist.destroy_process_group()


def chunks(n: int, batch_size: int) -> List[range]:
    """Indices 0..n-1 in fixed batches: chunk k = [k * batch_size, (k + 1) * batch_size). Work is
    dealt out by chunk (rank r takes every world_size-th), so an item is always computed in the
    same batch whatever the number of processes."""
    return [range(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
