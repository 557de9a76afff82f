"""The one pass of NOISE.md's schedule as a multi-tensor Triton kernel:

    params[k] = scales[0] * params[k] + sum_i scales[1 + i] * z_k(seeds[i])

z is regenerated in registers from (seed, global element index): Philox4x32-10 with key
(lo32(seed), hi32(seed)) and counter (lo32(j), hi32(j), 0, 0). Gaussian tiles have a
16-byte vector a row (one Philox call, four Box-Muller normals, per 4 elements), Rademacher
tiles a 128-element row split into slices that one thread holds (one call, 128 sign bits,
per row and thread). Arithmetic is float32; stores round to nearest even in the parameter's
dtype. One launch per dtype group covers all its tensors (tensor_table.py), and the scalars
are read on the device: no host sync.

Philox is written out here rather than taken from tl.randint4x so that the 64-bit key and
counter split is the contract's on every Triton version (it matches 3.7's randint4x).
"""
from __future__ import annotations

import functools
from typing import NamedTuple, Sequence

import torch
import triton
import triton.language as tl

from .tensor_table import VECTOR_BYTES, by_dtype, device_of, table_for

PHILOX_M0 = tl.constexpr(0xD2511F53)
PHILOX_M1 = tl.constexpr(0xCD9E8D57)
PHILOX_W0 = tl.constexpr(0x9E3779B9)
PHILOX_W1 = tl.constexpr(0xBB67AE85)


class Tiling(NamedTuple):
    """How the plain pass runs over a dtype group: ``block`` slots a program (a multiple of
    128) and ``warps`` warps, in ``halves`` parts (noise_axpby_kernel), compiled with at most
    ``maxnreg`` registers a thread (None: uncapped). A cap trades registers for resident
    warps. ``lazy_masks``: a tile's masks made on its masked path only (noise_axpby_kernel),
    not once for all tiles: fewer instructions on an interior tile's path, for two copies of
    the noise code. ``persistent``: 0, a program a tile; k > 0, a grid of k programs an SM
    that walk the tiles (the CUDA kernel's shape: no block launched or retired a tile, and a
    tile's table reads mostly from L1) (benchmarks/gpu/NOTES.md)."""
    block: int
    warps: int
    halves: int = 1
    maxnreg: int | None = None
    lazy_masks: bool = False
    persistent: int = 0

    def options(self) -> dict:
        """The compile options of a launch (compile_check compiles with the same). Contraction
        to fma is asked for, not left to the default, which Triton 3.9 warns will turn it off
        in 3.10 (each of Box-Muller's multiply-adds would take two instructions)."""
        return {"num_warps": self.warps, "maxnreg": self.maxnreg, "enable_fp_fusion": True}


# The plain pass's tiling per (distribution, element size), from ptxas sm_90 reports (Triton
# 3.6 and 3.7) and H200 timings (benchmarks/gpu/driver.py --sweep-s; results of 2026-11-29).
# float32 Rademacher passes, bound by memory, capped at 80 fit three 256-thread blocks an SM
# where they took 99 registers (two), no spills on Triton 3.6 to 3.9: 88% of copy. The other
# kinds run in two halves with lazy masks, chosen from the compiled code and not yet timed as
# they stand (benchmarks/gpu/NOTES.md). 16-bit Rademacher ones, at 69% of copy with 32 bytes
# a thread whatever the cap (48 to 80), take the CUDA kernel's 64 bytes a thread (85%):
# 8192-slot programs of 8 warps, an interior tile's path 14.5 SASS instructions an element
# (eager masks: 21-23), capped at 80 registers, which no Triton from 3.6 to 3.9 spills (at
# 64, four blocks an SM, 3.6 spills 52 bytes). Gaussian ones hold one half's Box-Muller at a
# time: 62-64 registers (16-bit; float32 62 on 3.7, 80 on 3.6), four blocks an SM, where one
# 4096-slot part took 115-121, and their lazy masks take 11-13% fewer instructions on an
# interior tile's path than eager ones (a thread's registers are allocated 8 at a time).
TILINGS: dict[tuple[str, int], Tiling] = {
    ("gaussian", 4): Tiling(4096, 8, halves=2, lazy_masks=True),
    ("gaussian", 2): Tiling(4096, 8, halves=2, lazy_masks=True),
    ("rademacher", 4): Tiling(4096, 8, maxnreg=80),
    ("rademacher", 2): Tiling(8192, 8, halves=2, maxnreg=80, lazy_masks=True),
}
# A capped variant may spill up to this many bytes a thread (tests/test_triton_backend.py).
CAP_SPILL_BYTES = 128


