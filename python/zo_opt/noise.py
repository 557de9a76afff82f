"""Executable specification of the noise contract (shared/design/NOISE.md).

Everything here is plain, vectorized torch on int64/float64 tensors: slow, exact, and the
reference that every backend is tested against, element by element.

* ``philox4x32(counter_lo, counter_hi, seed)``: Philox4x32-10 words for 64-bit counters.
* ``offsets(numels)``: the 128-aligned global base offsets of a parameter list.
* ``noise_at(indices, seed, distribution)``: z at global element indices.
* ``direction(numels, seed, distribution)``: z for a whole parameter list.
* ``direction_seed(base_seed, step, index)``: the seed of direction ``index`` at ``step``.
* ``direction_seeds(base_seed, step, q)``: the same for indices 0..q-1, computed where
  ``step`` lives (an int64 device tensor keeps a step free of host work: CUDA graphs).
"""
from __future__ import annotations

import math
import operator
from typing import Sequence

import torch

DISTRIBUTIONS = ("gaussian", "rademacher")
ALIGN = 128
MASK32 = 0xFFFFFFFF
MASK64 = 0xFFFFFFFFFFFFFFFF

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
PHILOX_ROUNDS = 10


def check_distribution(distribution: str) -> str:
    if distribution not in DISTRIBUTIONS:
        raise ValueError(f"Invalid distribution: {distribution!r}; choose one of {DISTRIBUTIONS}")
    return distribution


def check_seed(seed: int) -> int:
    """Seeds are unsigned 64-bit integers (the Philox key), returned as a Python int. numpy
    integers and one-element integer tensors count (``operator.index``); a tensor holds its
    seed as uint64 bits, as a capturable step's record does (from 2**63 up negative there)."""
    value = _integer(seed)
    if isinstance(seed, torch.Tensor) and value is not None:
        value = None if seed.dtype == torch.bool else value & MASK64
    if value is None or not 0 <= value <= MASK64:
        raise ValueError(f"Invalid seed: {seed!r}; a seed is an integer in [0, 2**64 - 1]")
    return value


def _integer(value: int) -> int | None:
    """A Python, numpy or one-element tensor integer as a Python int (not a bool)."""
    try:
        return None if isinstance(value, bool) else operator.index(value)
    except TypeError:
        return None


def _step_or_index(value: int, name: str) -> int:
    out = _integer(value)
    if out is None:
        raise ValueError(f"Invalid {name}: {value!r}; pass an integer")
    return out & MASK64


