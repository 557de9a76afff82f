"""The CUDA C++ backend (csrc/cuda/): one multi-tensor launch per pass, Philox and
Box-Muller in registers, 16-byte vector accesses. Present when zo_opt's kernels were built
with nvcc against a CUDA torch (ahead of time by setup.py, or on first use)."""
from __future__ import annotations

import torch

from .. import _extension
from .cpu import call_op

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP = "zo_opt::noise_axpby_"


class CudaBackend:
    name = "cuda"

    def unavailable_reason(self) -> str | None:
        if torch.version.cuda is None:
            return "torch has no CUDA (torch.version.cuda is None)"
        if not torch.cuda.is_available():
            return "no CUDA device is visible (torch.cuda.is_available() is False)"
        reason = _extension.load()
        if reason is not None:
            return reason
        if not torch._C._dispatch_has_kernel_for_dispatch_key(OP, "CUDA"):
            return ("zo_opt's kernels were built without CUDA (no nvcc at build time); "
                    "reinstall with nvcc on PATH or CUDA_HOME set")
        return None

    def supports(self, tensor: torch.Tensor) -> bool:
        return tensor.device.type == "cuda" and tensor.dtype in DTYPES

    noise_axpby_ = staticmethod(call_op)


BACKEND = CudaBackend()