# Tiles that do not start 16-byte aligned (views into a shared buffer) take a scalar address
# an element, and 4 elements a thread: ptxas (sm_90) gives 27-62 registers, where 8 a thread
# take up to 128 and spill, and 16 take 208-255 and spill.
UNALIGNED = Tiling(2048, 16)


def config(dtype: torch.dtype, distribution: str, aligned: bool = True) -> Tiling:
    """The plain pass's tiling for tensors of ``dtype``."""
    return TILINGS[(distribution, dtype.itemsize)] if aligned else UNALIGNED


# Threads that share one 128-element Rademacher row in the plain pass: LANES 16-byte vectors
# side by side make one slice of the row, so each load instruction of LANES threads reads 128
# contiguous bytes, and a thread holds the 128/(LANES*VEC) slices of one row (the CUDA
# kernel's layout) and makes one Philox call for them.
LANES = tl.constexpr(8)
# Which of a split tile's two strided dims comes first. Triton's coalescing gives a tile's
# threads to its dims in order of contiguity, and breaks ties by index: before 3.7 the lower
# index first, from 3.7 the higher. The rows must come right after the contiguous dim, so that
# a thread's repeats fall on the slices of its own row (the TTGIR of 3.6, 3.7, 3.8, 3.9).
ROWS_FIRST = tl.constexpr(tuple(int(v) for v in triton.__version__.split(".")[:2]) < (3, 7))


@triton.jit
def _philox4x32_10(c0, c1, k0, k1):
    """Philox4x32-10 words for counters (c0, c1, 0, 0) and key (k0, k1), all uint32."""
    c2 = tl.zeros_like(c0)
    c3 = tl.zeros_like(c0)
    for _ in tl.static_range(10):
        hi0, lo0 = _mul_wide(c0, MUL_WIDE_M0, PHILOX_M0)
        hi1, lo1 = _mul_wide(c2, MUL_WIDE_M1, PHILOX_M1)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = k0 + PHILOX_W0  # the bump after the last round is dead code
        k1 = k1 + PHILOX_W1
    return c0, c1, c2, c3


def _mul_wide_ptx(m: int) -> tl.constexpr:
    """PTX for $0, $1 = the high and low words of $2 * m (one 32 x 32 -> 64-bit multiply)."""
    return tl.constexpr("{ .reg .b64 p; mul.wide.u32 p, $2, %#x; mov.b64 {$1, $0}, p; }" % m)


MUL_WIDE_M0 = _mul_wide_ptx(PHILOX_M0.value)
MUL_WIDE_M1 = _mul_wide_ptx(PHILOX_M1.value)


@triton.jit
def _mul_wide(a, ASM: tl.constexpr, M: tl.constexpr):
    """(high, low) words of the uint32 a times M. Compiled, one mul.wide.u32 (ASM: M's): as
    tl.umulhi and a multiply, ptxas made most of Philox's products two instructions; as a
    uint64 product, LLVM kept some 64-bit multiplies and ptxas added a zero an element."""
    if NO_INLINE_PTX:
        return tl.umulhi(a, M), a * M
    else:
        return tl.inline_asm_elementwise(ASM, "=r,=r,r", [a], dtype=(tl.uint32, tl.uint32),
                                         is_pure=True, pack=1)


@triton.jit
def _philox(j, k0, k1):
    """Philox4x32-10 words of the int64 counters j under the key (k0, k1)."""
    return _philox4x32_10(j.to(tl.uint32), (j >> 32).to(tl.uint32), k0, k1)


@triton.jit
def row_counters(j0, ROWS: tl.constexpr, STEP: tl.constexpr):
    """j0, j0 + STEP, ..., j0 + (ROWS - 1) STEP (j0 int64): the counters of a tile's rows."""
    return j0 + tl.arange(0, ROWS).to(tl.int64) * STEP


@triton.jit
def _uniform(w):
    """((w >> 9) + 0.5) * 2^-23: in (0, 1), exact in float32. Made as (1 + m 2^-23) - (1 - 2^-24)
    from the bits (an exact difference): an add of the shifted word and a float add, where
    the conversion, add and multiply took four instructions."""
    return ((w >> 9) + 0x3F800000).to(tl.float32, bitcast=True) - 0.999999940395355224609375


@triton.jit
def _madd(a, b, c, FUSED: tl.constexpr):
    """a * b + c: one fma with FUSED. The plain pass leaves its multiply-adds to the compiler,
    which contracts them (spelled out, the same arithmetic took ptxas to a spill in one
    variant); the exact pass, compiled with no contraction, spells Box-Muller's out, where
    each would otherwise take two instructions."""
    if FUSED:
        return tl.fma(a, b, c)
    else:
        return a * b + c


