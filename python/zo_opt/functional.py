"""Functional ops: in-place, seeded noise over a list of parameters, one pass over memory.

The direction z of a seed is defined over the whole list (shared/design/NOISE.md): tensor k
starts at global index ``base_offset + noise.offsets(numels)[k]``, so the same seed gives the
same z on every backend, device and process.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import torch

from . import backends, exact, noise
from .exact import check_pass_args, extent

Scales = Sequence[float] | torch.Tensor
Seeds = Sequence[int] | torch.Tensor  # a tensor: uint64 bits as int64 (seed_list)


def check_params(params: Sequence[torch.Tensor], name: str = "params") -> list[torch.Tensor]:
    if isinstance(params, torch.Tensor):
        raise TypeError(f"{name} must be a list of tensors, not a tensor; wrap it: [tensor]")
    params = list(params)
    for k, p in enumerate(params):
        if not isinstance(p, torch.Tensor):
            raise TypeError(f"{name}[{k}] is a {type(p).__name__}, expected a torch.Tensor")
        if p.is_sparse or p.layout != torch.strided:
            raise TypeError(f"{name}[{k}] is sparse ({p.layout}); zo_opt needs dense tensors")
        if not p.is_floating_point():
            raise TypeError(f"{name}[{k}] has dtype {p.dtype}; zo_opt needs floating point tensors")
        if not p.is_contiguous():
            raise ValueError(f"{name}[{k}] is not contiguous (a view with strides {p.stride()}); "
                             "perturb the tensor it views, or pass p.contiguous() and copy back")
    return params


def _entries(name: str, values: Scales | Seeds) -> int:
    """How many entries a scales/coeffs/seeds argument has (a 0-d tensor has no len())."""
    if isinstance(values, torch.Tensor):
        if values.dim() != 1:
            raise ValueError(f"{name} is a {values.dim()}-d tensor; pass a 1-d one, an entry "
                             "per seed" + (" (and scales[0] for the params)" if name == "scales"
                                           else ""))
        if values.is_complex():  # the cast to float32 would drop the imaginary parts
            raise ValueError(f"{name} is a {values.dtype} tensor; pass real numbers")
    return len(values)


def _check_seed_tensor(seeds: torch.Tensor) -> None:
    if seeds.is_floating_point() or seeds.is_complex() or seeds.dtype == torch.bool:
        raise ValueError(f"Invalid seeds: a {seeds.dtype} tensor; seeds are integers in "
                         "[0, 2**64 - 1] (or their uint64 bits as an int64 tensor)")


def _floats(name: str, values: Scales) -> list[float]:
    """Host scales or coeffs as floats, a bad entry named."""
    if not isinstance(values, Iterable):
        raise TypeError(f"{name} must be a list of numbers or a 1-d tensor, not "
                        f"{type(values).__name__}" + ("; for one seed pass [coeff]"
                                                      if name == "coeffs" else ""))
    out = []
    for i, v in enumerate(values):
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            raise TypeError(f"{name}[{i}] is {v!r}; pass real numbers") from None
    return out


def _scales_on(scales: Scales, device: torch.device) -> torch.Tensor:
    """The scales as a float32 vector on ``device``. Host floats go through pinned memory
    with a non-blocking copy: a pageable copy would make every pass wait for the GPU."""
    if isinstance(scales, torch.Tensor):
        return scales.detach().to(device=device, dtype=torch.float32).reshape(-1)
    host = torch.tensor(_floats("scales", scales), dtype=torch.float32)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


def seed_list(seeds: Seeds) -> list[int]:
    """Seeds as checked Python ints; an integer tensor holds them as uint64 bits (a
    capturable step's record: seeds from 2**63 up are negative there)."""
    if isinstance(seeds, torch.Tensor):
        _check_seed_tensor(seeds)
        return [s & noise.MASK64 for s in seeds.reshape(-1).tolist()]
    if isinstance(seeds, (str, bytes)) or not isinstance(seeds, Iterable):
        raise TypeError(f"seeds must be a list of seeds or an integer tensor, not "
                        f"{type(seeds).__name__} {seeds!r}; for one seed pass [seed]")
    return [noise.check_seed(s) for s in seeds]


def _index(value: int, name: str) -> int:
    """A global index (NOISE.md) as the backends hold it: an int64 from 0 up."""
    index = noise._integer(value)
    if index is None or not 0 <= index < 1 << 63:
        raise ValueError(f"Invalid {name}: {value!r}; global indices are ints in [0, 2**63)")
    return index


def shared_memory(params: Sequence[torch.Tensor]) -> tuple[int, int] | None:
    """The indices of two params whose memory overlaps, if any (first the lower): spans sorted
    by start overlap somewhere only if two neighbours do (params are contiguous)."""
    spans = sorted((str(p.device), p.data_ptr(), p.data_ptr() + p.numel() * p.element_size(), k)
                   for k, p in enumerate(params) if p.numel() and p.device.type != "meta")
    for a, b in zip(spans, spans[1:]):
        if a[0] == b[0] and b[1] < a[2]:
            return tuple(sorted((a[3], b[3])))
    return None


def _bump_versions(tensors: list[torch.Tensor]) -> None:
    """Tell autograd that a pass wrote these (the kernels write through pointers, unseen by it)."""
    try:
        torch.autograd.graph.increment_version(tensors)
    except TypeError:  # an older torch takes one tensor a call
        for t in tensors:
            torch.autograd.graph.increment_version(t)


def seeds_on(seeds: Sequence[int] | torch.Tensor, device: torch.device) -> torch.Tensor:
    """Seeds as an int64 tensor of their uint64 bits on ``device`` (host ints go through
    pinned memory, non-blocking)."""
    if isinstance(seeds, torch.Tensor):
        return seeds.to(device=device, dtype=torch.int64).reshape(-1)
    host = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in seeds], dtype=torch.int64)
    if device.type == "cpu":
        return host
    return host.pin_memory().to(device, non_blocking=True)


