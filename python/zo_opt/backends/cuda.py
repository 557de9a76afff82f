"""The CUDA C++ backend (csrc/cuda/): one multi-tensor launch per pass, Philox and
Box-Muller in registers, 16-byte vector accesses. Present when zo_opt's kernels were built
with nvcc against a CUDA torch (ahead of time by setup.py, or on first use).

Two ways in:
* ``noise_axpby_(params, offsets, seeds, scales, distribution)``, the backend primitive
  (``zo_opt::noise_axpby_``): packs and uploads the tensor table on every call;
* ``prepare(params, offsets)``, for a parameter list that stays fixed (an optimizer's): the
  table is built and uploaded once (``zo_opt::cuda_table``) and each pass is one launch
  (``zo_opt::noise_axpby_table_``) with seeds and scales already on the device: no per-call
  host work beyond the op call, no host->device copy, no sync, no allocation, so a pass can
  be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension
from .cpu import call_op

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
OP = "zo_opt::noise_axpby_"


class PreparedCuda:
    """One pass over a fixed parameter list: ``run(seeds, scales, distribution)``.

    ``seeds``: int64 tensor [q] on the params' device (uint64 seeds as their two's-complement
    bits, ``cpu.as_int64``); ``scales``: contiguous float32 tensor [1 + q] on the same device,
    ``[alpha, c_1 .. c_q]``. Each call does ``params[k] = alpha * params[k] + sum_i c_i *
    z_k(seeds[i])`` in one launch on the current stream.

    The table holds the params' data pointers. The object keeps the storages it was built
    from alive, even if a parameter's ``.data`` is later replaced (so the table never points
    at freed memory, and a new storage can never land at an old address); ``matches(params)``
    says whether the list still has the same storages, and a caller re-prepares when it does
    not. Empty tensors are left out of the table (they own no work).
    """

    def __init__(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        params, offsets = list(params), list(offsets)
        if len(params) != len(offsets):
            raise ValueError(f"{len(params)} tensors but {len(offsets)} offsets")
        # What matches() compares: one tuple per param, empty ones included (so the caller
        # can pass the same list it prepared).
        self.data_ptrs = tuple(p.data_ptr() for p in params)
        self.numels = tuple(p.numel() for p in params)
        kept = [(p, o) for p, o in zip(params, offsets) if p.numel() > 0]
        # detach(): new tensors on the same storages, unaffected by a later p.data = ...
        self._storages = tuple(p.detach() for p, _ in kept)
        self.n_tensors = len(kept)
        self.device = kept[0][0].device if kept else None
        self.table, self.n_tiles, self._launch = None, 0, None
        if kept:
            table, n_tiles = torch.ops.zo_opt.cuda_table([p for p, _ in kept], [o for _, o in kept])
            self.table, self.n_tiles = table, int(n_tiles)
            self._launch = torch.ops.zo_opt.noise_axpby_table_.default

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        """Whether ``params`` are the tensors (storage start and size) this was built from:
        about 0.3 us a tensor, so once per step rather than once per pass."""
        return (tuple(map(torch.Tensor.data_ptr, params)) == self.data_ptrs
                and tuple(map(torch.Tensor.numel, params)) == self.numels)

    def __call__(self, seeds: torch.Tensor, scales: torch.Tensor, distribution: str) -> None:
        if self.n_tiles == 0:
            return
        self._launch(self.table, self.n_tensors, self.n_tiles, seeds, scales, distribution)

    run = __call__


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

    def prepare(self, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> PreparedCuda:
        """A callable ``run(seeds, scales, distribution)`` for this fixed list (PreparedCuda).
        The tensors must be contiguous CUDA float32/float16/bfloat16 tensors on one device,
        offsets non-negative multiples of 128 (``noise.offsets``); checked here, once."""
        return PreparedCuda(params, offsets)


BACKEND = CudaBackend()
