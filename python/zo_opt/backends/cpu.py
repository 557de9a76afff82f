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

    def prepare_exact(self, params, offsets):
        return exact_runner(params, offsets)

    @staticmethod
    def count_special_(params, offsets, code_base, tau, counts):
        """The side table's counts (docs/EXACT.md), one parallel pass (csrc/cpu/exact_table_cpu.cpp)."""
        torch.ops.zo_opt.exact_table_count_(list(params), list(offsets), int(code_base),
                                            float(tau), counts)

    @staticmethod
    def fill_special_(params, offsets, code_base, tau, chunk_base, bits):
        torch.ops.zo_opt.exact_table_fill_(list(params), list(offsets), int(code_base),
                                           float(tau), chunk_base, bits)


def exact_runner(params: Sequence[torch.Tensor], offsets: Sequence[int]):
    """The exact pass of docs/EXACT.md over a fixed list (``zo_opt::noise_axpby_exact_``):
    ``run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution)``
    with ``seeds`` an int64 tensor of uint64 bits (the rounding seed last with ``rounding``),
    ``scales`` float32 ``[alpha, a_1..a_n_old, c_1..c_n_new]`` and ``table`` an
    ``exact.Table``. One parallel pass, no host sync beyond the op call."""
    params, offsets = list(params), list(offsets)
    op = torch.ops.zo_opt.noise_axpby_exact_

    def run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution):
        op(params, offsets, seeds.to("cpu", torch.int64).contiguous(),
           scales.to("cpu", torch.float32).contiguous(), int(n_old), codes, int(code_base),
           table.chunk_base, table.bits, float(table.tau), bool(encode), bool(rounding),
           distribution)

    return run


BACKEND = CpuBackend()
