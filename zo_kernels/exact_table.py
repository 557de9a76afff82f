"""The side table of docs/EXACT.md as two multi-tensor Triton kernels, one launch per dtype
each (reference: zo_opt.exact.count_special_ / fill_special_):

    count: counts[c] = the special elements of 128-element table chunk c
    fill:  bits[chunk_base[c] + rank in chunk] = the raw bits of each of them

with the exclusive prefix sum ``chunk_base`` of the counts taken by the caller in between.
Tiles are [BLOCK/128, 128] (tensor_table.py rows; 128-aligned offsets, so a row is a chunk);
the rank is an exclusive tl.cumsum along the row. Neither kernel allocates, and each reads
theta once, so a table costs two reads of the parameters, not the per-slice mask, compaction
and host sync of the reference.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .exact import BIGS, CHUNK, _bits_of, dtype_launches, special
from .noise_axpby import in_tile, load_tile, tile
from .tensor_table import VECTOR_BYTES, device_of

BLOCK = 4096  # a program's slots: 32 table chunks
# The kernels' compile options. Contraction is named, not left to the default (Triton 3.9
# warns at the first launch that its default changes in 3.10); they have no multiply-add.
OPTIONS = {"num_warps": 8, "enable_fp_fusion": False}


@triton.jit
def _chunk_tile(base_ptr, rows_ptr, block_map_ptr, code_base, tau, BIG: tl.constexpr,
                ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    """One program's [BLOCK/128, 128] tile: the loaded values, which are special, each row's
    table chunk and whether the row holds any of the tensor's elements (a row past the
    tensor's end may be the next tensor's chunk: it must not be written)."""
    ptrs, slots, interior, g0, left = tile(base_ptr, rows_ptr, block_map_ptr, 128, ALIGNED,
                                           VEC, BLOCK, 1)
    x = load_tile(ptrs, slots, interior)
    found = special(x.to(tl.float32), tau, BIG) & in_tile(slots)
    r = tl.arange(0, BLOCK // 128)
    return x, found, (g0 - code_base) // 128 + r, r * 128 < left  # lo is 0: 128-aligned offsets


@triton.jit
def count_kernel(base_ptr, rows_ptr, block_map_ptr, counts_ptr, code_base, tau,
                 BIG: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    _, found, chunk, used = _chunk_tile(base_ptr, rows_ptr, block_map_ptr, code_base, tau, BIG,
                                        ALIGNED, VEC, BLOCK)
    tl.store(counts_ptr + chunk, tl.sum(found.to(tl.int32), axis=1), mask=used)


@triton.jit
def fill_kernel(base_ptr, rows_ptr, block_map_ptr, chunk_base_ptr, bits_ptr, code_base, tau,
                BIG: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr, BLOCK: tl.constexpr):
    DT: tl.constexpr = base_ptr.dtype.element_ty
    x, found, chunk, used = _chunk_tile(base_ptr, rows_ptr, block_map_ptr, code_base, tau, BIG,
                                        ALIGNED, VEC, BLOCK)
    e = found.to(tl.int32)
    rank = tl.cumsum(e, axis=1) - e
    first = tl.load(chunk_base_ptr + chunk, mask=used, other=0)
    tl.store(bits_ptr + (first[:, None] + rank), _bits_of(x, DT), mask=found)


def count_special_(params: Sequence[torch.Tensor], offsets: Sequence[int], code_base: int,
                   tau: float, counts: torch.Tensor) -> None:
    """counts[c] (int32) for the chunks ``params`` cover, chunk c at global index
    ``code_base + 128 c``."""
    _check(code_base, counts, "counts")
    for ps, tt in dtype_launches(params, offsets, BLOCK):
        with device_of(ps):
            count_kernel[(tt.n_blocks,)](ps[tt.base_index], tt.rows, tt.block_map, counts,
                                         code_base, float(tau), **_constants(ps, tt))


def fill_special_(params: Sequence[torch.Tensor], offsets: Sequence[int], code_base: int,
                  tau: float, chunk_base: torch.Tensor, bits: torch.Tensor) -> None:
    """The special elements' raw bits (int32) at their slots of ``bits``."""
    _check(code_base, chunk_base, "chunk_base")
    _check(code_base, bits, "bits")
    for ps, tt in dtype_launches(params, offsets, BLOCK):
        with device_of(ps):
            fill_kernel[(tt.n_blocks,)](ps[tt.base_index], tt.rows, tt.block_map, chunk_base,
                                        bits, code_base, float(tau), **_constants(ps, tt))


def _constants(ps, tt) -> dict:
    return dict(BIG=BIGS[ps[0].dtype], ALIGNED=tt.aligned, VEC=VECTOR_BYTES // ps[0].element_size(),
                BLOCK=BLOCK, **OPTIONS)


def _check(code_base: int, t: torch.Tensor, name: str) -> None:
    if code_base % CHUNK:
        raise ValueError(f"code_base {code_base} is not a multiple of {CHUNK}")
    if t.dtype != torch.int32 or t.dim() != 1 or not t.is_contiguous():
        raise TypeError(f"{name} must be a contiguous int32 vector, not {t.dtype} {tuple(t.shape)}")
