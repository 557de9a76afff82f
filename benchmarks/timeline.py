"""Where a step leaves the device idle: one step under torch.profiler, its device activity
merged into busy intervals, and the longest idle gaps with the activity that ends each.

On a GPU the activity is the kernels and copies; on the CPU (the driver's dry run) the
aten and zo_opt ops stand in for them, so the same code runs here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

STEP = "Optimizer.step#"  # the record_function torch.optim puts around every step()


@dataclass(frozen=True)
class Timeline:
    lead_s: float  # from step() to the device's first activity
    busy_s: float  # the device active, overlaps counted once
    span_s: float  # from step() to the end of the device's last activity
    gaps: list[tuple[float, str]]  # the longest idle gaps after the first activity, longest first


def summarize(activity: list[tuple[float, float, str]], start: float, top: int = 4) -> Timeline:
    """``activity``: (start, end, name) in microseconds on the device; ``start``: step()'s."""
    busy, gaps, end = 0.0, [], None
    for a, b, name in sorted(activity):
        if end is not None and a > end:
            gaps.append(((a - end) * 1e-6, name))
        if end is None or a > end:
            busy += b - a
            end = b
        elif b > end:
            busy += b - end
            end = b
    if end is None:
        return Timeline(0.0, 0.0, 0.0, [])
    first = min(a for a, _, _ in activity)
    gaps.sort(key=lambda g: -g[0])
    return Timeline((first - start) * 1e-6, busy * 1e-6, (end - start) * 1e-6, gaps[:top])


def _device_work(event) -> bool:
    """A kernel, copy or fill on the GPU, not a user annotation (a record_function's span,
    which the profiler also puts on the GPU's timeline). The attributes differ by torch
    version, hence the defaults."""
    if event.device_type != DeviceType.CUDA or getattr(event, "is_user_annotation", False):
        return False
    return ("annotation" not in (getattr(event, "activity_type", None) or "")
            and not event.name.startswith(STEP))


def step_timeline(stepper, closure, device, top: int = 4) -> Timeline:
    """One ``stepper.step(closure)`` under the profiler (after a sync: the device idle)."""
    cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=activities) as prof:
        stepper.step(closure)
        if cuda:
            torch.cuda.synchronize()
    events = prof.events()
    steps = [e.time_range.start for e in events if e.name.startswith(STEP)]
    if cuda:
        mine = [e for e in events if _device_work(e)]
    else:
        mine = [e for e in events if e.name.startswith(("aten::", "zo_opt::"))]
    start = steps[0] if steps else min((e.time_range.start for e in events), default=0.0)
    return summarize([(e.time_range.start, e.time_range.end, e.name) for e in mine], start, top)
