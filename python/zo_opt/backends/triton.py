"""The Triton backend (zo_kernels/): one multi-tensor launch per dtype and pass, z in registers.

Runs CUDA tensors; under TRITON_INTERPRET=1 (set before triton's first import) the same
kernels run as Python on CPU tensors instead, which is how the tests exercise them without a
GPU. The interpreter cannot run them on CUDA tensors: it copies only the argument tensors to
the host, and the kernel reaches the other tensors of a launch through the first one's pointer.
Importing this module raises ImportError when triton is missing, so the registry skips it.
"""
from __future__ import annotations

from typing import Sequence

import torch

from zo_kernels import exact as exact_kernels
from zo_kernels import exact_table
from zo_kernels import noise_axpby as kernels


class TritonBackend:
    name = "triton"

    def unavailable_reason(self) -> str | None:
        if kernels.INTERPRETED or torch.cuda.is_available():
            return None
        return "no CUDA device (set TRITON_INTERPRET=1 before importing triton to run on the CPU)"

    def supports(self, tensor: torch.Tensor) -> bool:
        device = "cpu" if kernels.INTERPRETED else "cuda"
        return tensor.device.type == device and tensor.dtype in kernels.DTYPES

    def noise_axpby_(self, params: Sequence[torch.Tensor], offsets: Sequence[int],
                     seeds: Sequence[int], scales: torch.Tensor, distribution: str) -> None:
        kernels.noise_axpby_(params, offsets, seeds, scales, distribution)

    def prepare(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        return kernels.prepare(params, offsets)

    def prepare_exact(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        """The exact pass of docs/EXACT.md (zo_kernels/exact.py): launch-only, capturable."""
        return exact_kernels.prepare_exact(params, offsets)

    count_special_ = staticmethod(exact_table.count_special_)  # the side table's two passes
    fill_special_ = staticmethod(exact_table.fill_special_)


BACKEND = TritonBackend()
