"""Peak extra memory of one step (q=4, GPT-2 20M parameters, float32): bytes allocated above
the parameters while the step runs. The loss reads one element, so what is counted is the
optimizer's own memory (a real forward adds the same activations to every implementation).
"""
import pytest
import torch

from . import workloads
from .shapes import make_params

SIZE, Q = "20M", 4
IMPLS = [f"zo-opt[{b}]" for b in ("cpu", "triton", "cuda")] + list(workloads.BASELINES)


def step_of(impl: str, holder: dict):
    """``make`` for workloads.peak_extra_bytes: parameters, a warm-up step, the step to count."""
    def make():
        params = holder["params"] = make_params(SIZE, torch.float32)
        stepper = workloads.make_stepper(impl, params, Q)
        closure = workloads.probe_closure(params)
        stepper.step(closure)  # first-use work (extension load, caches) stays out of the count
        return lambda: stepper.step(closure)
    return make


@pytest.mark.parametrize("impl", IMPLS)
def test_peak_memory(benchmark, impl):
    if impl.startswith("zo-opt["):
        reason = workloads.backend_skip_reason(impl[len("zo-opt["):-1], "cpu")
        if reason:
            pytest.skip(reason)
    holder, peaks = {}, []
    benchmark.group = f"peak extra memory of a step (q={Q}, GPT-2 {SIZE} float32)"
    benchmark.pedantic(lambda: peaks.append(workloads.peak_extra_bytes(step_of(impl, holder), "cpu")),
                       rounds=1, warmup_rounds=0, iterations=1)
    pbytes = workloads.param_bytes(holder["params"])
    benchmark.extra_info.update(impl=impl, q=Q, size=SIZE, param_bytes=pbytes,
                                peak_extra_bytes=peaks[-1], peak_extra_share=peaks[-1] / pbytes)