class Prepared:
    """A fixed list of parameters made ready for pass after pass (an optimizer's).

    The checks, the global offsets, the choice of backend per tensor and the backends'
    multi-tensor tables are done here, once; :meth:`noise_axpby_` then costs one launch per
    (backend, device, dtype) and no work per tensor. The tables hold the tensors' addresses:
    :meth:`matches` says whether ``params`` still live where they did (``p.data = ...``
    moves them), and a caller prepares again when they do not (until then the passes write
    the memory the params had, on every backend). ``distribution`` is the one
    the passes will mostly draw, and ``exact`` whether they will be exact ones (docs/EXACT.md):
    ``backend="auto"`` picks the backend for them (``backends.AUTO_ORDER``,
    ``EXACT_AUTO_ORDER``); the other kinds of pass still run, on that backend.
    """

    def __init__(self, params: Sequence[torch.Tensor], *, backend: str = "auto",
                 offsets: Sequence[int] | None = None, base_offset: int = 0,
                 distribution: str = "gaussian", exact: bool = False):
        params = check_params(params)
        backends.check_name(backend)
        noise.check_distribution(distribution)
        if offsets is None:
            base_offset = _index(base_offset, "base_offset")
            offsets = [base_offset + o for o in noise.offsets([p.numel() for p in params])]
        elif len(offsets) != len(params):
            raise ValueError(f"offsets has {len(offsets)} entries for {len(params)} params")
        offsets = [_index(o, f"offsets[{k}]") for k, o in enumerate(offsets)]
        for k, (p, o) in enumerate(zip(params, offsets)):
            if o + p.numel() > 1 << 63:
                raise ValueError(f"params[{k}] runs past global index 2**63 - 1 from its offset "
                                 f"{o}: pass a smaller base_offset or offsets")
        shared = shared_memory(params)
        if shared is not None:  # moved twice a pass, and raced over on the parallel backends
            raise ValueError(f"params[{shared[0]}] and params[{shared[1]}] share memory; pass "
                             "each tensor once (tied weights once) and no overlapping views")
        self.key = self.layout(params)
        self.params, self.offsets = params, list(offsets)
        self.has_16bit = any(p.dtype in (torch.float16, torch.bfloat16) for p in params)
        work: dict[tuple[str, torch.device], tuple[list, list]] = {}
        for k, (p, o) in enumerate(zip(params, offsets)):
            if p.numel():
                name = backends.resolve(backend, p, distribution, exact, f"params[{k}]").name
                ps, os_ = work.setdefault((name, p.device), ([], []))
                # An alias of the storage as it is now (same memory and version counter): after
                # a p.data = ... every backend keeps writing where its table points, where the
                # Triton runner wrote the others at the new tensor's address plus old distances.
                ps.append(p.detach())
                os_.append(o)
        self.work = [(backends.BACKENDS[name], device, ps, os_)
                     for (name, device), (ps, os_) in work.items()]
        self.runners = [(device, b.prepare(ps, os_)) for b, device, ps, os_ in self.work]
        # The C++ and Triton kernels write through pointers, unseen by autograd: each pass bumps
        # the version counters itself, or a tensor saved for backward and moved by a pass would
        # give a silently wrong gradient (one call over the list, no work per tensor in Python).
        self._written = [p for _, _, ps, _ in self.work for p in ps]
        self.extent = extent([p.numel() for p in params], offsets)  # `exact` is an argument here
        self._exact_runners = None  # made on first use: most lists never run an exact pass

    @staticmethod
    def layout(params: Sequence[torch.Tensor]) -> tuple:
        return tuple((p.data_ptr(), p.numel(), p.dtype, p.device) for p in params)

    def matches(self, params: Sequence[torch.Tensor]) -> bool:
        return self.layout(params) == self.key

    @torch.no_grad()
    def noise_axpby_(self, seeds: Sequence[int] | torch.Tensor, scales: Scales, *,
                     distribution: str = "gaussian") -> None:
        """``params[k] = scales[0] * params[k] + sum_i scales[1+i] * z_k(seeds[i])``; seeds
        and scales already on the params' device make this launch-only (graph-capturable)."""
        noise.check_distribution(distribution)
        if isinstance(seeds, torch.Tensor):
            _check_seed_tensor(seeds)
        else:  # host ints: 2**64 would wrap to 0, -1 to 2**64-1
            seeds = seed_list(seeds)
        if _entries("scales", scales) != _entries("seeds", seeds) + 1:
            raise ValueError(f"scales has {len(scales)} entries; expected 1 + len(seeds) = "
                             f"{len(seeds) + 1}")
        for device, run in self.runners:
            run(seeds_on(seeds, device), _scales_on(scales, device), distribution)
        _bump_versions(self._written)

    @torch.no_grad()
    def exact_pass_(self, seeds: torch.Tensor, scales: torch.Tensor, n_old: int,
                    codes: torch.Tensor, code_base: int, table, *, encode: bool,
                    rounding: bool, distribution: str, device: torch.device | None = None) -> None:
        """The exact pass of docs/EXACT.md (``seeds``/``scales`` on the params' device; with
        ``rounding`` the last seed is the rounding seed). The arguments' shapes are checked
        here for every backend (metadata only: capturable): a kernel trusts them. With
        ``device``, only the params there (a list over several devices takes a call per
        device, each with the seeds, scales, codes and table on it)."""
        check_pass_args(seeds, scales, int(n_old), codes, int(code_base), table, bool(encode),
                        bool(rounding), distribution, self.extent)
        if self._exact_runners is None:
            for k, p in enumerate(self.params):
                if p.dtype not in exact.DTYPES:
                    raise ValueError(f"params[{k}] is {p.dtype}: exact passes and stochastic "
                                     "rounding take float32, float16 and bfloat16 tensors")
            self._exact_runners = [(d, b.prepare_exact(ps, os_)) for b, d, ps, os_ in self.work]
        for d, run in self._exact_runners:
            if device is None or d == device:
                run(seeds, scales, n_old, codes, code_base, table, encode, rounding, distribution)
        _bump_versions(self._written)

    @torch.no_grad()
    def build_table(self, tau: float) -> exact.Table:
        """The side table of docs/EXACT.md over this list's global index range, each backend
        counting and filling its own tensors (one host sync, for the table's size)."""
        def count_(*args):
            for b, _, ps, os_ in self.work:
                b.count_special_(ps, os_, *args)

        def fill_(*args):
            for b, _, ps, os_ in self.work:
                b.fill_special_(ps, os_, *args)

        return exact.build_table(self.params, self.offsets, tau, count_=count_, fill_=fill_)


