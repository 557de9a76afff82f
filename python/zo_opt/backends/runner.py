"""The runners of a prepared parameter list, and those for backends that take Python ints.

A runner does one pass: ``run(seeds, scales, distribution)`` for the plain pass, and
``run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution)`` for
the exact pass of docs/EXACT.md (``table`` an ``exact.Table``; with ``rounding`` the last
seed is the rounding seed).
"""
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


ExactRunner = Callable[..., None]


def exact_list_runner(exact_pass_, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> ExactRunner:
    """An exact runner over a function taking the seeds as Python ints (reads them on the host)."""
    params, offsets = list(params), list(offsets)

    def run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution):
        ints = [s & MASK64 for s in seeds.tolist()]
        rounding_seed = ints.pop() if rounding else None
        exact_pass_(params, offsets, ints, scales, n_old, codes, code_base, table,
                    encode=encode, rounding_seed=rounding_seed, distribution=distribution)

    return run