@triton.jit
def _log(x, FUSED: tl.constexpr):
    """ln x for normal positive float32 x: csrc/zo_noise.h's host_logf (Cephes logf, mantissa
    reduced to [sqrt(1/2), sqrt(2)) on the bits, degree-9 polynomial; a few ulp)."""
    t = x.to(tl.uint32, bitcast=True) + (0x00800000 - 0x003504F4)
    e = (t >> 23).to(tl.int32) - 127
    f = ((t & 0x007FFFFF) + 0x3F3504F4).to(tl.float32, bitcast=True) - 1.0
    z = f * f
    y = _madd(7.0376836292e-2, f, -1.1514610310e-1, FUSED)
    y = _madd(y, f, 1.1676998740e-1, FUSED)
    y = _madd(y, f, -1.2420140846e-1, FUSED)
    y = _madd(y, f, 1.4249322787e-1, FUSED)
    y = _madd(y, f, -1.6668057665e-1, FUSED)
    y = _madd(y, f, 2.0000714765e-1, FUSED)
    y = _madd(y, f, -2.4999993993e-1, FUSED)
    y = _madd(y, f, 3.3333331174e-1, FUSED)
    y = y * f * z
    fe = e.to(tl.float32)
    y = _madd(-2.12194440e-4, fe, y, FUSED)
    y = _madd(-0.5, z, y, FUSED)
    return _madd(0.693359375, fe, f + y, FUSED)


TWO_PI_2_24 = tl.constexpr(6.283185482025146484375 * 2.0**-24)  # float32's 2 pi, times 2^-24


@triton.jit
def _cos_sin_2pi(w, FUSED: tl.constexpr):
    """cos and sin of 2 pi u, u = _uniform(w): csrc/zo_noise.h's host_sincos2pi_word (the
    quarter turn found exactly on the bits, Cephes polynomials on [-pi/4, pi/4])."""
    m = w >> 9
    k = (m + (1 << 20)) >> 21  # round(4u), 0..4
    d = m.to(tl.int32) - (k << 21).to(tl.int32)
    # 2 pi (d + 1/2) 2^-23 with one rounding, as the reference's float32 2 pi times the exact
    # (d + 1/2) 2^-23: its odd integer 2d + 1 is exact in float32, and so is 2 pi 2^-24.
    a = (2 * d + 1).to(tl.float32) * TWO_PI_2_24
    a2 = a * a
    s = _madd(a * a2, _madd(a2, _madd(a2, -1.9515295891e-4, 8.3321608736e-3, FUSED),
                            -1.6666654611e-1, FUSED), a, FUSED)
    c = _madd(a2 * a2, _madd(a2, _madd(a2, 2.443315711809948e-5, -1.388731625493765e-3, FUSED),
                             4.166664568298827e-2, FUSED), _madd(-0.5, a2, 1.0, FUSED), FUSED)
    swap = (k & 1) != 0
    c_sign = ((k + 1) & 2) << 30  # quadrants 1, 2
    s_sign = (k & 2) << 30  # quadrants 2, 3
    cos = (tl.where(swap, s, c).to(tl.uint32, bitcast=True) ^ c_sign).to(tl.float32, bitcast=True)
    sin = (tl.where(swap, c, s).to(tl.uint32, bitcast=True) ^ s_sign).to(tl.float32, bitcast=True)
    return cos, sin


# y ~ 1/sqrt(x), s = x y, then s + (x - s^2) y/2 (rounded once, by the fma): in sqrt_rn's
# range this is sqrt_rn. PTX, so that ptxas folds the negation into the fma (from Triton's
# tl.fma, LLVM made -s or -x by one more instruction).
SQRT_FAST_PATH = tl.constexpr("""{
    .reg .f32 y, s, h, e;
    rsqrt.approx.ftz.f32 y, $1;
    mul.ftz.f32 s, $1, y;
    mul.ftz.f32 h, y, 0f3F000000;
    neg.f32 e, s;
    fma.rn.f32 e, e, s, $1;
    fma.rn.f32 $0, e, h, s;
}""")


@triton.jit
def _sqrt(x):
    """sqrt(x) rounded to nearest for x in [2^-101, 2^128) (-2 ln u lies in [1.1e-7, 33.3]):
    sqrt_rn's fast path written out (an rsqrt estimate and a Newton step from it), which
    ptxas otherwise puts behind a range check, a branch and a call to the slow path: eleven
    instructions a pair of normals where these take five, and no scheduling barrier in the
    seed loop. The interpreter, which has no PTX, takes sqrt_rn: the same values."""
    if NO_INLINE_PTX:
        return tl.sqrt_rn(x)
    else:
        return tl.inline_asm_elementwise(SQRT_FAST_PATH, "=f,f", [x], dtype=tl.float32,
                                         is_pure=True, pack=1)


