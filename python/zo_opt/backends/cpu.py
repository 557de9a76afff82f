"""The C++/OpenMP backend (csrc/cpu/): Philox and Box-Muller in registers, vectorized loops,
one parallel pass over the whole parameter list."""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension
from .runner import list_runner

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_int64(seed: int) -> int:
    """torch's int[] is signed: pass a uint64 seed as its two's-complement int64."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def call_op(params: Sequence[torch.Tensor], offsets: Sequence[int], seeds: Sequence[int],
            scales: torch.Tensor, distribution: str) -> None:
    """``torch.ops.zo_opt.noise_axpby_``: the compiled op, dispatched by device (CPU, CUDA)."""
    torch.ops.zo_opt.noise_axpby_(list(params), list(offsets), [as_int64(s) for s in seeds],
                                  scales, distribution)


class CpuBackend:
    name = "cpu"

    def unavailable_reason(self) -> str | None:
        return _extension.load()

    def supports(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cpu" and tensor.dtype in DTYPES

    noise_axpby_ = staticmethod(call_op)

    def prepare(self, params, offsets):
        return list_runner(self, params, offsets)


BACKEND = CpuBackend()
