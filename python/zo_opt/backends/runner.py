"""The runner of a prepared parameter list, and the one for backends that take Python ints."""
from __future__ import annotations

from typing import Callable, Sequence

import torch

MASK64 = 0xFFFFFFFFFFFFFFFF

Runner = Callable[[torch.Tensor, torch.Tensor, str], None]  # (seeds, scales, distribution)


def list_runner(backend, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> Runner:
    """A runner for a backend whose ``noise_axpby_`` takes the seeds as Python ints: it reads
    them on the host (a sync on a GPU, which only the reference backend has there)."""
    params, offsets = list(params), list(offsets)

    def run(seeds: torch.Tensor, scales: torch.Tensor, distribution: str) -> None:
        backend.noise_axpby_(params, offsets, [s & MASK64 for s in seeds.tolist()], scales,
                             distribution)

    return run
