"""GPU benchmark driver (run by run.sh): one markdown table of passes and steps.

Passes over the GPT-2 124M and 1.07B parameter sets (float32 and bfloat16; Gaussian and
Rademacher) for each zo-opt GPU backend, against a device-to-device copy of the same bytes,
the MeZO-style loop and the old repo's loop; then central-difference steps (q=1, q=16) of a
GPT-2 124M forward (batch 8 x 128 tokens): time per step, share outside the forwards, peak
extra memory. The implementations are those of benchmarks/workloads.py (the CPU suites' code).

    python benchmarks/gpu/driver.py --out DIR              # on a GPU machine
    python benchmarks/gpu/driver.py --device cpu --dry-run  # tiny sizes: checks the logic

Timing: passes are timed in batches of back-to-back calls after 0.3 s of warm-up (the clocks
ramp up; the launches queue ahead of the GPU), CUDA events around each batch, the median of
5 batches; each row notes the SM clock read just after it. Steps are timed one by one (the
host's work between passes counts); zo-opt's also run once under torch.profiler (when the
GPU idles in a step, and before what: benchmarks/timeline.py) and back to back. Graphed
steps (``capturable=True``, one CUDA graph per step) are timed over replays; their share
outside the forwards is the step's time less that of a graph of the same 2q forwards alone.
Every row stops being measured once ``--budget-s`` is spent (the table says which were
skipped).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

if __package__ in (None, ""):  # run as a script: make ``benchmarks`` importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import torch  # noqa: E402

import zo_opt  # noqa: E402
from zo_opt import exact as zo_exact  # noqa: E402
from benchmarks import timeline, workloads  # noqa: E402
from benchmarks.gpt2 import GPT2, batch  # noqa: E402
from benchmarks.shapes import SIZES, GPT2Size, make_params  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
TINY = GPT2Size("tiny", 64, 2, 2, 64, vocab=512)  # --dry-run


def versions(device: str) -> dict:
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "zo_opt": zo_opt.__version__,
            "date": dt.date.today().isoformat(), "device": device}
    try:
        import triton

        info["triton"] = triton.__version__
        from zo_kernels import exact, noise_axpby

        # what the rows outside the sweep ran (the tables of later runs differ)
        info["triton_tilings"] = {f"{d} {size}-byte": list(t)
                                  for (d, size), t in noise_axpby.TILINGS.items()}
        info["triton_exact_config"] = list(exact.CONFIG)
    except ImportError:
        info["triton"] = "none"
    if torch.device(device).type == "cuda":
        info["card"] = torch.cuda.get_device_name()
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=30)
            info["driver"] = out.stdout.strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            info["driver"] = "unknown"
    else:
        info["card"], info["driver"] = "cpu", "none"
    return info


def file_stem(info: dict) -> str:
    def slug(s: str) -> str:
        return re.sub(r"[^A-Za-z0-9.]+", "-", str(s)).strip("-").lower()

    return (f"gpu-{slug(info['card'])}-driver{slug(info['driver'])}-torch{slug(info['torch'])}"
            f"-triton{slug(info['triton'])}-{info['date']}")


class Budget:
    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> bool:
        return time.monotonic() < self.end


def sm_clock_mhz(device) -> int | None:
    """The SM clock now (NVML through torch), to tell a cold card's numbers from a warm one's."""
    if torch.device(device).type != "cuda":
        return None
    try:
        return int(torch.cuda.clock_rate())
    except Exception:  # no NVML here: the table says '-'
        return None


def graph_seconds(fn, reps: int) -> float:
    # reps: replays per timed batch (5 batches after the 0.3 s warm-up)
    """Seconds per replay of a CUDA graph of ``fn`` (warmed up on a side stream first)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    t = workloads.median(workloads.time_fn(graph.replay, "cuda", reps=reps))
    del graph
    return t


