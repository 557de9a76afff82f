"""Exact restore and stochastic rounding for low-precision parameters (docs/EXACT.md).

The executable specification of the exact pass, in plain torch, that every backend matches
bit for bit (Rademacher) or up to the float32 rounding of Box-Muller (Gaussian):

* ``build_table(params, offsets, tau)``: the side table of the elements too small (or too
  large, or not finite) for a one-byte code: ``chunk_base`` (int32, per 128-element chunk of
  the group's global index range: how many such elements come before it) and ``bits`` (their
  raw bits, int32, in global index order); counted, summed, then filled
  (``count_special_`` / ``fill_special_``, the passes every backend implements).
* ``exact_pass_(...)``: one pass that first recovers theta exactly from the stored value,
  the code and the old displacement, then stores the new value (and its code).
* ``stochastic_round(y, dtype, words)``: float32 -> float16/bfloat16, rounding up with
  probability equal to the distance from the value below over the gap (unbiased).
* ``rounding_words(indices, seed)``: the random word of each element for that rounding.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import noise

CHUNK = 128  # table chunks: the alignment of every tensor's offset (NOISE.md)
ESC = -128  # the code of an element whose theta lives in the side table
RATIO = 32  # an element with |theta| >= |displacement| / RATIO takes a code, |code| <= 2*(RATIO+2)
Z_MAX = {"gaussian": 5.8, "rademacher": 1.0}  # Box-Muller from 2^-24 <= u: |z| <= 5.77
DTYPES = {torch.float32: (torch.int32, 0x7FFFFFFF), torch.float16: (torch.int16, 0x7FFF),
          torch.bfloat16: (torch.int16, 0x7FFF)}
TABLE_SLICE = 1 << 22  # elements scanned at once when building the table (bounds the mask)


def tau(eps: float, distribution: str) -> float:
    """The smallest |theta| that takes a code for displacements of size eps, as float32."""
    return float(torch.tensor(eps * Z_MAX[noise.check_distribution(distribution)] / RATIO,
                              dtype=torch.float32))


def big(dtype: torch.dtype) -> float:
    """Above this |theta|, theta + eps*z could overflow to inf: such elements use the table."""
    return torch.finfo(dtype).max / 2


def special(theta: torch.Tensor, tau_: float, dtype: torch.dtype) -> torch.Tensor:
    """Elements kept in the side table: |theta| < tau, |theta| > big, or not finite (float32
    comparisons: NaN fails both, so it is special)."""
    a = theta.float().abs()
    return ~(a >= tau_) | (a > big(dtype))


@dataclass
class Table:
    chunk_base: torch.Tensor  # int32 [n_chunks + 1]
    bits: torch.Tensor  # int32 [n_special] (at least one entry: kernels take its pointer)
    tau: float
    count: int  # n_special


def extent(numels: Sequence[int], offsets: Sequence[int]) -> tuple[int, int]:
    """[first, end) of the global indices an exact pass over these tensors decodes and encodes,
    in whole chunks ((0, 0) for no elements)."""
    kept = [(o, o + -(-n // CHUNK) * CHUNK) for n, o in zip(numels, offsets) if n]
    return (min(o for o, _ in kept), max(e for _, e in kept)) if kept else (0, 0)


def check_pass_args(seeds: torch.Tensor, scales: torch.Tensor, n_old: int, codes: torch.Tensor,
                    code_base: int, table: "Table", encode: bool, rounding: bool,
                    distribution: str, span: tuple[int, int]) -> None:
    """What an exact pass over the tensors of ``span`` (``extent``) needs of its arguments,
    checked from metadata only (capturable): a kernel trusts them."""
    noise.check_distribution(distribution)
    if encode and rounding:
        raise ValueError("encode needs round-to-nearest stores")
    if code_base % CHUNK:
        raise ValueError(f"code_base {code_base} is not a multiple of {CHUNK}")
    if codes.dtype != torch.int8:
        raise TypeError(f"codes must be an int8 tensor, not {codes.dtype}")
    n_new = scales.numel() - 1 - n_old
    if n_old < 0 or n_new < 0 or seeds.numel() != n_old + n_new + rounding:
        raise ValueError(f"{seeds.numel()} seeds and {scales.numel()} scales do not fit "
                         f"n_old={n_old}, rounding={rounding}")
    first, end = span
    if first == end:
        return
    if (n_old or encode) and not code_base <= first <= end <= code_base + codes.numel():
        raise ValueError(f"codes cover global indices [{code_base}, {code_base + codes.numel()}); "
                         f"the params' are [{first}, {end}): size them with exact.span")
    if n_old and table.chunk_base.numel() < (end - code_base) // CHUNK:
        raise ValueError(f"table.chunk_base has {table.chunk_base.numel()} entries; the params' "
                         f"chunks need {(end - code_base) // CHUNK}: build the table over these "
                         "params (Prepared.build_table)")


def no_state(device: torch.device) -> tuple[torch.Tensor, "Table"]:
    """Placeholder codes and table for a pass that neither decodes nor encodes (a plain pass
    with a stochastically rounded store): kernels take their pointers but read nothing."""
    codes = torch.zeros(1, dtype=torch.int8, device=device)
    return codes, Table(chunk_base=torch.zeros(1, dtype=torch.int32, device=device),
                        bits=torch.zeros(1, dtype=torch.int32, device=device), tau=0.0, count=0)


def span(params: Sequence[torch.Tensor], offsets: Sequence[int]) -> tuple[int, int]:
    """(first global index, number of indices) covered by a group: the codes' extent."""
    base = offsets[0]
    end = max(o + -(-p.numel() // CHUNK) * CHUNK for p, o in zip(params, offsets))
    return base, end - base


def raw_bits(flat: torch.Tensor) -> torch.Tensor:
    """The bits of each element, zero-extended to int32."""
    int_dtype, _ = DTYPES[flat.dtype]
    bits = flat.view(int_dtype).to(torch.int32)
    return bits if int_dtype == torch.int32 else bits & 0xFFFF


Count = Callable[[int, float, torch.Tensor], None]  # (code_base, tau, counts)
Fill = Callable[[int, float, torch.Tensor, torch.Tensor], None]  # (code_base, tau, chunk_base, bits)


def _slices(params: Sequence[torch.Tensor], offsets: Sequence[int], code_base: int):
    """(slice of a tensor, its dtype, its first table chunk), TABLE_SLICE elements at most."""
    for p, o in zip(params, offsets):
        flat = p.detach().reshape(-1)
        for start in range(0, flat.numel(), TABLE_SLICE):
            yield flat[start:start + TABLE_SLICE], p.dtype, (o - code_base + start) // CHUNK


def count_special_(params: Sequence[torch.Tensor], offsets: Sequence[int], code_base: int,
                   tau_: float, counts: torch.Tensor) -> None:
    """``counts[c]`` = the special elements of table chunk ``c`` (global index
    ``code_base + 128 c`` on), for the chunks ``params`` cover; the others are left alone."""
    for part, dtype, first in _slices(params, offsets, code_base):
        mask = special(part, tau_, dtype)
        padded = torch.nn.functional.pad(mask, (0, -part.numel() % CHUNK))
        counts[first:first + padded.numel() // CHUNK] = padded.view(-1, CHUNK).sum(1, dtype=torch.int32)


def fill_special_(params: Sequence[torch.Tensor], offsets: Sequence[int], code_base: int,
                  tau_: float, chunk_base: torch.Tensor, bits: torch.Tensor) -> None:
    """The raw bits of the special elements of ``params``, each at its slot: ``chunk_base``
    of its chunk plus the special elements before it in the chunk (one host sync a slice)."""
    for part, dtype, first in _slices(params, offsets, code_base):
        mask = special(part, tau_, dtype)
        found = raw_bits(part[mask])
        start = int(chunk_base[first])
        bits[start:start + found.numel()] = found


def build_table(params: Sequence[torch.Tensor], offsets: Sequence[int], tau_: float, *,
                count_: Count | None = None, fill_: Fill | None = None) -> Table:
    """The side table of a group: count the special elements per chunk, take the exclusive
    prefix sum (``chunk_base``), size ``bits`` from its total (one host sync) and fill it.
    ``count_`` / ``fill_`` are a backend's passes over ``params`` (default: the reference's);
    neither allocates anything parameter-sized."""
    base, n = span(params, offsets)
    device = params[0].device
    if count_ is None:
        count_ = lambda *a: count_special_(params, offsets, *a)  # noqa: E731
    if fill_ is None:
        fill_ = lambda *a: fill_special_(params, offsets, *a)  # noqa: E731
    chunk_base = torch.zeros(n // CHUNK + 1, dtype=torch.int32, device=device)
    count_(base, tau_, chunk_base[1:])
    chunk_base = torch.cumsum(chunk_base, 0, dtype=torch.int32)
    count = int(chunk_base[-1])
    bits = torch.zeros(max(count, 1), dtype=torch.int32, device=device)
    if count:
        fill_(base, tau_, chunk_base, bits)
    return Table(chunk_base=chunk_base, bits=bits, tau=tau_, count=count)


# -- rounding ---------------------------------------------------------------------------------

def rounding_words(indices: torch.Tensor, seed: int) -> torch.Tensor:
    """The random 32-bit word of each global index: word ``g & 3`` of Philox(seed, g >> 2)
    (the Gaussian counter layout, under the rounding stream's own seed)."""
    g = indices.to(torch.int64)
    j = g >> 2
    w = torch.stack(noise.philox4x32(j & noise.MASK32, j >> 32, seed))
    return w.gather(0, (g & 3).unsqueeze(0)).squeeze(0)


def _mag(bits: torch.Tensor, mask: int) -> torch.Tensor:
    return bits & mask


def _from_bits(bits: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """int32 raw bits -> values of ``dtype`` (bits above the dtype's width are ignored)."""
    int_dtype, _ = DTYPES[dtype]
    if int_dtype == torch.int32:
        return bits.view(torch.float32) if dtype == torch.float32 else bits.view(dtype)
    return ((bits & 0xFFFF) - ((bits & 0x8000) << 1)).to(torch.int16).view(dtype)


def round_nearest(y: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """float32 -> dtype, round to nearest even (torch's conversion)."""
    return y.to(dtype)


def stochastic_round(y: torch.Tensor, dtype: torch.dtype, words: torch.Tensor) -> torch.Tensor:
    """float32 ``y`` -> 16-bit ``dtype``: the neighbour away from zero with probability
    (|y| - |lo|) / (|hi| - |lo|), where lo is y rounded toward zero, else lo. Every quantity
    compared is exact in float32 (a difference of neighbours, a 24-bit u times a power of
    two), so every backend takes the same branch. Non-finite y rounds to nearest."""
    int_dtype, mask = DTYPES[dtype]
    r = raw_bits(round_nearest(y, dtype))
    ay = y.abs()
    over = round_nearest(y, dtype).float().abs() > ay  # rounded away from zero: step back
    lo = torch.where(over, r - 1, r)  # same sign, one step toward zero in magnitude
    hi = lo + 1
    lo_f, hi_f = _from_bits(lo, dtype).float().abs(), _from_bits(hi, dtype).float().abs()
    u = (words >> 8).to(torch.float32) * 2.0**-24
    up = (ay - lo_f) > u * (hi_f - lo_f)
    out = torch.where(up, hi, lo)
    return _from_bits(torch.where(torch.isfinite(y), out, r), dtype)


# -- the exact pass ---------------------------------------------------------------------------

def _sum(idx: torch.Tensor, seeds: Sequence[int], coeffs: torch.Tensor, distribution: str) -> torch.Tensor:
    acc = torch.zeros(idx.numel(), dtype=torch.float32, device=idx.device)
    for seed, c in zip(seeds, coeffs):
        acc = acc + c * noise.noise_at(idx, seed, distribution).to(torch.float32)
    return acc


def _exclusive_count_in_chunk(mask: torch.Tensor) -> torch.Tensor:
    """For each element, how many masked elements precede it in its 128-element chunk."""
    n = mask.numel()
    padded = torch.zeros(-(-n // CHUNK) * CHUNK, dtype=torch.int32, device=mask.device)
    padded[:n] = mask.to(torch.int32)
    rows = padded.view(-1, CHUNK)
    return (torch.cumsum(rows, 1, dtype=torch.int32) - rows).reshape(-1)[:n]


@torch.no_grad()
def exact_pass_(params: Sequence[torch.Tensor], offsets: Sequence[int], seeds: Sequence[int],
                scales: torch.Tensor, n_old: int, codes: torch.Tensor, code_base: int,
                table: Table, *, encode: bool, rounding_seed: int | None,
                distribution: str) -> None:
    """One exact pass over float32/float16/bfloat16 ``params`` (global ``offsets``).

    ``scales = [alpha, a_1..a_n_old, c_1..c_m]`` (float32) pairs with ``seeds``: the first
    ``n_old`` seeds give the old displacement ``s_old = sum_i a_i z_i`` and the rest the new
    one ``s_new = sum_j c_j z_j`` (each sum accumulated from 0 in seed order, in float32).
    Per element, with D the dtype, RN round-to-nearest-even and codes indexed by
    ``g - code_base``:

        theta = p                                       if n_old == 0
              = table.bits[chunk_base[c] + #ESC before it in its chunk]   if code == ESC
              = sign(t) | (mag(t) + code),  t = RN_D(p - s_old)           otherwise
        p     = RN_D(alpha * theta + s_new)   (stochastic rounding with rounding_seed; the add
                                               is skipped where s_new == 0, so -0 stays -0)
        code  = ESC if special(theta) else mag(theta) - mag(RN_D(p - s_new))   if encode

    ``encode`` needs alpha == 1 and no stochastic rounding (the stored value must be the
    round-to-nearest of theta + s_new for the next pass to undo it).
    """
    coeffs = scales.to(torch.float32).cpu()
    alpha, old, new = coeffs[0], coeffs[1:1 + n_old], coeffs[1 + n_old:]
    if encode and (float(alpha) != 1.0 or rounding_seed is not None):
        raise ValueError("encode needs alpha == 1 and round-to-nearest stores")
    for p, o in zip(params, offsets):
        if p.numel() == 0:
            continue
        dtype = p.dtype
        _, mask = DTYPES[dtype]
        flat = p.reshape(-1)
        idx = torch.arange(flat.numel(), device=p.device, dtype=torch.int64) + o
        x = flat.float()
        s_new = _sum(idx, seeds[n_old:], new.to(p.device), distribution)
        pos = idx - code_base
        if n_old == 0:
            theta_bits = raw_bits(flat)
            esc = special(flat, table.tau, dtype)
        else:
            s_old = _sum(idx, seeds[:n_old], old.to(p.device), distribution)
            code = codes[pos].to(torch.int32)
            esc = code == ESC
            t = raw_bits(round_nearest(x - s_old, dtype))
            sign = t & ~mask
            decoded = sign | (_mag(t, mask) + code)
            chunk = pos // CHUNK
            slot = table.chunk_base[chunk].to(torch.int64) + _exclusive_count_in_chunk(esc)
            looked_up = table.bits[torch.where(esc, slot, torch.zeros_like(slot))]
            theta_bits = torch.where(esc, looked_up, decoded)
        theta = _from_bits(theta_bits, dtype).float()
        y = alpha.to(p.device) * theta
        y = torch.where(s_new == 0, y, y + s_new)  # -0 + 0 would be +0: keep theta's sign
        if rounding_seed is not None and dtype != torch.float32:
            out = stochastic_round(y, dtype, rounding_words(idx, rounding_seed))
        else:
            out = round_nearest(y, dtype)
        if encode:
            t2 = raw_bits(round_nearest(out.float() - s_new, dtype))
            k = _mag(theta_bits, mask) - _mag(t2, mask)
            if bool(((k.abs() > 127) & ~esc).any()):  # the bound of docs/EXACT.md broken
                raise AssertionError("exact_pass_: a code out of range; tau is too small")
            codes[pos] = torch.where(esc, torch.full_like(k, ESC), k).to(torch.int8)
        flat.copy_(out)