@torch.no_grad()
def noise_axpby_(params: Sequence[torch.Tensor], seeds: Seeds, scales: Scales, *,
                 distribution: str = "gaussian", backend: str = "auto",
                 offsets: Sequence[int] | None = None, base_offset: int = 0) -> None:
    """``params[k] = scales[0] * params[k] + sum_i scales[1+i] * z_k(seeds[i])``, in place.

    The primitive of every pass: one backend call per (backend, device) among the params.
    ``offsets`` overrides the global start index of each tensor (the optimizer passes a
    group's slice of the offsets of all its parameters). For many passes over the same list,
    :class:`Prepared` does the per-tensor work once.
    """
    seeds = seed_list(seeds)
    noise.check_distribution(distribution)
    Prepared(params, backend=backend, offsets=offsets, base_offset=base_offset,
             distribution=distribution).noise_axpby_(seeds, scales, distribution=distribution)


def perturb_(params: Sequence[torch.Tensor], seed: int, scale: float, *,
             distribution: str = "gaussian", backend: str = "auto", base_offset: int = 0) -> None:
    """In place, ``params[k] += scale * z_k(seed)`` for a list of tensors."""
    try:
        scale = float(scale)
    except (TypeError, ValueError):
        raise TypeError(f"scale is {scale!r}; pass a real number") from None
    noise_axpby_(params, [seed], [1.0, scale], distribution=distribution, backend=backend,
                 base_offset=base_offset)


