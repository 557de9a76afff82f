"""Describes a list of same-dtype tensors to a multi-tensor kernel: one launch, many tensors.

Triton takes no arrays of pointers, so every tensor is addressed from one base pointer (the
tensor with the lowest address) plus an element offset; the GPU and the interpreter on the
CPU both address memory flatly, so the offset may cross allocations.

The kernel walks each tensor in tiles of ``block`` elements laid out in *global index* space:
tile 0 of tensor k starts at the global index ``o_k - lead_k`` with ``lead_k = o_k mod 128``,
so every tile starts on a fresh Philox counter for both distributions, whatever the offsets.
Elements before ``lead_k`` or past the tensor are masked.

One row per tensor, int64: ``[ptr_origin, lo, hi, g_origin, first_block]``
    ptr_origin   element offset from the base pointer of tile 0's first slot (may be < 0)
    lo, hi       slots [lo, hi) of the tensor's tiles hold its elements (lo = lead_k)
    g_origin     global index of tile 0's first slot (a multiple of 128)
    first_block  program id of the tensor's tile 0
plus ``block_map[pid]`` = the tensor (row) that program ``pid`` works on.

Tables are cached per (device, dtype, addresses, sizes, offsets): an optimizer passes the same
parameters every pass, so only its first call builds and uploads one.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass
from typing import Sequence

import torch

ALIGN = 128  # NOISE.md: one Rademacher counter covers 128 elements, one Gaussian counter 4
ROW = 5  # int64 columns per tensor
VECTOR_BYTES = 16  # widest load the kernel can issue per thread
CACHE_SIZE = 16


@dataclass(frozen=True)
class Table:
    rows: torch.Tensor  # int64 [T * ROW] on the tensors' device
    block_map: torch.Tensor  # int32 [n_blocks] on the tensors' device
    n_blocks: int
    base_index: int  # which tensor of the list is the base pointer
    aligned: bool  # every tile starts 16-byte aligned: the kernel may vectorize


_cache: OrderedDict[tuple, Table] = OrderedDict()


def device_of(tensors: Sequence[torch.Tensor]):
    """The context a launch on ``tensors`` runs in: their GPU (nothing under the interpreter)."""
    device = tensors[0].device
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def by_dtype(tensors: Sequence[torch.Tensor], offsets: Sequence[int]) -> list[tuple[list, list]]:
    """(tensors, offsets) per dtype among the non-empty ``tensors``: one launch each."""
    groups: dict[torch.dtype, tuple[list, list]] = {}
    for t, o in zip(tensors, offsets):
        if t.numel():
            ts, os_ = groups.setdefault(t.dtype, ([], []))
            ts.append(t)
            os_.append(o)
    return list(groups.values())


def table_for(tensors: Sequence[torch.Tensor], offsets: Sequence[int], block: int) -> Table:
    """The (cached) table of ``tensors``, which share one device and dtype."""
    key = (tensors[0].device, tensors[0].dtype, block,
           tuple((t.data_ptr(), t.numel(), int(o)) for t, o in zip(tensors, offsets)))
    table = _cache.get(key)
    if table is None:
        table = _build(key[3], tensors[0].element_size(), tensors[0].device, block)
        _cache[key] = table
        if len(_cache) > CACHE_SIZE:
            _cache.popitem(last=False)
    else:
        _cache.move_to_end(key)
    return table


def _build(layout: tuple, elem: int, device: torch.device, block: int) -> Table:
    ptrs = [ptr for ptr, _, _ in layout]
    base_index = min(range(len(ptrs)), key=ptrs.__getitem__)
    base = ptrs[base_index]
    rows, counts, first, aligned = [], [], 0, base % VECTOR_BYTES == 0
    for ptr, numel, offset in layout:
        if (ptr - base) % elem:
            raise ValueError(f"tensor at {ptr:#x} is not aligned to its {elem}-byte elements")
        lead = offset % ALIGN
        ptr_origin = (ptr - base) // elem - lead
        n = -(-(lead + numel) // block) if numel else 0
        rows.append([ptr_origin, lead, lead + numel, offset - lead, first])
        counts.append(n)
        first += n
        aligned &= (ptr_origin * elem) % VECTOR_BYTES == 0
    block_map = torch.repeat_interleave(torch.arange(len(layout), dtype=torch.int32),
                                        torch.tensor(counts, dtype=torch.int64))
    return Table(rows=torch.tensor(rows, dtype=torch.int64).reshape(-1).to(device),
                 block_map=block_map.to(device), n_blocks=first, base_index=base_index,
                 aligned=aligned)
