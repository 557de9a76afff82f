"""The side table of docs/EXACT.md, built by each backend's two passes (count, fill) through
``Prepared.build_table``, against an oracle that walks the group's global index range
element by element: same ``chunk_base``, same ``bits``, same ``count``."""
import pytest
import torch

import zo_opt
from zo_opt import exact, noise
from zo_opt.functional import Prepared

from exact_pair import EPS, make_params

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TAU = exact.tau(EPS, "gaussian")


def backend_device(backend):
    """The device the backend runs on in this process, or None if it is not available."""
    if backend not in zo_opt.available_backends():
        return None
    if backend == "triton":
        from zo_kernels import noise_axpby

        return "cpu" if noise_axpby.INTERPRETED else "cuda"
    if backend == "cuda":
        return "cuda"
    return "cpu"


BACKENDS = ["torch", "cpu", "triton", "cuda"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    device = backend_device(request.param)
    if device is None:
        pytest.skip(f"backend {request.param!r}: {zo_opt.unavailable_backends()[request.param]}")
    return request.param, torch.device(device)


def oracle(params, offsets, tau):
    """chunk_base and bits by walking the group's elements in global order."""
    base, n = exact.span(params, offsets)
    counts = [0] * (n // exact.CHUNK)
    bits = []
    for p, o in sorted(zip(params, offsets), key=lambda t: t[1]):
        flat = p.detach().reshape(-1).cpu()
        raw = exact.raw_bits(flat).tolist()
        for e, value in enumerate(flat.float().tolist()):
            a = abs(value)
            if not (a >= tau) or a > exact.big(p.dtype):
                counts[(o - base + e) // exact.CHUNK] += 1
                bits.append(raw[e])
    chunk_base = torch.tensor([0] + counts, dtype=torch.int64).cumsum(0).to(torch.int32)
    return chunk_base, torch.tensor(bits, dtype=torch.int32)


def check(table, params, offsets, tau):
    chunk_base, bits = oracle(params, offsets, tau)
    assert table.count == bits.numel()
    assert torch.equal(table.chunk_base.cpu(), chunk_base)
    assert torch.equal(table.bits.cpu()[:table.count], bits)
    assert table.bits.numel() >= 1 and table.tau == tau


def test_ragged_mixed_dtypes_with_gaps(backend):
    """Several tiles per tensor, three dtypes in one list, empty tensors, unused chunks between
    tensors and a group that starts above 2^32."""
    name, device = backend
    sizes = [5000, 1, 0, 9000, 129, 4096, 300]
    params = make_params(sizes, [DTYPES[k % 3] for k in range(len(sizes))], device, seed=1)
    offsets = [2**33 + 256 * k + o for k, o in enumerate(noise.offsets(sizes))]
    table = Prepared(params, backend=name, offsets=offsets).build_table(TAU)
    check(table, params, offsets, TAU)


@pytest.mark.parametrize("dtype", DTYPES)
def test_without_special_elements(backend, dtype):
    name, device = backend
    params = [torch.full((1000,), 0.5, dtype=dtype, device=device),
              torch.full((3,), -2.0, dtype=dtype, device=device)]
    offsets = [1024, 2048 + 128]
    table = Prepared(params, backend=name, offsets=offsets).build_table(TAU)
    assert table.count == 0 and table.bits.numel() == 1
    check(table, params, offsets, TAU)


@pytest.mark.parametrize("tau", [0.0, 1e30])
def test_every_or_no_finite_element(backend, tau):
    """tau = 0: only non-finite and huge values are special; tau huge: every element is."""
    name, device = backend
    params = make_params([700, 300], [torch.bfloat16, torch.float32], device, seed=2)
    offsets = noise.offsets([700, 300])
    check(Prepared(params, backend=name, offsets=offsets).build_table(tau), params, offsets, tau)


def test_table_kernels_compile_for_sm90(compile_reports):
    """Both Triton kernels compile for sm_90 without a GPU; interior tiles load 16 bytes."""
    pytest.importorskip("triton")
    reports = compile_reports("table")
    assert sorted((r["kernel"], r["dtype"]) for r in reports) == sorted(
        (k, d) for k in ("count_kernel", "fill_kernel") for d in ("fp32", "fp16", "bf16"))
    for r in reports:
        assert r["cubin_bytes"] > 0 and "ld.global.v4.b32" in r["loads"], r


def test_optimizer_builds_its_table_with_its_backend(monkeypatch):
    """The optimizer's step takes the table from its backend's passes, not the reference's."""
    if "cpu" not in zo_opt.available_backends():
        pytest.skip("the C++ CPU backend is not built")
    calls, counted = [], []
    monkeypatch.setattr(exact, "count_special_", lambda *a: calls.append(a))
    cpu = type(zo_opt.backends.BACKENDS["cpu"])
    real_count = cpu.count_special_

    def count_spy(params, *args):
        counted.append(len(params))
        return real_count(params, *args)

    # the cpu backend's own pass must run: no calls to the reference alone would also hold for
    # a table built by another backend's copy of the reference passes (the torch backend's)
    monkeypatch.setattr(cpu, "count_special_", staticmethod(count_spy))
    model = torch.nn.Linear(8, 4).to(torch.bfloat16)
    opt = zo_opt.ZOOptimizer(model.parameters(), q=1, lr=0.0, backend="cpu", exact=True)
    before = [p.clone() for p in model.parameters()]
    x = torch.randn(2, 8, dtype=torch.bfloat16)
    opt.step(lambda: model(x).float().square().mean())
    assert calls == []
    assert sum(counted) == 2  # the group's two params counted once, by the cpu backend
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_cpu_fill_rejects_a_stale_count():
    """A chunk_base counted with another tau (or before params changed) is an error, not a
    table with holes."""
    if "cpu" not in zo_opt.available_backends():
        pytest.skip("the C++ CPU backend is not built")
    params = make_params([2000], [torch.float32], "cpu", seed=3)
    counts = torch.zeros(2000 // 128 + 2, dtype=torch.int32)
    torch.ops.zo_opt.exact_table_count_(params, [0], 0, TAU, counts[1:])
    chunk_base = counts.cumsum(0, dtype=torch.int32)
    bits = torch.zeros(int(chunk_base[-1]) + 100, dtype=torch.int32)
    with pytest.raises(RuntimeError, match="chunk_base does not match"):
        torch.ops.zo_opt.exact_table_fill_(params, [0], 0, TAU * 10, chunk_base, bits)
    with pytest.raises(RuntimeError, match="multiple of 128"):
        torch.ops.zo_opt.exact_table_count_(params, [64], 0, TAU, counts[1:])