def free(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


# -- passes -----------------------------------------------------------------------------------

def pass_rows(size, dtype_name: str, device, reps: int, budget: Budget) -> list[dict]:
    dtype = DTYPES[dtype_name]
    label = size if isinstance(size, str) else size.name
    params = make_params(size, dtype, device)
    nbytes = 2 * workloads.param_bytes(params)
    todo = [("copy", "gaussian")]
    for dist in ("gaussian", "rademacher"):
        todo += [(impl, dist) for impl in workloads.pass_impls(device, dist)
                 if impl not in ("copy", "zo-opt[torch]")]  # the reference is no fast path
    rows, seconds = [], {}
    for impl, dist in todo:
        row = dict(kind="pass", workload=f"pass {label}", dtype=dtype_name, distribution=dist, impl=impl)
        reason = workloads.dtype_skip_reason(impl, dtype)
        if reason is None and not budget.left():
            reason = "time budget spent"
        if reason:
            rows.append(dict(row, skipped=reason))
            continue
        fn = workloads.make_pass(impl, params, dist)
        t = workloads.median(workloads.time_fn(fn, device, warmup=3, reps=reps))
        del fn
        free(device)
        seconds[(impl, dist)] = t
        rows.append(dict(row, seconds=t, gbps=nbytes / t / 1e9, sm_mhz=sm_clock_mhz(device)))
    copy, mezo = seconds.get(("copy", "gaussian")), seconds.get(("mezo-loop", "gaussian"))
    for r in rows:
        if "seconds" in r:
            r["pct_copy"] = copy / r["seconds"] if copy else None
            r["speedup"] = mezo / r["seconds"] if mezo and r["impl"] != "copy" else None
    del params
    free(device)
    return rows


# The plain pass's candidate tilings per distribution (zo_kernels.noise_axpby.Tiling: block,
# warps, halves, maxnreg, lazy_masks, persistent), and the exact kernel's
# (zo_kernels.exact.CONFIG: block, warps, halves, lazy_masks). Each pair that differs in one setting
# answers one question. Rademacher (the 16-bit pass at 69% of copy on 11-29 whatever the
# tile, 16 to 64 bytes a thread, and the cap), every variant without spills on Triton 3.6
# and 3.7 but the two at 64 registers (3.6: 84 bytes eager, 52 lazy): the 16-bit default
# (8192 x 8 in halves, lazy masks, capped at 80) against eager masks (21 SASS instructions
# an element on an interior tile's path where lazy ones take 14.5), against four blocks an SM
# (64) and uncapped; a persistent grid (the CUDA kernel's shape, at 85%) against one program
# a tile, at 4096 x 8 capped at 80, with either masks; the float32 default (4096 x 8 eager);
# tile sizes. Gaussian: lazy (the default) against eager masks, persistent, caps and tiles.
PLAIN_SWEEP = {
    "rademacher": ((8192, 8, 2, 80, True), (8192, 8, 2, 80), (8192, 8, 2, 64),
                   (8192, 8, 2, 64, True), (8192, 8, 2, None, True),
                   (4096, 8, 1, 80, True), (4096, 8, 1, 80, True, 3), (4096, 8, 1, 80),
                   (4096, 8, 1, 80, False, 3), (8192, 16, 2), (4096, 8, 2, 64), (2048, 4, 2)),
    "gaussian": ((4096, 8, 2, None, True), (4096, 8, 2), (4096, 8, 2, None, True, 4),
                 (4096, 8, 2, 80), (2048, 4, 2), (2048, 4, 2, None, True), (4096, 8),
                 (8192, 16, 2)),
}
EXACT_SWEEP = ((1024, 4, 1, False), (1024, 4, 1, True), (2048, 4, 1, False), (2048, 4, 1, True),
               (2048, 4, 2, False), (4096, 8, 2, False))
# Each variant compiles on its first pass (seconds of ptxas each): the kinds whose targets
# are open go first (16-bit types, and in them Rademacher passes, the reachable one), so that
# a spent budget skips float32 rows.
SWEEP_DTYPES = ("bfloat16", "float32")
SWEEP_DISTRIBUTIONS = ("rademacher", "gaussian")


def sweep_rows(size, device, reps: int, budget: Budget, tilings=PLAIN_SWEEP,
               configs=EXACT_SWEEP, dtypes=SWEEP_DTYPES) -> list[dict]:
    """The Triton kernels per dtype and distribution as % of copy: the plain pass at each of
    ``tilings[distribution]`` (the best goes into zo_kernels.noise_axpby.TILINGS), then the
    exact pass cycle at each (block, warps, halves, lazy_masks) of ``configs``
    (zo_kernels.exact.CONFIG)."""
    from zo_kernels import exact as exact_kernels, noise_axpby

    def variants(params, dist):
        key = (dist, params[0].element_size())
        plain_pass = lambda ps: workloads.make_pass("zo-opt[triton]", ps, dist)
        plain = [(_tiling_name(t), 1, mock.patch.dict(noise_axpby.TILINGS, {key: t}), plain_pass)
                 for t in [noise_axpby.Tiling(*c) for c in tilings[dist]]]
        # the exact runner reads CONFIG on its first pass
        cycle = [(_tiling_name(noise_axpby.Tiling(*c[:3], lazy_masks=c[3])), 3,
                  mock.patch.object(exact_kernels, "CONFIG", tuple(c)),
                  lambda ps: workloads.make_pass_cycle("triton", ps, dist, exact=True))
                 for c in configs]
        # what each must leave: one pass at the default tiling; the start, after a cycle
        return (("plain pass", lambda ps: plain_pass(ps)(), plain),
                ("exact 3-pass cycle", lambda ps: None, cycle))

    return _variant_rows("sweep", size, device, reps, budget, dtypes, variants)


def _tiling_name(t) -> str:
    return (f"BLOCK={t.block} warps={t.warps}" + (f" halves={t.halves}" if t.halves > 1 else "")
            + (f" maxnreg={t.maxnreg}" if t.maxnreg else "")
            + (" lazy masks" if t.lazy_masks else "")
            + (f" persistent={t.persistent}" if t.persistent else ""))


def _variant_rows(title, size, device, reps: int, budget: Budget, dtypes, variants) -> list[dict]:
    """Rows of the Triton variants that ``variants(params, distribution)`` lists per kind of
    pass, as (kind, what one run of every variant must do to a copy of the parameters, and
    the variants: (name, passes a run, the setting in force while it is made and timed,
    make(params) -> one run)), on ``size``'s parameters per dtype and distribution, each
    against a copy of the bytes. A variant whose run leaves other bits than that is timed
    but named "WRONG BITS" and never the best: a sweep must not crown a wrong kernel."""
    label = size if isinstance(size, str) else size.name
    rows = []
    for dtype_name in dtypes:
        params = make_params(size, DTYPES[dtype_name], device)
        nbytes = 2 * workloads.param_bytes(params)
        copy = workloads.median(workloads.time_fn(workloads.make_pass("copy", params), device,
                                                  warmup=3, reps=reps))
        for dist in SWEEP_DISTRIBUTIONS:
            for kind, expect, listed in variants(params, dist):
                timed = []
                for name, passes, setting, make in listed:
                    row = dict(kind="pass", workload=f"{title} {label}: {kind}", dtype=dtype_name,
                               distribution=dist, impl=f"zo-opt[triton] {name}")
                    if not budget.left():
                        rows.append(dict(row, skipped="time budget spent"))
                        continue
                    expected = [p.clone() for p in params]  # outside the variant's setting
                    expect(expected)
                    with setting:
                        right = _leaves(make, params, expected)
                        t = workloads.median(workloads.time_fn(make(params), device, warmup=3,
                                                               reps=reps))
                    rows.append(dict(row, seconds=t, gbps=passes * nbytes / t / 1e9,
                                     pct_copy=passes * copy / t, sm_mhz=sm_clock_mhz(device)))
                    if right:
                        timed.append(rows[-1])
                    else:
                        rows[-1]["impl"] += " WRONG BITS"
                        print(f"[driver] WRONG BITS: {kind} {dtype_name} {dist} {name}",
                              flush=True)
                if timed:
                    best = min(timed, key=lambda r: r["seconds"])
                    print(f"[driver] {title} {dtype_name} {dist} {kind}: best {best['impl']} "
                          f"({100 * best['pct_copy']:.0f}% of copy)", flush=True)
        del params
        free(device)
    return rows


def _leaves(make, params, expected) -> bool:
    """Whether one run of ``make`` on a copy of ``params`` leaves the bits of ``expected``
    (made from ``params`` as they are now: the timed runs before have moved them)."""
    trial = [p.clone() for p in params]
    make(trial)()
    return all(torch.equal(a.view(torch.uint8), b.view(torch.uint8))
               for a, b in zip(trial, expected))


def exact_rows(size, dtype_name: str, device, reps: int, budget: Budget) -> list[dict]:
    """Three passes out and back (+eps z, -eps z, theta), plain vs exact, per backend; and the
    per-step cost of building the exact mode's side table. GB/s counts the three passes'
    parameter bytes (not the codes)."""
    dtype = DTYPES[dtype_name]
    label = size if isinstance(size, str) else size.name
    params = make_params(size, dtype, device)
    nbytes = 3 * 2 * workloads.param_bytes(params)
    rows = []
    for backend in [b for b in workloads.zo_backends(device) if b != "torch"]:
        for dist in ("gaussian", "rademacher"):
            times = {}
            for exact in (False, True):
                row = dict(kind="pass", workload=f"3 passes out and back {label}", dtype=dtype_name,
                           distribution=dist, impl=f"zo-opt[{backend}]" + (" exact" if exact else ""))
                if not budget.left():
                    rows.append(dict(row, skipped="time budget spent"))
                    continue
                try:
                    fn = workloads.make_pass_cycle(backend, params, dist, exact=exact)
                    t = workloads.median(workloads.time_fn(fn, device, reps=reps))
                except Exception as e:  # report it, keep the other rows
                    rows.append(dict(row, skipped=f"failed: {type(e).__name__}: {e}"[:200]))
                    continue
                times[exact] = t
                rows.append(dict(row, seconds=t, gbps=nbytes / t / 1e9, sm_mhz=sm_clock_mhz(device)))
            if len(times) == 2:
                rows[-1]["overhead"] = times[True] / times[False] - 1
    tau = zo_exact.tau(workloads.EPS, "gaussian")
    for backend in workloads.zo_backends(device):
        if not budget.left():
            break
        plan = zo_opt.functional.Prepared(params, backend=backend)
        t = workloads.median(workloads.time_fn(lambda: plan.build_table(tau), device, reps=3))
        table = plan.build_table(tau)
        rows.append(dict(kind="pass", workload=f"side table {label} (once a step)", dtype=dtype_name,
                         distribution="gaussian",
                         impl=f"zo-opt[{backend}] table: {table.count / sum(p.numel() for p in params):.2%} special",
                         seconds=t, gbps=workloads.param_bytes(params) / t / 1e9,
                         sm_mhz=sm_clock_mhz(device)))
    del params
    free(device)
    return rows


# -- steps ------------------------------------------------------------------------------------

def step_rows(size, q: int, batch_size: int, seq: int, device, reps: int, budget: Budget) -> list[dict]:
    label = size if isinstance(size, str) else size.name
    model = GPT2(size, torch.float32, device)
    x, y = batch(size, batch_size, seq, device)
    params = list(model.parameters())
    snapshot = [p.detach().clone() for p in params]
    rows = []
    for impl in workloads.step_impls(device):
        row = dict(kind="step", workload=f"step q={q}, GPT-2 {label} fwd {batch_size}x{seq}",
                   dtype="float32", distribution="gaussian", impl=impl, q=q)
        if not budget.left():
            rows.append(dict(row, skipped="time budget spent"))
            continue
        stepper = workloads.make_stepper(impl, params, q)
        forwards = workloads.Clock(device)
        closure = workloads.forward_closure(model, x, y, forwards)
        workloads.timed_step(stepper, closure, forwards, device)  # warm-up
        runs = [workloads.timed_step(stepper, closure, forwards, device) for _ in range(reps)]
        step_s = workloads.median([s for s, _ in runs])
        fwd_s = workloads.median([f for _, f in runs])
        plain = workloads.forward_closure(model, x, y)
        lead_s = workloads.median([host_lead_s(stepper, plain, device) for _ in range(reps)])
        probe = workloads.probe_closure(params)
        peak = workloads.peak_extra_bytes(lambda: lambda: stepper.step(probe), device)
        rows.append(dict(row, seconds=step_s, forward_s=fwd_s, outside_s=step_s - fwd_s,
                         outside_share=1 - fwd_s / step_s, host_lead_s=lead_s,
                         peak_extra_share=peak / workloads.param_bytes(params),
                         sm_mhz=sm_clock_mhz(device)))
        if impl.startswith("zo-opt["):  # (the loops read each g on the host: they cannot)
            try:
                rows[-1]["timeline"] = dataclasses.asdict(timeline.step_timeline(stepper, plain, device))
            except Exception as e:  # a diagnostic: the row's figures stand without it
                rows[-1]["timeline_error"] = f"{type(e).__name__}: {e}"[:200]
            step_s, fwd_s = back_to_back_s(stepper, closure, forwards, device, reps)
            rows.append(dict(row, impl=f"{impl} back to back", seconds=step_s, forward_s=fwd_s,
                             outside_s=step_s - fwd_s, outside_share=1 - fwd_s / step_s,
                             peak_extra_share=None, sm_mhz=sm_clock_mhz(device)))
        with torch.no_grad():
            for p, p0 in zip(params, snapshot):
                p.data = p0.clone()
        stepper = closure = None  # freed before the next implementation
        free(device)
    if torch.device(device).type == "cuda":
        rows += graphed_step_rows(model, x, y, q, label, batch_size, seq, reps, budget)
    mezo = next((r for r in rows if r["impl"] == "mezo-loop" and "seconds" in r), None)
    for r in rows:
        if "seconds" in r and mezo and r["impl"] != "mezo-loop":
            r["speedup"] = mezo["seconds"] / r["seconds"]
            r["outside_speedup"] = mezo["outside_s"] / max(r["outside_s"], 1e-12)
    del model, params, snapshot
    free(device)
    return rows


def back_to_back_s(stepper, closure, forwards, device, reps: int) -> tuple[float, float]:
    """(step, forwards) seconds per step over ``reps`` steps with no sync between them, as a
    training loop that reads the loss every few steps runs them: the host prepares a step
    while the GPU still runs the last one."""
    whole = workloads.Clock(device)
    forwards.seconds()  # forget earlier intervals
    workloads.sync(device)
    begin = whole.start()
    for _ in range(reps):
        stepper.step(closure)
    whole.stop(begin)
    return whole.seconds() / reps, forwards.seconds() / reps


def host_lead_s(stepper, closure, device) -> float:
    """Host seconds from ``step()`` to its first closure call, the device idle: the part of
    an eager step's time outside the forwards that a CUDA graph does not have."""
    marks = []

    def marked():
        marks.append(time.perf_counter())
        return closure()

    workloads.sync(device)
    start = time.perf_counter()
    stepper.step(marked)
    workloads.sync(device)
    return marks[0] - start


def bf16_step_rows(size, q: int, batch_size: int, seq: int, device, reps: int, budget: Budget) -> list[dict]:
    """A bfloat16 GPT-2 step per GPU backend, round-to-nearest vs exact restore + stochastic
    rounding (the default for 16-bit weights): what exact mode costs a whole step. The two
    optimizers' steps alternate, so that a drift in the forwards' speed reaches both alike (one
    H200 run timed its first bfloat16 rows' forwards 1.5-2.4x slower than a rerun did; the
    cause was not found)."""
    label = size if isinstance(size, str) else size.name
    model = GPT2(size, torch.bfloat16, device)
    x, y = batch(size, batch_size, seq, device)
    params = list(model.parameters())
    snapshot = [p.detach().clone() for p in params]
    rows = []
    for backend in [b for b in workloads.zo_backends(device) if b != "torch"]:
        row = dict(kind="step", workload=f"step q={q}, GPT-2 {label} bf16 fwd {batch_size}x{seq}",
                   dtype="bfloat16", distribution="gaussian", q=q)
        names = {False: f"zo-opt[{backend}] round to nearest", True: f"zo-opt[{backend}] exact + SR"}
        if not budget.left():
            rows += [dict(row, impl=name, skipped="time budget spent") for name in names.values()]
            continue
        forwards = workloads.Clock(device)
        closure = workloads.forward_closure(model, x, y, forwards)
        opts = {exact: zo_opt.ZOOptimizer(params, lr=workloads.LR, q=q, eps=workloads.EPS,
                                          seed=workloads.SEED, backend=backend, exact=exact,
                                          stochastic_rounding=exact)
                for exact in names}
        runs = {exact: [] for exact in names}
        for rep in range(reps + 1):  # the first round warms up
            for exact, opt in opts.items():
                timed = workloads.timed_step(opt, closure, forwards, device)
                if rep:
                    runs[exact].append(timed)
        for exact, name in names.items():
            step_s = workloads.median([s for s, _ in runs[exact]])
            fwd_s = workloads.median([f for _, f in runs[exact]])
            rows.append(dict(row, impl=name, seconds=step_s, forward_s=fwd_s,
                             outside_s=step_s - fwd_s, outside_share=1 - fwd_s / step_s,
                             peak_extra_share=None, sm_mhz=sm_clock_mhz(device)))
        with torch.no_grad():
            for p, p0 in zip(params, snapshot):
                p.copy_(p0)
        del opts, closure
        free(device)
    del model, params, snapshot
    free(device)
    return rows


def graphed_step_rows(model, x, y, q, label, batch_size, seq, reps, budget) -> list[dict]:
    """The step as one CUDA graph (ZOOptimizer(capturable=True)) per GPU backend."""
    params = list(model.parameters())
    snapshot = [p.detach().clone() for p in params]
    loss = lambda: model(x, y)  # noqa: E731

    def forwards():
        with torch.no_grad():
            for _ in range(2 * q):
                loss()

    rows, fwd_s = [], None
    for backend in ("cuda", "triton"):
        row = dict(kind="step", workload=f"step q={q}, GPT-2 {label} fwd {batch_size}x{seq}",
                   dtype="float32", distribution="gaussian", impl=f"zo-opt[{backend}] graphed", q=q)
        if backend not in workloads.zo_backends("cuda"):
            continue
        if not budget.left():
            rows.append(dict(row, skipped="time budget spent"))
            continue
        try:
            fwd_s = fwd_s or graph_seconds(forwards, reps)
            opt = zo_opt.ZOOptimizer(params, lr=workloads.LR, q=q, eps=workloads.EPS,
                                     seed=workloads.SEED, backend=backend, capturable=True)
            step_s = graph_seconds(lambda: opt.step(loss), reps)
        except Exception as e:  # report it in the table, keep the other rows
            rows.append(dict(row, skipped=f"failed: {type(e).__name__}: {e}"[:200]))
            continue
        finally:
            with torch.no_grad():
                for p, p0 in zip(params, snapshot):
                    p.copy_(p0)
        rows.append(dict(row, seconds=step_s, forward_s=fwd_s, outside_s=step_s - fwd_s,
                         outside_share=1 - fwd_s / step_s, peak_extra_share=None,
                         sm_mhz=sm_clock_mhz("cuda")))
        free("cuda")
    return rows


# -- the table --------------------------------------------------------------------------------

def table(rows: list[dict], info: dict) -> str:
    head = [f"# zo-opt on {info['card']} (driver {info['driver']}), torch {info['torch']} "
            f"(CUDA {info['cuda']}), triton {info['triton']}, {info['date']}", "",
            "Passes: `theta += eps * z` in place over the parameter set; GB/s counts one read "
            "and one write of every parameter byte; % of copy compares with a device-to-device "
            "copy of the same bytes; speed-up is against the MeZO-style loop (Gaussian, "
            "torch.normal per tensor) on the same parameters. Steps: central differences, q "
            "directions = 2q forwards of a float32 GPT-2 (torch defaults: no TF32); time per "
            "step (median), share of it outside the "
            "forwards (timed with CUDA events inside the closure; for eager steps, the host "
            "time from step() to the first forward, which the GPU waits through, as each step "
            "is timed alone; \"back to back\": steps with no sync between them), speed-up of "
            "the step and of "
            "its outside part against the MeZO-style loop, peak memory above the parameters "
            "of a step whose loss reads one element. SM MHz: the SM clock read just after the "
            "row was timed.", "",
            *([f"Triton tilings (block, warps, halves, maxnreg, lazy masks, persistent) "
               f"outside the sweep: {info['triton_tilings']}; exact pass (block, warps, halves): "
               f"{info['triton_exact_config']}.", ""] if "triton_tilings" in info else []),
            "| workload | dtype | directions | implementation | time | GB/s | % of copy | speed-up vs MeZO-style | outside forwards | peak extra memory | SM MHz |",
            "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    lines = []
    for r in rows:
        start = f"| {r['workload']} | {r['dtype']} | {r['distribution']} | {r['impl']} |"
        if "skipped" in r:
            lines.append(f"{start} skipped: {r['skipped']} | | | | | | |")
            continue
        t = r["seconds"]
        mhz = r.get("sm_mhz") or "-"
        time_s = f"{1e3 * t:.2f} ms" if t < 1 else f"{t:.3f} s"
        if r["kind"] == "pass":
            pct = f"{100 * r['pct_copy']:.0f}%" if r.get("pct_copy") else "-"
            up = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
            if "overhead" in r:
                up = f"exact: {100 * r['overhead']:+.1f}%"
            lines.append(f"{start} {time_s} | {r['gbps']:.1f} | {pct} | {up} | | | {mhz} |")
        else:
            up = (f"{r['speedup']:.2f}x (outside: {r['outside_speedup']:.1f}x)"
                  if r.get("speedup") else "-")
            peak = (f"{100 * r['peak_extra_share']:.3g}%" if r.get("peak_extra_share") is not None
                    else "-")
            lead = (f"; host {1e3 * r['host_lead_s']:.2f} ms before the 1st forward"
                    if r.get("host_lead_s") is not None else "")
            lines.append(f"{start} {time_s} | | | {up} | {100 * r['outside_share']:.1f}% "
                         f"({1e3 * r['outside_s']:.1f} ms{lead}) | {peak} | {mhz} |")
    return "\n".join(head + lines + timeline_lines(rows)) + "\n"


def timeline_lines(rows: list[dict]) -> list[str]:
    """Where each eager step leaves the device idle (one step under torch.profiler)."""
    rows = [r for r in rows if r.get("timeline")]
    if not rows:
        return []
    lines = ["", "Eager steps under torch.profiler (one step each, after a sync): from step() to "
             "the device's first kernel, the time it is busy, from step() to its last kernel's "
             "end, and its longest idle gaps with the kernel that ends each.", "",
             "| workload | implementation | first kernel after | busy | span | longest gaps |",
             "|---|---|---:|---:|---:|---|"]
    for r in rows:
        t = r["timeline"]
        gaps = "; ".join(f"{1e3 * g:.2f} ms before {name[:40]}" for g, name in t["gaps"])
        lines.append(f"| {r['workload']} | {r['impl']} | {1e3 * t['lead_s']:.2f} ms | "
                     f"{1e3 * t['busy_s']:.2f} ms | {1e3 * t['span_s']:.2f} ms | {gaps} |")
    return lines


def main(argv=None) -> Path:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dry-run", action="store_true", help="tiny sizes, few repetitions")
    ap.add_argument("--out", default=str(Path(__file__).resolve().parents[1] / "results"))
    ap.add_argument("--sizes", default="124M,1.07B")
    ap.add_argument("--dtypes", default="float32,bfloat16")
    ap.add_argument("--qs", default="1,16")
    ap.add_argument("--step-size", default="124M")
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq", type=int, default=128)
    ap.add_argument("--reps", type=int, default=20, help="repetitions per pass")
    ap.add_argument("--step-reps", type=int, default=3)
    ap.add_argument("--budget-s", type=float, default=200.0)
    ap.add_argument("--sweep-s", type=float, default=0.0,
                    help="first spend up to this many seconds of the budget timing the Triton "
                         "plain pass at each tiling of PLAIN_SWEEP and the exact pass at each "
                         "of EXACT_SWEEP (0: no sweep)")
    ap.add_argument("--small-sizes", default="20M",
                    help="models whose q=1 steps are timed too, where host work weighs more")
    args = ap.parse_args(argv)
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        ap.error("no CUDA device visible; use --device cpu --dry-run to check the logic")
    sizes = [TINY] if args.dry_run else [SIZES[s] for s in args.sizes.split(",")]
    step_size = TINY if args.dry_run else SIZES[args.step_size]
    qs = [1, 2] if args.dry_run else [int(q) for q in args.qs.split(",")]
    batch_size, seq = (2, 16) if args.dry_run else (args.batch, args.seq)
    reps, step_reps = (2, 1) if args.dry_run else (args.reps, args.step_reps)
    budget = Budget(args.budget_s)
    info = versions(args.device)
    print(f"[driver] {info}; backends: {workloads.zo_backends(args.device)}", flush=True)

    rows = []
    if args.sweep_s > 0 and "triton" in workloads.zo_backends(args.device):
        t0 = time.monotonic()
        rows += sweep_rows(step_size, args.device, reps, Budget(min(args.sweep_s, args.budget_s)))
        print(f"[driver] sweep: {time.monotonic() - t0:.1f} s", flush=True)
    for size in sizes:
        for dtype in args.dtypes.split(","):
            t0 = time.monotonic()
            rows += pass_rows(size, dtype, args.device, reps, budget)
            print(f"[driver] passes {size.name} {dtype}: {time.monotonic() - t0:.1f} s", flush=True)
    for dtype in ("bfloat16", "float32"):
        t0 = time.monotonic()
        rows += exact_rows(step_size, dtype, args.device, reps, budget)
        print(f"[driver] exact passes {dtype}: {time.monotonic() - t0:.1f} s", flush=True)
    for q in qs:
        t0 = time.monotonic()
        rows += step_rows(step_size, q, batch_size, seq, args.device, step_reps, budget)
        print(f"[driver] steps q={q}: {time.monotonic() - t0:.1f} s", flush=True)
    t0 = time.monotonic()
    rows += bf16_step_rows(step_size, qs[-1], batch_size, seq, args.device, step_reps, budget)
    print(f"[driver] bf16 steps: {time.monotonic() - t0:.1f} s", flush=True)
    for small in ([] if args.dry_run else [SIZES[s] for s in args.small_sizes.split(",") if s]):
        t0 = time.monotonic()
        rows += step_rows(small, 1, batch_size, seq, args.device, step_reps, budget)
        print(f"[driver] steps q=1 {small.name}: {time.monotonic() - t0:.1f} s", flush=True)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = file_stem(info) + ("-dry-run" if args.dry_run else "")
    md = out / f"{stem}.md"
    md.write_text(table(rows, info))
    (out / f"{stem}.json").write_text(json.dumps({"info": info, "rows": rows}, indent=1))
    print(md.read_text())
    print(f"[driver] wrote {md}")
    return md


if __name__ == "__main__":
    main()
