"""ZOOptimizer(capturable=True): the step stays on the device (seeds derived from a device
step counter, scales as device tensors), gives the same updates as the host-driven step,
and, on a GPU, replays from a CUDA graph exactly as it runs eagerly."""
import pytest
import torch

import zo_opt
from zo_opt import ZOOptimizer, noise


def least_squares(seed=0, n=300, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(64, n, generator=gen).to(device) / 8
    b = torch.randn(64, generator=gen).to(device)
    p = torch.randn(n, generator=gen).to(device)
    return A, b, p


@pytest.mark.parametrize("estimator", ["central", "forward"])
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_capturable_step_equals_the_host_driven_step(estimator, distribution):
    A, b, p = least_squares()
    p2 = p.clone()
    kw = dict(lr=0.05, q=3, seed=11, estimator=estimator, distribution=distribution,
              nonfinite="skip_silent", weight_decay=0.01)
    host = ZOOptimizer([p], **kw)
    dev = ZOOptimizer([p2], capturable=True, **kw)
    for _ in range(4):
        l1 = host.step(lambda: ((A @ p - b) ** 2).mean())
        l2 = dev.step(lambda: ((A @ p2 - b) ** 2).mean())
        assert torch.equal(l1, l2)
    assert torch.equal(p, p2)
    seeds = [s & noise.MASK64 for s in dev.last_record.seeds.tolist()]
    assert seeds == host.last_record.seeds == [noise.direction_seed(11, 3, i) for i in range(3)]
    assert dev.state_dict()["zo"]["step"] == 4


def test_capturable_resume_restores_the_device_step():
    A, b, p = least_squares(1)
    opt = ZOOptimizer([p], lr=0.05, q=2, seed=3, capturable=True)
    closure = lambda: ((A @ p - b) ** 2).mean()  # noqa: E731
    opt.step(closure)
    sd = opt.state_dict()
    saved = p.clone()
    opt.step(closure)
    after_two = p.clone()
    assert not torch.equal(after_two, saved)  # the second step moved p: there is a step to replay
    p.copy_(saved)
    again = ZOOptimizer([p], lr=0.05, q=2, seed=99, capturable=True)
    again.load_state_dict(sd)
    again.step(closure)
    assert torch.equal(p, after_two)


@pytest.mark.parametrize("kwargs, words", [
    (dict(nonfinite="skip"), "skip_silent"),
    (dict(nonfinite="raise"), "skip_silent"),
    (dict(momentum=0.9), "momentum"),
])
def test_capturable_refuses_what_needs_the_host(kwargs, words):
    with pytest.raises(ValueError, match=words):
        ZOOptimizer([torch.zeros(3)], capturable=True, **kwargs)


def test_capturable_refuses_params_on_two_devices_without_a_gpu():
    """The same check on this machine: a meta-device group beside a CPU one."""
    with pytest.raises(ValueError, match=r"one device; got \['cpu', 'meta'\]"):
        ZOOptimizer([{"params": [torch.zeros(3)]}, {"params": [torch.zeros(3, device="meta")]}],
                    capturable=True)


def test_capturable_refuses_params_on_two_devices():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device beside the CPU")
    with pytest.raises(ValueError, match="one device"):
        ZOOptimizer([{"params": [torch.zeros(3)]}, {"params": [torch.zeros(3, device="cuda")]}],
                    capturable=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])  # bf16: stochastic rounding
@pytest.mark.parametrize("backend", [b for b in ("cuda", "triton") if b in zo_opt.available_backends()]
                         or ["none"])
def test_cuda_graph_replay_equals_eager_steps(backend, dtype):
    if backend == "none":
        pytest.skip("no GPU backend available")
    A, b, p = least_squares(2, n=5000, device="cuda")
    p = p.to(dtype)
    p_eager = p.clone()
    kw = dict(lr=0.05, q=4, seed=21, backend=backend)
    eager = ZOOptimizer([p_eager], capturable=True, **kw)
    graphed = ZOOptimizer([p], capturable=True, **kw)
    x = torch.zeros_like(b)  # the captured closure reads this static buffer

    def closure():
        return ((A @ p.float() - b - x) ** 2).mean()

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up: compiles kernels, builds tables and constants
        for _ in range(2):
            graphed.step(closure)
            eager.step(lambda: ((A @ p_eager.float() - b - x) ** 2).mean())
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = graphed.step(closure)
    # capture records the kernels without running them: both optimizers are at step 2 here
    for k in range(5):
        x.fill_(0.01 * k)
        graph.replay()
        expected = eager.step(lambda: ((A @ p_eager.float() - b - x) ** 2).mean())
        torch.cuda.synchronize()
        assert torch.equal(loss, expected), k
        assert torch.equal(p, p_eager), k
    assert graphed.state_dict()["zo"]["step"] == eager.state_dict()["zo"]["step"] == 7
