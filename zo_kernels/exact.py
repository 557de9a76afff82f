"""The exact pass of docs/EXACT.md as a multi-tensor Triton kernel (one launch per dtype).

Per element at global index g (all arithmetic float32, no FMA contraction: every launch
passes ``enable_fp_fusion=False``, so decode and encode compute ``RN(p - s)`` identically;
the only fmas are the ones Box-Muller's polynomials spell out, alike in every pass):

    s_old = sum_i a_i z(old_i, g);  s_new = sum_j c_j z(new_j, g)      (from +0, seed order)
    theta = p                                            with no old seeds
          = bits[chunk_base[chunk] + #ESC before g in its chunk]   where codes[g] == ESC
          = sign(t) | (mag(t) + code), t = RN(p - s_old)           otherwise
    y = alpha * theta (+ s_new where s_new != 0);  p = RN(y), or SR(y) with the rounding seed
    codes[g] = ESC if special(theta) else mag(theta) - mag(RN(p - s_new))      (encode)

The kernel works on raw bits (int32, zero-extended for 16-bit dtypes): it loads and stores
the parameters through bitcasts and rounds to bfloat16 with noise_axpby.rn_bf16_bits.
Tiles are laid out as noise_axpby.py's (tensor_table.py rows), at this kernel's own BLOCK
(CONFIG, below): [BLOCK/W, W] for Gaussian noise (W: one 16-byte vector, 4 in unaligned
tiles), [BLOCK/128, 128] for Rademacher. The ESC count is an exclusive tl.cumsum along the
rows of a [BLOCK/128, 128] view (one row is one table chunk: offsets and code_base are
128-aligned), and the table's bits are read with a predicated PTX load (_gather) where
compiled; Rademacher z enters as its sign xored into the scale. The stochastic-rounding words
take one Philox call per 4 elements, in the Gaussian rows' layout or, in Rademacher tiles,
joined from a row's 32 counters.
"""
from __future__ import annotations

from typing import Sequence

import torch
import triton
import triton.language as tl

from .noise_axpby import (DTYPES, NO_INLINE_PTX, _philox, load_parts, load_tile, quad_tile,
                          rademacher_signs, rn_bf16_bits, row_counters, signed, store_tile,
                          tile_origin, tile_part)
from .tensor_table import VECTOR_BYTES, by_dtype, device_of, table_for

CHUNK = 128
ESC = -128
# (BLOCK, num_warps, halves, lazy_masks) of the exact kernel. An element keeps about ten 32-bit values
# live (x, s_old, s_new, code, theta, its ESC count, ...): with the plain pass's
# 4096-element tiles ptxas (sm_90) gave 150-255 registers a thread and spills, one 256-thread
# block per SM. At 8 elements a thread the variants compile_check reports take 63-82
# uncapped under Triton 3.7 (up to 121 under 3.6). Of the sweep's pairs
# (benchmarks/gpu/driver.py --sweep-s, H200, 124M), 1024-element tiles of 4 warps ran the
# three-pass cycle 8-12% faster than 2048 x 8 in float32 and bfloat16, Gaussian and
# Rademacher, and fastest of all but in bfloat16 Rademacher (2048 x 4, 8% faster again). Not
# yet timed: 2048 x 4 in halves, 16 elements a thread (twice the bytes in flight) at 75-80
# registers where one 2048-slot part spills, which the Rademacher passes may want as the
# plain ones did (their Gaussian variants spill); and lazy masks (noise_axpby.Tiling): an
# interior tile's path 7-16% fewer SASS instructions (Triton 3.7, 1024 x 4), at up to 80
# registers in the capped passes where eager masks take 64-80 (92 in the uncapped bfloat16
# Gaussian last pass, where they take 69), no spills.
CONFIG = (1024, 4, 1, False)
# Passes that encode (the first, and the 2q - 1 middle ones of a step) launch capped at 80
# registers: six 128-thread blocks an SM and no spills on Triton 3.6 to 3.9, where 3.6 took
# 90-119 in the float32 and bfloat16 middle passes. The last pass runs uncapped:
# under the cap 3.6 spills 8 bytes in its bfloat16 Rademacher variant.
ENCODE_MAXNREG = 80


