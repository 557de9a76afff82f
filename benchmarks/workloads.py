"""What is timed, shared by the pytest-benchmark suites (CPU) and the GPU driver (gpu/driver.py).

Implementations are named by strings that become the rows of every table:

* ``zo-opt[<backend>]``: ``zo_opt.functional.perturb_`` (a pass) or ``ZOOptimizer`` (a step);
* ``mezo-loop``, ``old-loop``: the baselines of baselines.py;
* ``copy``: a copy of the same bytes (passes only), the memory-bandwidth ceiling.

A pass reads and writes every parameter element once, so every pass row counts
``2 * parameter bytes`` moved, whatever the implementation really moves.
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

import zo_opt
from zo_opt import exact as zo_exact
from zo_opt.backends import BACKENDS

from . import baselines

BASELINES = ("mezo-loop", "old-loop")
EPS = 1e-3
LR = 1e-6  # MeZO's full fine-tuning range; small enough that steps barely move the model
SEED = 1234


# -- which implementations exist here ---------------------------------------------------------

def backend_skip_reason(backend: str, device: str | torch.device) -> str | None:
    """Why zo-opt's ``backend`` is not benchmarked on ``device`` (None: it is)."""
    device = torch.device(device)
    reason = zo_opt.unavailable_backends().get(backend)
    if reason is not None:
        return f"backend {backend!r} unavailable: {reason}"
    if backend == "triton" and device.type == "cpu":
        return "triton on the CPU runs in its Python interpreter, far too slow to benchmark"
    if not BACKENDS[backend].supports(torch.empty(0, device=device)):
        return f"backend {backend!r} does not run {device.type} tensors"
    return None


def zo_backends(device: str | torch.device) -> list[str]:
    """zo-opt's backends benchmarked on ``device``, fastest-first as ``auto`` would try them."""
    return [b for b in ("cuda", "triton", "cpu", "torch") if backend_skip_reason(b, device) is None]


def dtype_skip_reason(impl: str, dtype: torch.dtype) -> str | None:
    if impl.startswith("zo-opt["):
        backend = impl[len("zo-opt["):-1]
        probe = torch.empty(0, dtype=dtype)
        if backend in ("cpu", "torch") and not BACKENDS[backend].supports(probe):
            return f"backend {backend!r} has no {dtype}"
    return None


# -- one pass over the parameters -------------------------------------------------------------

def param_bytes(params: Sequence[torch.Tensor]) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def make_pass(impl: str, params: list[torch.Tensor], distribution: str = "gaussian") -> Callable[[], None]:
    """A callable doing one in-place pass ``theta += eps * z`` over ``params`` (or the copy)."""
    if impl == "copy":
        n = param_bytes(params)
        src = torch.full((n,), 0x3C, dtype=torch.uint8, device=params[0].device)
        dst = torch.empty_like(src)
        return lambda: baselines.copy_pass(src, dst)
    if distribution != "gaussian" and impl in BASELINES:
        raise ValueError(f"{impl} draws Gaussian directions only")
    if impl == "mezo-loop":
        return lambda: baselines.mezo_perturb_(params, SEED, EPS)
    if impl == "old-loop":
        return lambda: baselines.old_perturb_(params, SEED, EPS)
    # As the optimizer runs a pass: the list prepared once, seeds and scales on the device.
    plan = zo_opt.functional.Prepared(params, backend=_backend_of(impl))
    device = params[0].device
    seeds = zo_opt.functional.seeds_on([SEED], device)
    scales = torch.tensor([1.0, EPS], dtype=torch.float32, device=device)
    return lambda: plan.noise_axpby_(seeds, scales, distribution=distribution)


def make_pass_cycle(backend: str, params: list[torch.Tensor], distribution: str = "gaussian",
                    *, exact: bool = False) -> Callable[[], None]:
    """Three passes that leave theta where it was, as a step's passes do: ``+eps z``, then
    ``-eps z``, then back; plain (fused axpby passes) or exact (decode, displace, encode)."""
    plan = zo_opt.functional.Prepared(params, backend=backend)
    device = params[0].device
    seed = zo_opt.functional.seeds_on([SEED], device)
    pair = zo_opt.functional.seeds_on([SEED, SEED], device)

    def const(*values):
        return torch.tensor([1.0, *values], dtype=torch.float32, device=device)

    if not exact:
        plus, flip, back = const(EPS), const(-2 * EPS), const(EPS)

        def cycle():
            for scales in (plus, flip, back):
                plan.noise_axpby_(seed, scales, distribution=distribution)
        return cycle
    base, n = zo_exact.span(plan.params, plan.offsets)
    codes = torch.zeros(n, dtype=torch.int8, device=device)
    table = plan.build_table(zo_exact.tau(EPS, distribution))
    plus, flip, back = const(EPS), const(EPS, -EPS), const(-EPS)

    def cycle():
        for seeds, scales, n_old, encode in ((seed, plus, 0, True), (pair, flip, 1, True),
                                             (seed, back, 1, False)):
            plan.exact_pass_(seeds, scales, n_old, codes, base, table, encode=encode,
                             rounding=False, distribution=distribution)
    return cycle


def pass_impls(device, distribution: str = "gaussian") -> list[str]:
    impls = ["copy"] + [f"zo-opt[{b}]" for b in zo_backends(device)]
    return impls + (list(BASELINES) if distribution == "gaussian" else [])


def _backend_of(impl: str) -> str:
    if not (impl.startswith("zo-opt[") and impl.endswith("]")):
        raise ValueError(f"unknown implementation {impl!r}")
    return impl[len("zo-opt["):-1]


# -- a whole ZO step --------------------------------------------------------------------------