@triton.jit
def _box_muller(wr, wt, FUSED: tl.constexpr):
    # The CPU backend's branch-free polynomials (|z - z_ref| < 1e-6 over all 2^23 uniforms),
    # not fast-math approximations: one formula for the GPU and the interpreter (whose square
    # roots take two forms of one value: _sqrt), so the tests here run what the GPU runs, and
    # cheaper than libdevice's log, sinpi and cospi.
    r = _sqrt(-2.0 * _log(_uniform(wr), FUSED))
    c, s = _cos_sin_2pi(wt, FUSED)
    return r * c, r * s


@triton.jit
def quad_tile(k0, k1, j, WIDTH: tl.constexpr, NORMALS: tl.constexpr, FUSED: tl.constexpr):
    """A [R, WIDTH] tile (WIDTH 4 or 8) whose row r holds global indices 4 j[r] ..
    4 j[r] + WIDTH - 1: Gaussian z (NORMALS), or Philox's raw words (word g & 3 of counter
    g >> 2: the stochastic-rounding words). A row takes WIDTH/4 whole Philox calls, so that a
    16-byte vector of a 16-bit type is one row and loads as one. FUSED: see _madd."""
    t = _quads(k0, k1, j, WIDTH, NORMALS, FUSED)
    if WIDTH == 8:
        t = tl.where(tl.arange(0, WIDTH)[None, :] < 4, t,
                     _quads(k0, k1, j + 1, WIDTH, NORMALS, FUSED))
    return t


@triton.jit
def _quads(k0, k1, j, WIDTH: tl.constexpr, NORMALS: tl.constexpr, FUSED: tl.constexpr):
    """The words (or normals) of counters j as a [R, WIDTH] tile: lane l of row r holds
    word l & 3."""
    w0, w1, w2, w3 = _philox(j, k0, k1)
    if NORMALS:
        w0, w1 = _box_muller(w0, w1, FUSED)
        w2, w3 = _box_muller(w2, w3, FUSED)
    if WIDTH == 4:
        # Joined, a row's four lanes are one thread's: an unaligned tile's load layout gives a
        # thread one lane of four rows, and from selects each thread then made its rows'
        # whole calls (four times the Philox and Box-Muller work; ptxas sm_90, 2048 x 16).
        return tl.reshape(tl.join(tl.join(w0, w2), tl.join(w1, w3)), (w0.shape[0], 4))
    lane = tl.arange(0, WIDTH)[None, :] & 3
    return tl.where(lane < 2, tl.where(lane == 0, w0[:, None], w1[:, None]),
                    tl.where(lane == 2, w2[:, None], w3[:, None]))