def launch_options(encode: bool, warps: int) -> dict:
    """The compile options of an exact-pass launch (compile_check compiles with the same)."""
    return {"num_warps": warps, "enable_fp_fusion": False,
            "maxnreg": ENCODE_MAXNREG if encode else None}


CHUNK_C = tl.constexpr(CHUNK)
ESC_C = tl.constexpr(ESC)
# max(dtype) / 2: above it theta + s could overflow (zo_opt.exact.big), exact in float32
BIGS = {dt: torch.finfo(dt).max / 2 for dt in (torch.float32, torch.float16, torch.bfloat16)}


@triton.jit
def _bits_of(x, DT: tl.constexpr):
    """Loaded values -> their raw bits as int32 (16-bit dtypes zero-extended)."""
    if DT == tl.float32:
        return x.to(tl.int32, bitcast=True)
    else:
        return x.to(tl.uint16, bitcast=True).to(tl.int32)


@triton.jit
def _from_bits(bits, DT: tl.constexpr):
    """int32 raw bits -> values of DT (for the store)."""
    if DT == tl.float32:
        return bits.to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.uint16).to(DT, bitcast=True)


@triton.jit
def _to_f32(bits, DT: tl.constexpr):
    """int32 raw bits of a DT value -> that value in float32 (exact)."""
    if DT == tl.float32:
        return bits.to(tl.float32, bitcast=True)
    elif DT == tl.bfloat16:
        return (bits.to(tl.uint32) << 16).to(tl.float32, bitcast=True)
    else:
        return bits.to(tl.uint16).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _rn_bits(y, DT: tl.constexpr):
    """float32 -> int32 raw bits of RN_DT(y), round to nearest even."""
    if DT == tl.float32:
        return y.to(tl.int32, bitcast=True)
    elif DT == tl.bfloat16:
        return rn_bf16_bits(y).to(tl.int32)
    else:
        return y.to(tl.float16).to(tl.uint16, bitcast=True).to(tl.int32)


@triton.jit
def _sr_bits(y, w, DT: tl.constexpr):
    """float32 -> int32 raw bits of SR_DT(y) with the random words w (docs/EXACT.md): the
    neighbour away from zero where (|y| - |lo|) > u (|hi| - |lo|), u = (w >> 8) 2^-24."""
    r = _rn_bits(y, DT)
    ay = tl.abs(y)
    over = tl.abs(_to_f32(r, DT)) > ay  # rounded away from zero: one step back
    lo = tl.where(over, r - 1, r)
    hi = lo + 1
    lo_f = tl.abs(_to_f32(lo, DT))
    hi_f = tl.abs(_to_f32(hi, DT))
    u = (w >> 8).to(tl.float32) * 5.9604644775390625e-08  # 2^-24
    up = (ay - lo_f) > u * (hi_f - lo_f)
    finite = ay <= 3.4028234663852886e38  # false for inf and NaN: those round to nearest
    return tl.where(finite, tl.where(up, hi, lo), r)


@triton.jit
def special(theta, tau, BIG: tl.constexpr):
    """docs/EXACT.md special(theta): !(|theta| >= tau) || |theta| > max/2 (NaN is special)."""
    a = tl.abs(theta)
    return (a < tau) | (a != a) | (a > BIG)


@triton.jit
def _noise_term(seed, c, j, RADEMACHER: tl.constexpr, WIDTH: tl.constexpr):
    """c * z(seed) in the tile's layout. Rademacher: c with z's sign xored in (exact, as the
    product is), where a +-1.0 z took two logic instructions and a multiply an element."""
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    if RADEMACHER:
        return signed(c, rademacher_signs(k0, k1, j, 1))
    else:
        return c * quad_tile(k0, k1, j, WIDTH, True, True)