def zo_update_(params: Sequence[torch.Tensor], seeds: Seeds, coeffs: Scales, *,
               distribution: str = "gaussian", backend: str = "auto", base_offset: int = 0,
               rounding_seed: int | None = None) -> None:
    """In place, ``params += sum_i coeffs[i] * z(seeds[i])``, in one pass over memory.

    The replay of step records (data-parallel workers, a federated server) and the update of
    the optimizer's last pass. ``coeffs`` may be a tensor on the params' device (no sync).
    ``rounding_seed`` (a record's) stores float16/bfloat16 results with that step's
    stochastic rounding (docs/EXACT.md) instead of round-to-nearest.
    """
    seeds = seed_list(seeds)
    if not isinstance(coeffs, torch.Tensor):
        coeffs = _floats("coeffs", coeffs)
    if _entries("coeffs", coeffs) != len(seeds):
        raise ValueError(f"coeffs has {len(coeffs)} entries for {len(seeds)} seeds")
    if not seeds:
        return
    if isinstance(coeffs, torch.Tensor):
        coeffs = coeffs.detach().to(torch.float32).reshape(-1)
        scales = torch.cat([torch.ones(1, dtype=torch.float32, device=coeffs.device), coeffs])
    else:
        scales = [1.0, *coeffs]
    if rounding_seed is None:
        noise_axpby_(params, seeds, scales, distribution=distribution, backend=backend,
                     base_offset=base_offset)
        return
    seeds = seeds + [noise.check_seed(rounding_seed)]
    plan = Prepared(params, backend=backend, base_offset=base_offset, distribution=distribution,
                    exact=True)
    if base_offset % exact.CHUNK:
        raise ValueError(f"base_offset {base_offset} is not a multiple of {exact.CHUNK}: a pass "
                         "with a rounding_seed works on 128-element chunks (docs/EXACT.md)")
    for device in dict.fromkeys(device for device, _ in plan.runners):
        codes, table = exact.no_state(device)
        plan.exact_pass_(seeds_on(seeds, device), _scales_on(scales, device), 0, codes, 0,
                         table, encode=False, rounding=True, distribution=distribution,
                         device=device)