def make_stepper(impl: str, params: list[torch.Tensor], q: int, *, lr: float = LR, eps: float = EPS,
                 distribution: str = "gaussian"):
    """An object with ``step(closure)`` running one central-difference ZO-SGD step."""
    if impl == "mezo-loop":
        return baselines.MezoLoop(params, lr, q=q, eps=eps, seed=SEED)
    if impl == "old-loop":
        return baselines.OldLoop(params, lr, q=q, eps=eps, seed=SEED)
    return zo_opt.ZOOptimizer(params, lr=lr, q=q, eps=eps, distribution=distribution,
                              seed=SEED, backend=_backend_of(impl))


def step_impls(device) -> list[str]:
    return [f"zo-opt[{b}]" for b in zo_backends(device) if b != "torch"] + list(BASELINES)


class Clock:
    """Intervals on a device's timeline: CUDA events (no host sync until ``seconds()``),
    or the host clock on the CPU."""

    def __init__(self, device):
        self.cuda = torch.device(device).type == "cuda"
        self.marks: list[tuple] = []

    def start(self):
        mark = torch.cuda.Event(enable_timing=True) if self.cuda else None
        if self.cuda:
            mark.record()
        return mark if self.cuda else time.perf_counter()

    def stop(self, begin) -> None:
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.marks.append((begin, end))
        else:
            self.marks.append((begin, time.perf_counter()))

    def seconds(self) -> float:
        """Sum of the recorded intervals, then forget them."""
        if self.cuda:
            torch.cuda.synchronize()
            total = sum(b.elapsed_time(e) for b, e in self.marks) / 1e3
        else:
            total = sum(e - b for b, e in self.marks)
        self.marks = []
        return total


def forward_closure(model, inputs, targets, clock: Clock | None = None):
    """The loss closure of a step; with a clock, each forward's interval is recorded."""
    def closure():
        begin = clock.start() if clock else None
        loss = model(inputs, targets)
        if clock:
            clock.stop(begin)
        return loss
    return closure


def timed_step(stepper, closure, forwards: Clock, device) -> tuple[float, float]:
    """(step seconds, seconds inside the forwards) of one step."""
    whole = Clock(device)
    begin = whole.start()
    stepper.step(closure)
    whole.stop(begin)
    return whole.seconds(), forwards.seconds()


def probe_closure(params: Sequence[torch.Tensor]):
    """A loss that reads one element: a step with it allocates only what the optimizer does.
    (``params[0]`` is looked up at each call: the MeZO loop rebinds ``p.data``.)"""
    return lambda: params[0].reshape(-1)[:1].float().square().sum()


# -- timing and memory ------------------------------------------------------------------------

def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def time_fn(fn: Callable[[], object], device, *, warmup: int = 2, reps: int = 10) -> list[float]:
    """Seconds per call: of each of ``reps`` calls after ``warmup`` calls on the CPU; on a GPU,
    of 5 batches of ``reps`` back-to-back calls (CUDA events around each batch) after at least
    0.3 s of warm-up calls, so that the clocks have ramped up and the launches queue ahead
    of the GPU: the GPU's time per call, which is what a loop of passes costs."""
    if torch.device(device).type == "cuda":
        return _time_cuda(fn, device, reps)
    for _ in range(warmup):
        fn()
    clock = Clock(device)
    out = []
    for _ in range(reps):
        begin = clock.start()
        fn()
        clock.stop(begin)
        out.append(clock.seconds())
    return out


def _time_cuda(fn: Callable[[], object], device, reps: int) -> list[float]:
    fn()
    torch.cuda.synchronize()
    end = time.perf_counter() + 0.3
    while time.perf_counter() < end:
        fn()
        torch.cuda.synchronize()
    clock = Clock(device)
    out = []
    for _ in range(5):
        begin = clock.start()
        for _ in range(reps):
            fn()
        clock.stop(begin)
        out.append(clock.seconds() / reps)
    return out


def median(xs: Sequence[float]) -> float:
    return statistics.median(xs)


def peak_extra_bytes(make: Callable[[], Callable[[], object]], device) -> int:
    """Peak bytes allocated while ``fn = make()`` runs, above what was allocated before it.

    ``make`` builds the state (parameters, optimizer, a warm-up step) and returns ``fn``.
    CUDA: ``torch.cuda.max_memory_allocated``. CPU: the allocation events of torch's profiler,
    which sees every allocation through torch's CPU allocator, temporaries inside ops
    included (memory a C++ kernel takes with plain malloc would not be seen). ``make`` runs
    under the profiler too, because it reports no free of a block allocated before it started
    (the MeZO loop replaces every parameter's storage at each pass).
    """
    if torch.device(device).type == "cuda":
        fn = make()
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    from torch._C._profiler import _EventType
    from torch.profiler import ProfilerActivity, profile, record_function

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn = make()
        with record_function("zo_bench::measured"):
            fn()
    allocs: list[tuple[int, int]] = []
    window: list[tuple[int, int]] = []

    def walk(nodes):
        for node in nodes:
            kind = node.typed[0]
            if kind == _EventType.Allocation and node.typed[1].device.type == "cpu":
                allocs.append((node.start_time_ns, node.typed[1].alloc_size))
            elif node.name == "zo_bench::measured":
                window.append((node.start_time_ns, node.end_time_ns))
            walk(node.children)

    walk(prof.profiler.kineto_results.experimental_event_tree())
    (begin, end), = window
    running, base, peak = 0, None, 0
    for t, size in sorted(allocs):
        if base is None and t >= begin:
            base = peak = running
        running += size
        if base is not None and t <= end:
            peak = max(peak, running)
    return 0 if base is None else peak - base