@triton.jit
def _word_tile(seed, j, WIDTH: tl.constexpr):
    """The rounding word of each element: word g & 3 of Philox(seed, g >> 2), in the tile's
    layout (j: the rows' counters). A 128-element Rademacher row takes 32 counters, one per
    4 elements, whose words are joined in place of the row (a [BLOCK/4, 4] tile reshaped to
    [BLOCK/128, 128] instead made 2.5x the Philox calls a thread under Triton 3.6)."""
    k0 = seed.to(tl.uint32)
    k1 = (seed >> 32).to(tl.uint32)
    if WIDTH == 128:
        w0, w1, w2, w3 = _philox(j[:, None] * 32 + tl.arange(0, 32)[None, :].to(tl.int64), k0, k1)
        w = tl.join(tl.join(w0, w2), tl.join(w1, w3))  # [R, 32, 2, 2]: word 2 i + k at (i, k)
        return tl.reshape(w, (w.shape[0], 128))
    else:
        return quad_tile(k0, k1, j, WIDTH, False, True)


@triton.jit
def _exclusive_count(esc, BLOCK: tl.constexpr, WIDTH: tl.constexpr):
    """How many ESC elements precede each element in its 128-element chunk (a row of a
    [BLOCK/128, 128] view; the tile starts on a chunk)."""
    e = esc.to(tl.int32)
    if WIDTH == 128:
        return tl.cumsum(e, axis=1) - e
    else:
        rows = tl.reshape(e, (BLOCK // 128, 128))
        return tl.reshape(tl.cumsum(rows, axis=1) - rows, (BLOCK // WIDTH, WIDTH))


@triton.jit
def _chunk_bases(chunk_base_ptr, pos0, idx, esc, n_in, BLOCK: tl.constexpr,
                 WIDTH: tl.constexpr):
    """chunk_base of each ESC element's chunk (0 elsewhere). Rademacher tiles load it once a
    row, where one load an element (64-bit index arithmetic included) took about 8
    instructions an element: a tensor starts a tile on a chunk (its offset is 128-aligned),
    so a row holds elements of the tensor where its first slot does (slot < n_in). Gaussian
    tiles, where a thread holds one or two short rows, keep a load an element: loaded a row,
    ptxas fit the bfloat16 rounding pass to 64 registers and spilled."""
    if WIDTH == 128:
        first = tl.arange(0, BLOCK // WIDTH) * WIDTH
        base = tl.load(chunk_base_ptr + (pos0 >> 7) + (first >> 7), mask=first < n_in, other=0)
        return base[:, None]
    else:
        return tl.load(chunk_base_ptr + ((pos0 + idx) >> 7), mask=esc, other=0)


@triton.jit
def _gather(ptrs, mask):
    """tl.load(ptrs, mask=mask, other=0) for scattered pointers (the side table's bits),
    compiled as a predicated ld.global an element in the tile's own layout. As a tl.load,
    Triton lays the load out after its pointers' contiguity, none in either dim here: Triton
    3.6 breaks that tie toward the rows (noise_axpby.ROWS_FIRST) and gave the load, and the
    ESC count and decode it drew along, a layout of their own, with shared-memory conversions
    around them (about 40 SASS instructions an element in Rademacher tiles). An elementwise
    inline asm takes its operands' layout on every version."""
    if NO_INLINE_PTX:
        return tl.load(ptrs, mask=mask, other=0)
    else:
        return tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.b32 p, $2, 0; mov.b32 $0, 0; @p ld.global.b32 $0, [$1]; }",
            "=r,l,r", [ptrs.to(tl.int64, bitcast=True), mask.to(tl.int32)], dtype=tl.int32,
            is_pure=True, pack=1)


@triton.jit
def exact_kernel(base_ptr, rows_ptr, block_map_ptr, seeds_ptr, scales_ptr, n_old, n_new,
                 codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau,
                 DECODE: tl.constexpr, ENCODE: tl.constexpr,
                 ROUNDING: tl.constexpr, RADEMACHER: tl.constexpr, ALIGNED: tl.constexpr,
                 VEC: tl.constexpr, BIG: tl.constexpr, BLOCK: tl.constexpr,
                 HALVES: tl.constexpr, LAZY_MASKS: tl.constexpr):
    """One program: one BLOCK-slot tile of one tensor (tensor_table.py rows, as in
    noise_axpby_kernel), in HALVES parts (1 or 2) whose values are all loaded before any
    part's noise. DECODE: n_old > 0 (theta from codes). LAZY_MASKS: an interior tile and a
    masked one take paths of their own (noise_axpby.Tiling.lazy_masks)."""
    if RADEMACHER:
        WIDTH: tl.constexpr = 128
    elif ALIGNED:
        WIDTH: tl.constexpr = VEC  # a 16-byte vector a row, as in noise_axpby_kernel
    else:
        WIDTH: tl.constexpr = 4
    PART: tl.constexpr = BLOCK // HALVES
    origin = tile_origin(rows_ptr, block_map_ptr, BLOCK)
    part = tile_part(base_ptr, origin, 0, WIDTH, ALIGNED, VEC, PART, 1)
    interior = part[2]
    if HALVES == 2:
        part2 = tile_part(base_ptr, origin, PART, WIDTH, ALIGNED, VEC, PART, 1)
        interior2 = part2[2]
    else:  # one part: _exact_parts never reads a second
        part2, interior2 = part, interior
    if not LAZY_MASKS:
        _exact_parts(part, interior, part2, interior2, seeds_ptr, scales_ptr, n_old, n_new,
                     codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE, ENCODE,
                     ROUNDING, RADEMACHER, BIG, WIDTH, PART, HALVES, False)
    elif interior & interior2:
        _exact_parts(part, True, part2, True, seeds_ptr, scales_ptr, n_old, n_new,
                     codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE, ENCODE,
                     ROUNDING, RADEMACHER, BIG, WIDTH, PART, HALVES, True)
    else:
        _exact_parts(part, False, part2, False, seeds_ptr, scales_ptr, n_old, n_new,
                     codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE, ENCODE,
                     ROUNDING, RADEMACHER, BIG, WIDTH, PART, HALVES, True)


@triton.jit
def _exact_parts(part, interior, part2, interior2, seeds_ptr, scales_ptr, n_old, n_new,
                 codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE: tl.constexpr,
                 ENCODE: tl.constexpr, ROUNDING: tl.constexpr, RADEMACHER: tl.constexpr,
                 BIG: tl.constexpr, WIDTH: tl.constexpr, PART: tl.constexpr,
                 HALVES: tl.constexpr, LAZY: tl.constexpr):
    """The parts' loads, then each part's exact pass (the interiors may be constexpr, for a
    path that knows them)."""
    ptrs, slots, _, g0, n_in = part
    DT: tl.constexpr = ptrs.dtype.element_ty
    x, x2 = load_parts(part, interior, part2, interior2, HALVES, LAZY)
    _exact_part(x, ptrs, slots, interior, g0, n_in, seeds_ptr, scales_ptr, n_old,
                n_new, codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE, ENCODE,
                ROUNDING, RADEMACHER, BIG, DT, WIDTH, PART, LAZY)
    if HALVES == 2:
        ptrs2, slots2, _, g2, n_in2 = part2
        _exact_part(x2, ptrs2, slots2, interior2, g2, n_in2, seeds_ptr, scales_ptr, n_old,
                    n_new, codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau, DECODE, ENCODE,
                    ROUNDING, RADEMACHER, BIG, DT, WIDTH, PART, LAZY)


@triton.jit
def _exact_part(x, ptrs, slots, interior, g0, n_in, seeds_ptr, scales_ptr, n_old,
                n_new, codes_ptr, code_base, chunk_base_ptr, bits_ptr, tau,
                DECODE: tl.constexpr, ENCODE: tl.constexpr, ROUNDING: tl.constexpr,
                RADEMACHER: tl.constexpr, BIG: tl.constexpr, DT: tl.constexpr,
                WIDTH: tl.constexpr, SLOTS: tl.constexpr, LAZY: tl.constexpr):
    """The exact pass over one part of SLOTS slots (tile_part's values for it), its values x
    already loaded: decode, displace, store, encode. Its codes are loaded after the noise:
    held across the seed loops, they took ptxas (sm_90) from 64 to 79 registers and to
    spills in 16-bit passes of 1024 x 4."""
    if DT == tl.float32:
        MAG: tl.constexpr = 0x7FFFFFFF
    else:
        MAG: tl.constexpr = 0x7FFF
    pos0 = tl.multiple_of(g0 - code_base, CHUNK_C)  # the part's first code (128-aligned)
    idx = slots[0]
    xbits = _bits_of(x, DT)
    xf = _to_f32(xbits, DT)
    if RADEMACHER:
        j = row_counters(g0 >> 7, SLOTS // WIDTH, 1)
    else:
        j = row_counters(g0 >> 2, SLOTS // WIDTH, WIDTH // 4)

    # The displacements, each from +0 in the reference's order. +0 matters: RN(-0 - (+0))
    # keeps -0. The zero is made out of x's bits, in a form the compiler does not fold to a
    # constant, so that the sums, and the noise with them, take the load's layout (see
    # noise_axpby_kernel). With (xbits & 0), a constant, and Box-Muller as plain arithmetic,
    # the layout pass gave the noise a layout of four threads to a Gaussian row, each redoing
    # the row's Philox and Box-Muller (PTX: 15 Philox calls a thread where 4 do).
    zero = ((xbits.to(tl.uint32, bitcast=True) >> 31) >> 1).to(tl.float32, bitcast=True)
    s_old = zero
    s_new = zero
    # The -2 eps z pass of a central step (one seed, old scale c, new scale -c) makes z once:
    # s_new = RN(+0 - s_old) is then what +0 + (-c) z rounds to. A loop with a runtime trip
    # count, where a branch would do: what a branch yields gets a layout of its own (see zero).
    pair = (n_old == 1) & (n_new == 1)
    flip = (pair & (tl.load(seeds_ptr, mask=pair) == tl.load(seeds_ptr + 1, mask=pair))
            & (tl.load(scales_ptr + 2, mask=pair) == -tl.load(scales_ptr + 1, mask=pair)))
    for i in range(n_old):
        s_old = s_old + _noise_term(tl.load(seeds_ptr + i), tl.load(scales_ptr + 1 + i), j,
                                    RADEMACHER, WIDTH)
    for i in range(flip.to(tl.int32), n_new):
        s_new = s_new + _noise_term(tl.load(seeds_ptr + n_old + i),
                                    tl.load(scales_ptr + 1 + n_old + i), j, RADEMACHER, WIDTH)
    s_new = tl.where(flip, zero - s_old, s_new)

    cptrs = codes_ptr + pos0 + idx
    if DECODE:
        code = load_tile(cptrs, slots, interior, LAZY).to(tl.int32)
        esc = code == ESC_C
        t = _rn_bits(xf - s_old, DT)
        # sign(t) | (mag(t) + code) as one add: mag(t) + code is the encoded mag(theta),
        # in [0, MAG], so the add carries nothing into the sign bit.
        decoded = t + code
        base = _chunk_bases(chunk_base_ptr, pos0, idx, esc, n_in, SLOTS, WIDTH)
        looked_up = _gather(bits_ptr + (base + _exclusive_count(esc, SLOTS, WIDTH)), esc)
        theta_bits = tl.where(esc, looked_up, decoded)
        theta = _to_f32(theta_bits, DT)
    else:
        theta_bits = xbits
        theta = xf
        esc = special(xf, tau, BIG)

    y = tl.load(scales_ptr) * theta
    y = tl.where(s_new != 0.0, y + s_new, y)  # -0 + 0 would be +0
    if ROUNDING and DT != tl.float32:
        w = _word_tile(tl.load(seeds_ptr + n_old + n_new), j, WIDTH)
        out = _sr_bits(y, w, DT)
    else:
        out = _rn_bits(y, DT)
    store_tile(ptrs, _from_bits(out, DT), slots, interior, LAZY)

    if ENCODE:
        t2 = _rn_bits(_to_f32(out, DT) - s_new, DT)
        k = (theta_bits & MAG) - (t2 & MAG)
        store_tile(cptrs, tl.where(esc, ESC_C, k).to(tl.int8), slots, interior, LAZY)


def dtype_launches(params: Sequence[torch.Tensor], offsets: Sequence[int], block: int) -> list:
    """(tensors, tensor table of ``block``-element tiles) per dtype among the non-empty
    ``params``: one launch each. Offsets must be multiples of 128 (the side table's chunks,
    docs/EXACT.md)."""
    for p, o in zip(params, offsets):
        if p.dtype not in DTYPES:
            raise TypeError(f"the exact Triton kernels take {DTYPES}, not {p.dtype}")
        if o % CHUNK:
            raise ValueError(f"offset {o} is not a multiple of {CHUNK}: the exact mode "
                             "needs 128-aligned offsets")
    return [(ps, table_for(ps, os_, block)) for ps, os_ in by_dtype(params, offsets)]


def prepare_exact(params: Sequence[torch.Tensor], offsets: Sequence[int]):
    """The tensor tables of ``params`` (one per dtype), built once; returns
    ``run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution)``
    (runner.exact_list_runner's signature) that only launches: int64 seeds (uint64 bits;
    with ``rounding`` the rounding seed last), float32 scales [1 + n_old + n_new], int8
    ``codes`` indexed by ``g - code_base``, ``table`` a zo_opt.exact.Table, all on the
    params' device: no copy, no host sync, so it can be graph-captured.

    Offsets and code_base must be multiples of 128 (the table's chunks, docs/EXACT.md)."""
    block, warps, halves, lazy_masks = CONFIG
    launches = dtype_launches(params, offsets, block)

    def run(seeds: torch.Tensor, scales: torch.Tensor, n_old: int, codes: torch.Tensor,
            code_base: int, table, encode: bool, rounding: bool, distribution: str) -> None:
        if distribution not in ("gaussian", "rademacher"):
            raise ValueError(f"Invalid distribution: {distribution!r}")
        if encode and rounding:
            raise ValueError("encode needs round-to-nearest stores")
        if code_base % CHUNK:
            raise ValueError(f"code_base {code_base} is not a multiple of {CHUNK}")
        if codes.dtype != torch.int8:
            raise TypeError("codes must be int8")
        n_old = int(n_old)
        n_new = scales.numel() - 1 - n_old
        if n_new < 0 or seeds.numel() != n_old + n_new + bool(rounding):
            raise ValueError(f"{seeds.numel()} seeds and {scales.numel()} scales do not fit "
                             f"n_old={n_old}, rounding={rounding}")
        scales = scales.to(dtype=torch.float32).contiguous()
        if seeds.numel() == 0:  # the kernel takes a valid pointer even when it reads none
            seeds = torch.zeros(1, dtype=torch.int64, device=scales.device)
        for ps, tt in launches:
            with device_of(ps):
                exact_kernel[(tt.n_blocks,)](
                    ps[tt.base_index], tt.rows, tt.block_map, seeds, scales, n_old, n_new,
                    codes, code_base, table.chunk_base, table.bits, float(table.tau),
                    DECODE=n_old > 0, ENCODE=bool(encode),
                    ROUNDING=bool(rounding), RADEMACHER=distribution == "rademacher",
                    ALIGNED=tt.aligned,
                    VEC=VECTOR_BYTES // ps[0].element_size(), BIG=BIGS[ps[0].dtype],
                    BLOCK=block, HALVES=halves, LAZY_MASKS=lazy_masks,
                    **launch_options(bool(encode), warps))

    return run
