"""A whole central-difference ZO step (q directions, 2q forwards) on a GPT-2 20M forward
(torch-only model of gpt2.py, float32, batch 8 x 128 tokens): time per step and the share of
it spent outside the forward passes (the forwards are timed inside the closure).
"""
import pytest
import torch

from . import workloads
from .gpt2 import GPT2, batch

SIZE, BATCH, SEQ = "20M", 8, 128
QS = (1, 4, 8)
ROUNDS = {1: 3, 4: 2, 8: 1}
IMPLS = [f"zo-opt[{b}]" for b in ("cpu", "triton", "cuda")] + list(workloads.BASELINES)


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = GPT2(SIZE)
    x, y = batch(SIZE, BATCH, SEQ)
    with torch.no_grad():
        m(x, y)  # warm up the forward (first-call allocations, kernel selection)
    return m, x, y


@pytest.mark.parametrize("q", QS, ids=lambda q: f"q{q}")
@pytest.mark.parametrize("impl", IMPLS)
def test_step(benchmark, model, impl, q):
    m, x, y = model
    if impl.startswith("zo-opt["):
        reason = workloads.backend_skip_reason(impl[len("zo-opt["):-1], "cpu")
        if reason:
            pytest.skip(reason)
    params = list(m.parameters())
    snapshot = [p.detach().clone() for p in params]
    stepper = workloads.make_stepper(impl, params, q)
    forwards = workloads.Clock("cpu")
    closure = workloads.forward_closure(m, x, y, forwards)
    steps, fwd = [], []

    def one_step():
        s, f = workloads.timed_step(stepper, closure, forwards, "cpu")
        steps.append(s)
        fwd.append(f)

    benchmark.group = f"step q={q} (GPT-2 {SIZE}, float32, batch {BATCH}x{SEQ})"
    benchmark.pedantic(one_step, rounds=ROUNDS[q], warmup_rounds=0, iterations=1)
    step_s, fwd_s = sum(steps), sum(fwd)
    benchmark.extra_info.update(impl=impl, q=q, size=SIZE, forwards=2 * q,
                                forward_s_per_step=fwd_s / len(steps),
                                outside_s_per_step=(step_s - fwd_s) / len(steps),
                                outside_share=1.0 - fwd_s / step_s)
    with torch.no_grad():  # the next implementation starts from the same model
        for p, p0 in zip(params, snapshot):
            p.data = p0
