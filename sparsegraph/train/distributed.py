"""`sparsegraph train` under torchrun: the process group, the data-parallel wrapper, the batch shard.

torchrun sets RANK, WORLD_SIZE and LOCAL_RANK; with them `Distributed.from_env()` joins the process
group (gloo: the trainer runs on CPU) and the run trains data-parallel: DDP, or FSDP2 (`fsdp=True`,
`sg.dist.shard`: per block, then the root). Every rank draws the same global batch from the run's
generator and trains on its own slice, so the run follows the single-process one with the same
`--batch-size` (now the global batch), whatever the number of ranks. Only rank 0 writes logs.

    >>> d = Distributed.from_env({})            # no torchrun: one process, nothing to set up
    >>> d.world, d.is_main, d.shard_batch(torch.arange(4)).tolist()
    (1, True, [0, 1, 2, 3])
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..graph import SparsegraphError


@dataclass
class Distributed:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    fsdp: bool = False
    owns_group: bool = False  # this object started the process group (and ends it in close())

    @classmethod
    def from_env(cls, env=None, fsdp: bool = False) -> "Distributed":
        """The launch described by torchrun's environment variables; joins the process group."""
        env = os.environ if env is None else env
        if "WORLD_SIZE" not in env or "RANK" not in env:
            if fsdp:
                raise SparsegraphError("--fsdp shards across processes: launch with "
                                       "torchrun --nproc_per_node N -m sparsegraph.cli train ... --fsdp")
            return cls()
        d = cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)), fsdp)
        import torch.distributed as dist

        if not dist.is_initialized():  # a caller's own process group is used as it is
            dist.init_process_group("gloo")
            d.owns_group = True
        return d

    @property
    def active(self) -> bool:
        return self.world > 1 or self.fsdp

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def check_batch(self, batch_size: int) -> None:
        if batch_size % self.world:
            raise SparsegraphError(f"--batch-size {batch_size} (the global batch) must be a multiple of the "
                                   f"{self.world} processes")

    def shard_batch(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's slice of a global batch (the first axis)."""
        n = t.shape[0] // self.world
        return t[self.rank * n:(self.rank + 1) * n]

    def wrap(self, model: nn.Module) -> nn.Module:
        """The model to train: DDP around it, or the model itself sharded in place by FSDP2."""
        if not self.active:
            return model
        if self.fsdp:
            from ..dist import shard

            return shard(model)
        from torch.nn.parallel import DistributedDataParallel as DDP

        return DDP(model)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The average over ranks (of a loss: the global batch's loss)."""
        if not self.active:
            return value
        import torch.distributed as dist

        value = value.detach().clone()
        dist.all_reduce(value)
        return value / self.world

    def barrier(self) -> None:
        if self.active:
            import torch.distributed as dist

            dist.barrier()

    def close(self) -> None:
        import torch.distributed as dist

        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()