def _mulhilo(a: int, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # b < 2**32 and a < 2**32, so the product fits in 64 bits; int64 wraps, and bits 32..63
    # of the wrapped value are those of the unsigned product.
    prod = b * a
    return (prod >> 32) & MASK32, prod & MASK32


def philox4x32(counter_lo: torch.Tensor, counter_hi: torch.Tensor, seed: int,
               counter_2: int = 0, counter_3: int = 0) -> list[torch.Tensor]:
    """Philox4x32-10 with counter (lo, hi, c2, c3) and key (lo32(seed), hi32(seed)).

    Counters are int64 tensors holding 32-bit values (the noise uses c2 = c3 = 0);
    returns the four output words w0..w3.
    """
    seed = check_seed(seed)
    k0, k1 = seed & MASK32, seed >> 32
    c0, c1 = counter_lo & MASK32, counter_hi & MASK32
    c2 = torch.full_like(c0, counter_2 & MASK32)
    c3 = torch.full_like(c0, counter_3 & MASK32)
    for r in range(PHILOX_ROUNDS):
        if r:
            k0, k1 = (k0 + PHILOX_W0) & MASK32, (k1 + PHILOX_W1) & MASK32
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
    return [c0, c1, c2, c3]


def offsets(numels: Sequence[int]) -> list[int]:
    """Global base offset of each parameter: o_0 = 0, o_{k+1} = o_k + roundup(numel_k, 128)."""
    out, o = [], 0
    for k, n in enumerate(numels):
        size = _integer(n)
        if size is None or size < 0:
            raise ValueError(f"Invalid numels[{k}]: {n!r}; a size is an int >= 0")
        out.append(o)
        o += -(-size // ALIGN) * ALIGN
    return out


def _uniform(word: torch.Tensor) -> torch.Tensor:
    return ((word >> 9).to(torch.float64) + 0.5) * 2.0**-23


def noise_at(indices: torch.Tensor, seed: int, distribution: str = "gaussian") -> torch.Tensor:
    """z at the given global element indices (int64 tensor), as float64."""
    check_distribution(distribution)
    g = indices.to(torch.int64)
    if distribution == "gaussian":
        j, lane = g >> 2, g & 3
        w = philox4x32(j & MASK32, j >> 32, seed)
        pair = lane >> 1  # lanes 0,1 use (u0, u1); lanes 2,3 use (u2, u3)
        u_r = torch.where(pair == 0, _uniform(w[0]), _uniform(w[2]))
        u_t = torch.where(pair == 0, _uniform(w[1]), _uniform(w[3]))
        r = torch.sqrt(-2.0 * torch.log(u_r))
        t = (2.0 * math.pi) * u_t
        return torch.where((lane & 1) == 0, r * torch.cos(t), r * torch.sin(t))
    j, b = g >> 7, g & 127
    w = philox4x32(j & MASK32, j >> 32, seed)
    word = torch.stack(w).gather(0, (b >> 5).unsqueeze(0)).squeeze(0)
    bit = (word >> (b & 31)) & 1
    return bit.to(torch.float64) * 2.0 - 1.0


def direction(numels: Sequence[int], seed: int, distribution: str = "gaussian",
              base_offset: int = 0) -> list[torch.Tensor]:
    """The reference z of NOISE.md for a parameter list: one float32 CPU tensor per parameter."""
    if _integer(base_offset) is None or base_offset < 0:
        raise ValueError(f"Invalid base_offset: {base_offset!r}; global indices start at 0")
    out = []
    for n, o in zip(numels, offsets(numels)):
        idx = torch.arange(int(n), dtype=torch.int64) + (base_offset + o)
        out.append(noise_at(idx, seed, distribution).to(torch.float32))
    return out


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & MASK64
    return x ^ (x >> 31)


def direction_seed(base_seed: int, step: int, index: int) -> int:
    """Seed of direction ``index`` at optimizer step ``step``: a SplitMix64 chain.

    ``splitmix64(splitmix64(splitmix64(base) ^ step) ^ index)``: a bijective mix at every
    link, so distinct (step, index) pairs give unrelated seeds, with no state to advance and
    no short cycles (the old repo re-seeded a global RNG and repeated directions).
    """
    x = _splitmix64(check_seed(base_seed))
    x = _splitmix64(x ^ _step_or_index(step, "step"))
    return _splitmix64(x ^ _step_or_index(index, "index"))


ROUNDING_INDEX = MASK64  # no direction has this index: the stochastic-rounding stream's


def rounding_seed(base_seed: int, step: int) -> int:
    """Seed of the stochastic-rounding stream of step ``step`` (docs/EXACT.md)."""
    return direction_seed(base_seed, step, ROUNDING_INDEX)


def _as_signed(x: int) -> int:
    return x - (1 << 64) if x >= 1 << 63 else x


def _splitmix64_t(x: torch.Tensor) -> torch.Tensor:
    """``_splitmix64`` on int64 tensors holding uint64 bits: int64 adds and multiplies wrap
    like uint64 ones, and a logical right shift is the arithmetic one with the sign bits
    masked off."""
    def shr(v: torch.Tensor, k: int) -> torch.Tensor:
        return (v >> k) & ((1 << (64 - k)) - 1)

    x = x + _as_signed(0x9E3779B97F4A7C15)
    x = (x ^ shr(x, 30)) * _as_signed(0xBF58476D1CE4E5B9)
    x = (x ^ shr(x, 27)) * _as_signed(0x94D049BB133111EB)
    return x ^ shr(x, 31)


def direction_seeds(base_seed: int, step: torch.Tensor, q: int, *, rounding: bool = False) -> torch.Tensor:
    """``direction_seed(base_seed, step, i)`` for i in range(q) (then ``rounding_seed`` if
    ``rounding``), as an int64 tensor of uint64 bits on ``step``'s device (``step``: a 0-d
    int64 tensor; another integer is made one). Pure tensor ops: no host sync, so it can be
    captured in a CUDA graph with ``step`` advanced on the device."""
    if not isinstance(step, torch.Tensor):
        step = torch.tensor(_as_signed(_step_or_index(step, "step")), dtype=torch.int64)
    elif step.is_floating_point() or step.is_complex() or step.dtype == torch.bool:
        raise ValueError(f"Invalid step: a {step.dtype} tensor; pass an integer one (int64)")
    step = step.to(torch.int64)
    if _integer(q) is None or q < 0:
        raise ValueError(f"Invalid q: {q!r}; the number of directions is an integer >= 0")
    x = torch.full_like(step, _as_signed(_splitmix64(check_seed(base_seed))))
    x = _splitmix64_t(x ^ step)
    index = torch.arange(q + rounding, dtype=torch.int64, device=step.device)
    if rounding:  # ROUNDING_INDEX as int64; masked_fill, as an index assignment copies from the host
        index = index.masked_fill(index == q, -1)
    return _splitmix64_t(x.reshape(1) ^ index)