@triton.jit
def rademacher_signs(k0, k1, j, SPLIT: tl.constexpr):
    """The signs of z in the 128-element rows with counters j (row r: global indices
    128 j[r] ..), as uint32 with bit 31 set where z = -1 and no other bit: bit b of a row
    is bit (b & 31) of its counter's word b >> 5, and z = +1 where it is set. A scale takes
    its sign from them by one xor (signed), where a float z took a conversion an element
    (I2F, a quarter-rate instruction on sm_90) and a multiply. SPLIT 1: a [R, 128] tile.
    SPLIT > 1: [SPLIT, R, 128/SPLIT] ([R, SPLIT, 128/SPLIT] with ROWS_FIRST), where element
    (v, r, c) is bit v*128/SPLIT + c of row r; a thread then holds the slices v of one row
    (see LANES) and makes one Philox call where it would make one per slice."""
    w0, w1, w2, w3 = _philox(j, k0, k1)
    if SPLIT == 1:
        b = tl.arange(0, 128)[None, :]
        w0, w1, w2, w3 = w0[:, None], w1[:, None], w2[:, None], w3[:, None]
    elif ROWS_FIRST:
        b = (tl.arange(0, SPLIT)[None, :, None] * (128 // SPLIT)
             + tl.arange(0, 128 // SPLIT)[None, None, :])
        w0, w1, w2, w3 = w0[:, None, None], w1[:, None, None], w2[:, None, None], w3[:, None, None]
    else:
        b = (tl.arange(0, SPLIT)[:, None, None] * (128 // SPLIT)
             + tl.arange(0, 128 // SPLIT)[None, None, :])
        w0, w1, w2, w3 = w0[None, :, None], w1[None, :, None], w2[None, :, None], w3[None, :, None]
    word = tl.where(b < 64, tl.where(b < 32, w0, w1), tl.where(b < 96, w2, w3))
    return ((word << (31 - (b & 31)).to(tl.uint32)) & 0x80000000) ^ 0x80000000


@triton.jit
def signed(c, signs):
    """c * z for Rademacher z given by its signs (rademacher_signs): exact, as the product is."""
    return (c.to(tl.uint32, bitcast=True) ^ signs).to(tl.float32, bitcast=True)


@triton.jit
def rn_bf16_bits(y):
    """float32 -> the uint32 (zero-extended) bits of bfloat16 round to nearest even. Compiled,
    the cast itself (one cvt.rn.bf16x2 per two elements, where the bit arithmetic below took
    about seven instructions an element); under the interpreter, which truncates instead, by
    hand (NaNs kept quiet; the GPU's cvt makes them canonical)."""
    if HAND_ROUNDED_BF16:
        bits = y.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        is_nan = (bits & 0x7FFFFFFF) > 0x7F800000
        return tl.where(is_nan, (bits >> 16) | 0x40, rounded)
    else:
        return y.to(tl.bfloat16, fp_downcast_rounding="rtne").to(tl.uint16, bitcast=True).to(tl.uint32)


@triton.jit
def _round_to(y, dtype: tl.constexpr):
    """float32 -> dtype, round to nearest even."""
    if dtype == tl.bfloat16:
        return rn_bf16_bits(y).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return y.to(dtype)


@triton.jit
def tile(base_ptr, rows_ptr, block_map_ptr, WIDTH: tl.constexpr, ALIGNED: tl.constexpr,
         VEC: tl.constexpr, BLOCK: tl.constexpr, SPLIT: tl.constexpr):
    """This program's tile of one tensor (tensor_table.py rows) as [BLOCK/WIDTH, WIDTH] slots,
    or with SPLIT > 1 as [SPLIT, BLOCK/WIDTH, WIDTH/SPLIT] (slot (v, r, c) is slot
    r*WIDTH + v*WIDTH/SPLIT + c; [BLOCK/WIDTH, SPLIT, WIDTH/SPLIT] with ROWS_FIRST):
    (pointers, the slots: their indices in the tile and the tensor's bounds there (in_tile
    says which hold its elements), whether all do, the global index of slot 0, the tensor's
    slots from slot 0 on). Shared by every multi-tensor kernel."""
    origin = tile_origin(rows_ptr, block_map_ptr, BLOCK)
    return tile_part(base_ptr, origin, 0, WIDTH, ALIGNED, VEC, BLOCK, SPLIT)


@triton.jit
def tile_origin(rows_ptr, block_map_ptr, BLOCK: tl.constexpr, TILE=None):
    """(the tensor's first slot in the buffer, its slots lo and hi, the global index of its
    slot 0, the tile's first slot): what tile TILE (None: this program's) of BLOCK slots
    reads from its row."""
    if TILE is None:
        pid = tl.program_id(0)
    else:
        pid = TILE
    row = rows_ptr + tl.load(block_map_ptr + pid).to(tl.int64) * 5
    slot0 = (pid - tl.load(row + 4)) * BLOCK  # int64: the tile's first slot
    return tl.load(row), tl.load(row + 1), tl.load(row + 2), tl.load(row + 3), slot0


@triton.jit
def tile_part(base_ptr, origin, FIRST: tl.constexpr, WIDTH: tl.constexpr, ALIGNED: tl.constexpr,
              VEC: tl.constexpr, SLOTS: tl.constexpr, SPLIT: tl.constexpr):
    """tile()'s values for the SLOTS slots from slot FIRST of the program's tile (``origin``:
    tile_origin)."""
    ptr_origin, lo, hi, g_origin, tile0 = origin
    slot0 = tile0 + FIRST
    if SPLIT == 1:
        idx = tl.arange(0, SLOTS // WIDTH)[:, None] * WIDTH + tl.arange(0, WIDTH)[None, :]
    elif ROWS_FIRST:
        idx = (tl.arange(0, SLOTS // WIDTH)[:, None, None] * WIDTH
               + tl.arange(0, SPLIT)[None, :, None] * (WIDTH // SPLIT)
               + tl.arange(0, WIDTH // SPLIT)[None, None, :])
    else:
        idx = (tl.arange(0, SPLIT)[:, None, None] * (WIDTH // SPLIT)
               + tl.arange(0, SLOTS // WIDTH)[None, :, None] * WIDTH
               + tl.arange(0, WIDTH // SPLIT)[None, None, :])
    start = ptr_origin + slot0
    if ALIGNED:
        start = tl.multiple_of(start, VEC)
    # The tensor's slots relative to the part (in_tile clamps them where it makes a mask).
    lo_rel = lo - slot0
    hi_rel = hi - slot0
    interior = (lo_rel <= 0) & (hi_rel >= SLOTS)  # no mask: vector loads and stores
    return base_ptr + start + idx, (idx, lo_rel, hi_rel), interior, g_origin + slot0, hi_rel


@triton.jit
def in_tile(slots, HERE: tl.constexpr = False):
    """Which slots hold the tensor's elements (``slots``: tile_part's). HERE: made where it is
    written, from bounds the compiler cannot move (_pinned), so that a masked branch keeps
    its work: LLVM hoisted it above the branch, onto the interior tiles' path (in 16-bit
    Rademacher passes 32 compares and their packing into bit registers; in Gaussian ones
    the 64-bit clamps, 24 compares a thread)."""
    idx, lo, hi = slots
    if HERE:
        lo = _pinned(lo)
        hi = _pinned(hi)
    # Clamped to the part, the bounds fit 32 bits: one compare an element, where 64-bit
    # compares took two.
    lo_in = tl.minimum(tl.maximum(lo, 0), idx.numel).to(tl.int32)
    hi_in = tl.minimum(tl.maximum(hi, 0), idx.numel).to(tl.int32)
    return (idx >= lo_in) & (idx < hi_in)


@triton.jit
def _pinned(v):
    """The int64 v through an opaque move (PTX with side effects: never hoisted or merged)."""
    if NO_INLINE_PTX:
        return v
    else:
        return tl.inline_asm_elementwise("mov.b64 $0, $1;", "=l,l", [v], dtype=tl.int64,
                                         is_pure=False, pack=1)


@triton.jit
def load_tile(ptrs, slots, interior, LAZY: tl.constexpr = False):
    """The tile's values (0 outside the tensor, ``slots``: tile_part's); unmasked in interior
    tiles. The mask is made before the branch, where the compiler makes one for a part's
    load and store and holds it across the seed loops, or with LAZY in the masked branch
    only (Tiling.lazy_masks)."""
    if not LAZY:
        mask = in_tile(slots)
    if interior:
        x = tl.load(ptrs)
    else:
        if LAZY:
            mask = in_tile(slots, True)
        x = tl.load(ptrs, mask=mask, other=0.0)
    return x


@triton.jit
def store_tile(ptrs, values, slots, interior, LAZY: tl.constexpr = False):
    if not LAZY:
        mask = in_tile(slots)
    if interior:
        tl.store(ptrs, values)
    else:
        if LAZY:
            mask = in_tile(slots, True)
        tl.store(ptrs, values, mask=mask)


@triton.jit
def noise_axpby_kernel(base_ptr, rows_ptr, block_map_ptr, seeds_ptr, scales_ptr, n_seeds,
                       n_tiles, RADEMACHER: tl.constexpr, ALIGNED: tl.constexpr,
                       VEC: tl.constexpr, BLOCK: tl.constexpr, HALVES: tl.constexpr,
                       LAZY_MASKS: tl.constexpr, PERSISTENT: tl.constexpr):
    """One program: one BLOCK-slot tile of one tensor (see tensor_table.py for the rows), in
    HALVES parts (1 or 2) whose loads are all issued before any part's noise: a thread then
    has twice the bytes in flight at the registers of one part (the CUDA kernel's 64 bytes a
    thread, where a 16-bit thread of one 4096-slot part of 8 warps holds 32). With
    LAZY_MASKS, the noise and the stores of a tile take one of two paths, interior (no mask
    in sight) or masked, as its loads do: a branch per store held the slot indices across
    the seed loops. PERSISTENT: the program walks tiles pid, pid + grid, ... of the n_tiles
    (Tiling.persistent)."""
    if PERSISTENT:
        for t in range(tl.program_id(0), n_tiles, tl.num_programs(0)):
            _tile_pass(t, base_ptr, rows_ptr, block_map_ptr, seeds_ptr, scales_ptr, n_seeds,
                       RADEMACHER, ALIGNED, VEC, BLOCK, HALVES, LAZY_MASKS)
    else:
        _tile_pass(None, base_ptr, rows_ptr, block_map_ptr, seeds_ptr, scales_ptr, n_seeds,
                   RADEMACHER, ALIGNED, VEC, BLOCK, HALVES, LAZY_MASKS)


@triton.jit
def _tile_pass(tile, base_ptr, rows_ptr, block_map_ptr, seeds_ptr, scales_ptr, n_seeds,
               RADEMACHER: tl.constexpr, ALIGNED: tl.constexpr, VEC: tl.constexpr,
               BLOCK: tl.constexpr, HALVES: tl.constexpr, LAZY_MASKS: tl.constexpr):
    """The pass over one tile (None: this program's), in HALVES parts."""
    if RADEMACHER:
        WIDTH: tl.constexpr = 128
        SPLIT: tl.constexpr = 128 // (LANES * VEC)
    else:
        if ALIGNED:
            WIDTH: tl.constexpr = VEC  # a 16-byte vector a row: one load
        else:
            WIDTH: tl.constexpr = 4  # an element a load anyway; wider rows only add registers
        SPLIT: tl.constexpr = 1
    PART: tl.constexpr = BLOCK // HALVES
    origin = tile_origin(rows_ptr, block_map_ptr, BLOCK, tile)
    part = tile_part(base_ptr, origin, 0, WIDTH, ALIGNED, VEC, PART, SPLIT)
    interior = part[2]
    if HALVES == 2:
        part2 = tile_part(base_ptr, origin, PART, WIDTH, ALIGNED, VEC, PART, SPLIT)
        interior2 = part2[2]
    else:  # one part: _finish never reads a second
        part2, interior2 = part, interior
    if not LAZY_MASKS:
        _finish(part, interior, part2, interior2, seeds_ptr, scales_ptr, n_seeds, RADEMACHER,
                WIDTH, SPLIT, PART, HALVES, False)
    elif interior & interior2:
        _finish(part, True, part2, True, seeds_ptr, scales_ptr, n_seeds, RADEMACHER, WIDTH,
                SPLIT, PART, HALVES, True)
    else:
        _finish(part, False, part2, False, seeds_ptr, scales_ptr, n_seeds, RADEMACHER, WIDTH,
                SPLIT, PART, HALVES, True)


@triton.jit
def _finish(part, interior, part2, interior2, seeds_ptr, scales_ptr, n_seeds,
            RADEMACHER: tl.constexpr, WIDTH: tl.constexpr, SPLIT: tl.constexpr,
            PART: tl.constexpr, HALVES: tl.constexpr, LAZY: tl.constexpr):
    """The loads, the noise and the stores of the parts (tile_part's; the interiors may be
    constexpr, for a path that knows them): every part's loads first."""
    ptrs, slots, _, g0, _ = part
    DT: tl.constexpr = ptrs.dtype.element_ty
    x, x2 = load_parts(part, interior, part2, interior2, HALVES, LAZY)
    store_tile(ptrs, _axpby(x, g0, seeds_ptr, scales_ptr, n_seeds, RADEMACHER, WIDTH, SPLIT,
                            PART, DT), slots, interior, LAZY)
    if HALVES == 2:
        ptrs2, slots2, _, g2, _ = part2
        store_tile(ptrs2, _axpby(x2, g2, seeds_ptr, scales_ptr, n_seeds, RADEMACHER, WIDTH,
                                 SPLIT, PART, DT), slots2, interior2, LAZY)


@triton.jit
def load_parts(part, interior, part2, interior2, HALVES: tl.constexpr, LAZY: tl.constexpr):
    """The values of a tile's parts (tile_part's; with one part, its values twice), every
    part's loads issued before any is used."""
    x = load_tile(part[0], part[1], interior, LAZY)
    if HALVES == 2:
        x2 = load_tile(part2[0], part2[1], interior2, LAZY)
    else:
        x2 = x
    return x, x2


@triton.jit
def _axpby(x, g0, seeds_ptr, scales_ptr, n_seeds, RADEMACHER: tl.constexpr,
           WIDTH: tl.constexpr, SPLIT: tl.constexpr, SLOTS: tl.constexpr, DT: tl.constexpr):
    """alpha * x + (sum_i c_i z_i) rounded to DT, for the loaded slots x whose slot 0 has the
    global index g0: the reference's order of float32 roundings."""
    acc = _zeros_like(x)
    if RADEMACHER:
        j = row_counters(g0 >> 7, SLOTS // 128, 1)
    else:
        j = row_counters(g0 >> 2, SLOTS // WIDTH, WIDTH // 4)
    # x is converted to float32 after the noise: 16-bit values stay packed meanwhile (ptxas
    # sm_90, one 4096-slot part: 64 registers a thread in 16-bit Rademacher passes where
    # converting first took 78; 94 in bfloat16 Gaussian ones where it took 106).
    for i in range(n_seeds):
        seed = tl.load(seeds_ptr + i)  # uint64 stored as int64
        k0 = seed.to(tl.uint32)
        k1 = (seed >> 32).to(tl.uint32)
        c = tl.load(scales_ptr + 1 + i)
        if RADEMACHER:
            acc += signed(c, rademacher_signs(k0, k1, j, SPLIT))
        else:
            acc += c * quad_tile(k0, k1, j, WIDTH, True, False)
    return _round_to(tl.load(scales_ptr) * x.to(tl.float32) + acc, DT)


@triton.jit
def _zeros_like(x):
    """float32 zeros in x's layout, the sum's start: each thread then makes the noise of its
    own elements once (compiled from a plain tl.zeros, the sum took a layout that spreads a
    row over threads that each redo the row's Philox). An opaque move of 0 per element, which
    ptxas makes a zeroed register: nothing computed from x, no x unpacked early."""
    if NO_INLINE_PTX:  # the interpreter has no layouts; ROCm: the same values
        return tl.zeros(x.shape, tl.float32)
    else:
        return tl.inline_asm_elementwise("mov.b32 $0, 0;", "=r,f", [x.to(tl.float32)],
                                         dtype=tl.float32, is_pure=True, pack=1)


# The interpreter (TRITON_INTERPRET=1 before triton's import) makes plain Python of the
# kernel, and runs it on CPU tensors.
INTERPRETED = not isinstance(noise_axpby_kernel, triton.runtime.JITFunction)
HAND_ROUNDED_BF16 = tl.constexpr(INTERPRETED)  # read by rn_bf16_bits when it runs or compiles
# The kernels' few lines of PTX (_mul_wide, _sqrt, exact._gather) have portable forms with
# the same values, for the interpreter, which runs no PTX, and for ROCm builds of torch,
# whose Triton compiles for AMD GPUs.
NO_INLINE_PTX = tl.constexpr(INTERPRETED or torch.version.hip is not None)

DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def as_int64(seed: int) -> int:
    """A uint64 seed as the int64 with the same bits (the kernel splits the bits)."""
    return seed - (1 << 64) if seed >= 1 << 63 else seed


def _seeds_on(seeds: Sequence[int], device: torch.device) -> torch.Tensor:
    # At least one entry: the kernel takes a valid pointer even when it reads none.
    host = torch.tensor([as_int64(s) for s in seeds] or [0], dtype=torch.int64,
                        pin_memory=device.type == "cuda")
    return host.to(device, non_blocking=True)  # pinned: an async copy, no host sync


def noise_axpby_(params: Sequence[torch.Tensor], offsets: Sequence[int], seeds: Sequence[int],
                 scales: torch.Tensor, distribution: str) -> None:
    """In place over contiguous float32/float16/bfloat16 tensors on one device: one launch per
    dtype. ``scales`` is float32 [1 + len(seeds)] on that device."""
    if any(p.numel() for p in params):
        prepare(params, offsets)(_seeds_on(seeds, params[0].device), scales, distribution)


def prepare(params: Sequence[torch.Tensor], offsets: Sequence[int]):
    """The tables of ``params`` (one per dtype), built once; returns
    ``run(seeds, scales, distribution)`` with int64 seeds (uint64 bits) and float32 scales on
    the params' device, which only launches: no copy, no sync, so it can be graph-captured."""
    groups = by_dtype(params, offsets)
    tables = {}  # (group, block) -> its tensor table

    def table(k: int, block: int):
        if (k, block) not in tables:
            tables[(k, block)] = table_for(*groups[k], block)
        return tables[(k, block)]

    # Alignment does not depend on the block. The tables of the tilings config() gives are
    # made now, so that a first pass under a CUDA-graph capture uploads nothing (another
    # block's, as a sweep patches TILINGS, waits for its first pass).
    aligned = [table(k, config(ps[0].dtype, "gaussian").block).aligned
               for k, (ps, _) in enumerate(groups)]
    for k, (ps, _) in enumerate(groups):
        for distribution in ("gaussian", "rademacher"):
            table(k, config(ps[0].dtype, distribution, aligned[k]).block)

    def run(seeds: torch.Tensor, scales: torch.Tensor, distribution: str) -> None:
        scales = scales.to(dtype=torch.float32).contiguous()
        if seeds.numel() == 0:  # the kernel takes a valid pointer even when it reads none
            seeds = torch.zeros(1, dtype=torch.int64, device=scales.device)
        for k, (ps, _) in enumerate(groups):
            tiling = config(ps[0].dtype, distribution, aligned[k])
            _launch(ps, table(k, tiling.block), seeds, scales.numel() - 1, scales,
                    distribution == "rademacher", tiling)

    return run


def _launch(params: list[torch.Tensor], table, seeds: torch.Tensor, n_seeds: int,
            scales: torch.Tensor, rademacher: bool, tiling: Tiling) -> None:
    grid = table.n_blocks
    if tiling.persistent:
        grid = min(grid, tiling.persistent * sm_count(params[0].device))
    with device_of(params):
        noise_axpby_kernel[(grid,)](
            params[table.base_index], table.rows, table.block_map, seeds, scales, n_seeds,
            table.n_blocks, RADEMACHER=rademacher, ALIGNED=table.aligned,
            VEC=VECTOR_BYTES // params[0].element_size(), BLOCK=tiling.block,
            HALVES=tiling.halves, LAZY_MASKS=tiling.lazy_masks,
            PERSISTENT=tiling.persistent > 0, **tiling.options())


# The interpreter's stand-in for a GPU's SMs: few, so that its programs walk several tiles.
INTERPRETER_SMS = 2


@functools.cache
def sm_count(device: torch.device) -> int:
    """The SMs of ``device`` (asked once: the query costs microseconds, a pass launches often)."""
    if device.type != "cuda":
        return INTERPRETER_SMS
    return torch.cuda.get_device_properties(device).multi_processor_count
