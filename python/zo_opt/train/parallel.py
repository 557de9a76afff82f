"""Data parallel training under ``torchrun``: what each rank does differently.

ZO steps need nothing here: ``ZOOptimizer`` picks up the default process group, every rank
evaluates the same directions on its shard of the batch, and one all-reduce of O(q) scalars
keeps the ranks identical. This module shards the batches, averages BP gradients (FO and
Calibrate steps) and checks at the end that the ranks still agree. Rank 0 alone writes logs,
CSV rows, checkpoints and plots.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's rows of a global batch (rank, rank + world, ...)."""
        return batch[self.rank::self.world]

    def average_gradients(self, params) -> None:
        if self.world > 1:
            grads = [p.grad for p in params if p.grad is not None]
            for g in grads:
                dist.all_reduce(g)
            torch._foreach_div_(grads, float(self.world))

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean over ranks of a scalar (detached)."""
        if self.world == 1:
            return value.detach()
        t = value.detach().to(torch.float64).reshape(1).clone()
        dist.all_reduce(t)
        return t[0] / self.world

    def agree(self, params) -> bool:
        """Whether every rank holds the same parameters (a float64 checksum's min == max)."""
        if self.world == 1:
            return True
        s = torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1)
        lo, hi = s.clone(), s.clone()
        dist.all_reduce(lo, op=dist.ReduceOp.MIN)
        dist.all_reduce(hi, op=dist.ReduceOp.MAX)
        return bool(lo == hi)


def setup(device_flag: str) -> tuple[Ranks, str]:
    """Joins the process group when torchrun started us; returns the ranks and the device
    flag to use (cuda ranks take the GPU of their LOCAL_RANK)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return Ranks(), device_flag
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if v not in os.environ]
    if missing:
        sys.exit(f"zo-train: error: WORLD_SIZE={world} is set but {', '.join(missing)} "
                 f"{'is' if len(missing) == 1 else 'are'} not: start data-parallel runs with "
                 "torchrun --nproc_per_node N -m zo_opt.train ..., or unset WORLD_SIZE for one process")
    use_cuda = device_flag != "cpu" and torch.cuda.is_available()
    local = int(os.environ.get("LOCAL_RANK", "0"))
    if use_cuda and local >= torch.cuda.device_count():
        n = torch.cuda.device_count()
        sys.exit(f"zo-train: error: torchrun started local rank {local} but this node has {n} CUDA "
                 f"device(s), one a rank: use --nproc_per_node {n}, or --device cpu")
    dist.init_process_group("nccl" if use_cuda else "gloo")
    if use_cuda:
        torch.cuda.set_device(local)
        device_flag = f"cuda:{local}"
    return Ranks(dist.get_rank(), dist.get_world_size()), device_flag


def teardown(ranks: Ranks) -> None:
    # Every rank tears down together: once (of ~10 CI runs, under load) rank 0 aborted in
    # gloo's teardown at exit ("terminate called without an active exception") with rank 1
    # already gone.
    if ranks.world > 1:
        dist.barrier()
        dist.destroy_process_group()
