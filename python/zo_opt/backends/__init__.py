"""Backends: the same in-place op over a parameter list, on different hardware.

Every backend implements one primitive, the pass of NOISE.md's schedule:

    noise_axpby_(params, offsets, seeds, scales, distribution)
        params[k] = scales[0] * params[k] + sum_i scales[1 + i] * z_k(seeds[i])

``offsets[k]`` is the global index of ``params[k]``'s first element (``noise.offsets``),
``seeds`` are Python ints in [0, 2**64), ``scales`` a float32 vector on the params' device
(so a GPU step need not sync to the host). Arithmetic is float32; results are stored in the
parameter's dtype with round-to-nearest-even.

``prepare(params, offsets)`` does the per-tensor work once for a list that is used pass after
pass (an optimizer's): it returns a :data:`Runner` taking the seeds as an int64 tensor of
uint64 bits and the scales as a float32 tensor, both on the params' device. The GPU backends'
runners then launch and nothing else: no host work per tensor, no copy, no sync, so that a
step can be captured in a CUDA graph.
"""
from __future__ import annotations

from typing import Protocol, Sequence

import torch

from . import cpu, torch_ref
from .runner import Runner, list_runner  # noqa: F401  (re-exported)

# Tried in this order by backend="auto", per device type and distribution. On an H200
# (benchmarks/results, 2026-11-29) the Triton Gaussian pass ran faster than the CUDA one (74%
# against 57% of copy bandwidth in float32, 35% against 30% in bfloat16; a q=1 GPT-2 124M step
# 1.6 against 1.8 ms outside its forwards, 1.0 against 1.4 ms as a CUDA graph), and the CUDA
# Rademacher pass as fast or faster (90% against 88% in float32, 85% against 69% in bfloat16).
AUTO_ORDER = {("cpu", "gaussian"): ("cpu", "torch"), ("cpu", "rademacher"): ("cpu", "torch"),
              ("cuda", "gaussian"): ("triton", "cuda", "torch"),
              ("cuda", "rademacher"): ("cuda", "triton", "torch")}
# The same for lists whose passes are exact (docs/EXACT.md), per device type: the Triton exact
# pass ran 12-25% faster than the CUDA one on the H200 in both dtypes and distributions
# (0.33 against 0.44 ms a bfloat16 Rademacher pass, 0.59 against 0.73 a bfloat16 Gaussian
# one; GPT-2 124M parameter set, the CUDA kernel on 2026-11-29, the Triton one on 11-30).
EXACT_AUTO_ORDER = {"cpu": ("cpu", "torch"), "cuda": ("triton", "cuda", "torch")}


class Backend(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when usable in this process, else a one-line reason."""

    def supports(self, tensor: torch.Tensor) -> bool:
        """Whether this backend handles this tensor's device and dtype."""

    def noise_axpby_(self, params: Sequence[torch.Tensor], offsets: Sequence[int],
                     seeds: Sequence[int], scales: torch.Tensor, distribution: str) -> None:
        ...

    def prepare(self, params: Sequence[torch.Tensor], offsets: Sequence[int]) -> Runner:
        ...

    def prepare_exact(self, params: Sequence[torch.Tensor], offsets: Sequence[int]):
        """The exact pass of docs/EXACT.md over a fixed list (runner.ExactRunner)."""

    def count_special_(self, params: Sequence[torch.Tensor], offsets: Sequence[int],
                       code_base: int, tau: float, counts: torch.Tensor) -> None:
        """The side table's counts per 128-element chunk (zo_opt.exact.count_special_)."""

    def fill_special_(self, params: Sequence[torch.Tensor], offsets: Sequence[int],
                      code_base: int, tau: float, chunk_base: torch.Tensor,
                      bits: torch.Tensor) -> None:
        """The side table's bits at their slots (zo_opt.exact.fill_special_)."""


IMPORT_ERRORS: dict[str, str] = {}  # backend -> why its module did not import


def _optional(module_name: str):
    """Backends whose modules need optional packages register themselves if importable."""
    import importlib

    try:
        return importlib.import_module(f"{__name__}.{module_name}").BACKEND
    except ImportError as e:  # kept: triton present but not importable reads as 'not installed'
        IMPORT_ERRORS[module_name] = f"{type(e).__name__}: {e}"
        return None


def _registry() -> dict[str, Backend]:
    found = [torch_ref.BACKEND, cpu.BACKEND] + [b for b in map(_optional, ("triton", "cuda")) if b]
    return {b.name: b for b in found}


BACKENDS: dict[str, Backend] = _registry()
NAMES = ("auto", "torch", "cpu", "triton", "cuda")


def available_backends() -> list[str]:
    """The backends usable in this process."""
    return [name for name, b in BACKENDS.items() if b.unavailable_reason() is None]


def unavailable_backends() -> dict[str, str]:
    """Each backend that cannot be used here, with the reason."""
    reasons = {name: b.unavailable_reason() for name, b in BACKENDS.items()}
    out = {name: r for name, r in reasons.items() if r is not None}
    for name in NAMES[1:]:
        if name not in BACKENDS:
            out[name] = ("not installed (its module failed to import: "
                         f"{IMPORT_ERRORS.get(name, 'no error recorded')})")
    return out


def check_name(backend: str) -> str:
    if backend not in NAMES:
        raise ValueError(f"Invalid backend: {backend!r}; choose one of {NAMES}")
    if backend != "auto":
        reason = unavailable_backends().get(backend)
        if reason is not None:
            raise ValueError(f"backend {backend!r} is not available: {reason}; "
                             f"available: {available_backends()}")
    return backend


def resolve(backend: str, tensor: torch.Tensor, distribution: str = "gaussian",
            exact: bool = False, name: str = "the tensor") -> Backend:
    """The backend that runs ``tensor`` (``name`` in messages): the named one, or auto's first
    that supports it for passes of ``distribution``, exact ones with ``exact``."""
    check_name(backend)
    if backend != "auto":
        b = BACKENDS[backend]
        if not b.supports(tensor):
            raise ValueError(f"{name} is a {tensor.dtype} tensor on {tensor.device}, which backend "
                             f"{backend!r} does not support; use backend='auto' or 'torch'")
        return b
    order = (EXACT_AUTO_ORDER.get(tensor.device.type) if exact
             else AUTO_ORDER.get((tensor.device.type, distribution)))
    for name in order or ("torch",):
        b = BACKENDS.get(name)
        if b is not None and b.unavailable_reason() is None and b.supports(tensor):
            return b
    return BACKENDS["torch"]
