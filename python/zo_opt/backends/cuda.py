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
  be captured in a CUDA graph;
* ``prepare_exact(params, offsets)``: the exact pass of docs/EXACT.md on the same table
  (``zo_opt::noise_axpby_exact_table_``), as capturable.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .. import _extension, exact
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
    from alive, even if a parameter's ``.data`` is later replaced, so the table never points
    at freed memory; ``functional.Prepared.matches`` tells a caller when to prepare again.
    Empty tensors are left out of the table (they own no work).
    """

    def __init__(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        params, offsets = list(params), list(offsets)
        if len(params) != len(offsets):
            raise ValueError(f"{len(params)} tensors but {len(offsets)} offsets")
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

    def __call__(self, seeds: torch.Tensor, scales: torch.Tensor, distribution: str) -> None:
        if self.n_tiles == 0:
            return
        self._launch(self.table, self.n_tensors, self.n_tiles, seeds, scales, distribution)

    run = __call__


CHUNK = 128  # table chunks (zo_opt.exact.CHUNK): offsets and code_base are multiples of it


class PreparedCudaExact:
    """The exact pass of docs/EXACT.md over a fixed parameter list (csrc/cuda/exact.cu):
    ``run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution)``,
    runner.exact_list_runner's signature. The tensor table is PreparedCuda's (built once); a
    call checks metadata and Python ints only and launches once on the current stream (no
    copy, no sync, no allocation: graph-capturable). ``seeds``: int64 [n_old + n_new (+1, the
    rounding seed, with ``rounding``)]; ``scales``: float32 [1 + n_old + n_new]; ``codes``:
    int8, ``codes[g - code_base]``; ``table``: a zo_opt.exact.Table; all on the params' device.
    """

    def __init__(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        params, offsets = list(params), list(offsets)
        for p, o in zip(params, offsets):
            if o % CHUNK:
                raise ValueError(f"offset {o} is not a multiple of {CHUNK}: the exact pass needs "
                                 "128-aligned offsets")
        self.prepared = PreparedCuda(params, offsets)
        self.span = exact.extent([p.numel() for p in params], offsets)  # the codes and chunks it touches
        self._launch = torch.ops.zo_opt.noise_axpby_exact_table_.default if self.prepared.n_tiles else None

    def __call__(self, seeds: torch.Tensor, scales: torch.Tensor, n_old: int, codes: torch.Tensor,
                 code_base: int, table, encode: bool, rounding: bool, distribution: str) -> None:
        n_old, code_base, encode, rounding = int(n_old), int(code_base), bool(encode), bool(rounding)
        exact.check_pass_args(seeds, scales, n_old, codes, code_base, table, encode, rounding,
                              distribution, self.span)
        if self.prepared.n_tiles == 0:
            return
        if scales.dtype != torch.float32:
            scales = scales.to(torch.float32)
        p = self.prepared
        self._launch(p.table, p.n_tensors, p.n_tiles, seeds, scales.contiguous(), n_old, codes,
                     code_base, table.chunk_base, table.bits, float(table.tau), encode, rounding,
                     distribution)

    run = __call__


def _table_passes():
    try:
        from zo_kernels import exact_table, noise_axpby
    except ImportError:
        return exact.count_special_, exact.fill_special_
    if noise_axpby.INTERPRETED:  # the interpreter runs CPU tensors only
        return exact.count_special_, exact.fill_special_
    return exact_table.count_special_, exact_table.fill_special_


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

    def prepare_exact(self, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> PreparedCudaExact:
        """The exact pass (docs/EXACT.md) over this fixed list: one capturable launch per call
        (PreparedCudaExact); offsets must be multiples of 128."""
        return PreparedCudaExact(params, offsets)

    # The side table is two short passes that any GPU kernel does at bandwidth: the Triton
    # ones when triton is installed (GPU machines have it beside torch), else the reference.
    count_special_, fill_special_ = map(staticmethod, _table_passes())


BACKEND = CudaBackend()
