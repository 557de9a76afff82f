"""Every backend against the reference (zo_opt.noise), element by element, and the
functional ops' algebra (restore, update = sum of perturbations)."""
import pytest
import torch

import zo_opt
from zo_opt import backends, noise
from zo_opt.functional import noise_axpby_, perturb_, zo_update_

FAST = [b for b in ("cpu",) if b in zo_opt.available_backends()]
# The backends that take CPU tensors here (triton under its interpreter: small sizes only);
# the GPU backends have their own tests on CUDA tensors.
ALL = [b for b in zo_opt.available_backends() if backends.BACKENDS[b].supports(torch.zeros(1))]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SEEDS = [0, 1, 2**32 + 17, 2**64 - 1]
SHAPES = [(0,), (1,), (3,), (127,), (128,), (129,), (5, 7), (2, 3, 50)]
ATOL = {"gaussian": 2e-5, "rademacher": 0.0}


def reference(values, numels, seeds, coeffs, distribution, base_offset=0, alpha=1.0):
    """alpha * v + sum_i c_i z_i in float32, rounded to the parameter dtype by torch (RNE)."""
    out = []
    zs = [noise.direction(numels, s, distribution, base_offset) for s in seeds]
    for k, v in enumerate(values):
        acc = torch.zeros(v.numel())
        for c, z in zip(coeffs, zs):
            acc += c * z[k]
        out.append((alpha * v.float().reshape(-1) + acc).to(v.dtype).view_as(v))
    return out


def assert_matches(got, want, distribution):
    """z within the contract (Gaussian 2e-5, Rademacher exact), plus one rounding of the
    arithmetic in the parameter dtype (backends may fuse multiply-adds or reorder them)."""
    for g, w in zip(got, want):
        rounding = torch.finfo(g.dtype).eps * w.float().abs()
        tol = ATOL[distribution] * (1 + w.float().abs()) + rounding
        assert ((g.float() - w.float()).abs() <= tol).all(), (g, w)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_perturb_matches_reference_on_ragged_shapes(backend, distribution, seed):
    params = [torch.randn(s) for s in SHAPES]
    want = reference(params, [p.numel() for p in params], [seed], [0.5], distribution)
    perturb_(params, seed, 0.5, distribution=distribution, backend=backend)
    assert_matches(params, want, distribution)


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("seeds", [[3], [3, 2**64 - 9]])
def test_signed_zeros_follow_the_reference(backend, distribution, seeds):
    """The sum of the directions starts from +0 on every backend: with zero coefficients (a
    direction whose two losses are equal) a -0.0 weight ends +0.0, compared as bits."""
    params = [torch.tensor([-0.0, 0.0, 1.5] * 300)]
    want = reference(params, [900], seeds, [0.0, -0.0][:len(seeds)], distribution)
    noise_axpby_(params, seeds, [1.0, 0.0, -0.0][:len(seeds) + 1], distribution=distribution,
                 backend=backend)
    assert torch.equal(params[0].view(torch.int32), want[0].view(torch.int32))


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes_round_to_nearest_like_torch(backend, distribution, dtype):
    params = [torch.randn(s).to(dtype) for s in [(300,), (129,), (4, 33)]]
    want = reference(params, [p.numel() for p in params], [5, 6], [0.3, -0.7], distribution)
    zo_update_(params, [5, 6], [0.3, -0.7], distribution=distribution, backend=backend)
    assert_matches(params, want, distribution)


@pytest.mark.parametrize("backend", ALL)
def test_mixed_dtypes_in_one_call(backend):
    params = [torch.randn(200).to(d) for d in DTYPES] + [torch.randn(3, 3)]
    want = reference(params, [p.numel() for p in params], [9], [1.0], "gaussian")
    perturb_(params, 9, 1.0, backend=backend)
    assert_matches(params, want, "gaussian")


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_counters_above_2_pow_32(backend, distribution, kat):
    """A faked global offset past 2**34 (no allocation): counter hi words are used."""
    base = kat["indices"][-1] - 1  # 17179869313: crosses a Gaussian lane and 2**32 counters
    p = [torch.zeros(260)]
    perturb_(p, 12345, 1.0, distribution=distribution, backend=backend, base_offset=base - base % 128)
    want = noise.noise_at(torch.arange(260) + base - base % 128, 12345, distribution).float()
    torch.testing.assert_close(p[0], want, rtol=0, atol=ATOL[distribution])


@pytest.mark.parametrize("backend", ALL)
def test_kat_indices(backend, kat):
    for case in kat["cases"]:
        seed = int(case["seed"])
        for distribution in noise.DISTRIBUTIONS:
            for g, value in zip(kat["indices"], case[distribution]):
                base = g - g % 128
                p = [torch.zeros(128)]
                perturb_(p, seed, 1.0, distribution=distribution, backend=backend, base_offset=base)
                assert abs(p[0][g - base].item() - value) <= ATOL[distribution] + 1e-7


@pytest.mark.parametrize("backend", FAST)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_large_tensor_matches_reference(backend, distribution):
    params = [torch.zeros(2**20 + 37), torch.zeros(1000)]
    perturb_(params, 2**63 + 3, 1.0, distribution=distribution, backend=backend)
    want = noise.direction([p.numel() for p in params], 2**63 + 3, distribution)
    for p, w in zip(params, want):
        torch.testing.assert_close(p, w, rtol=0, atol=ATOL[distribution])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("dtype", DTYPES)
def test_perturb_then_minus_restores_within_one_ulp(backend, dtype):
    """Within one ulp of the perturbed value: the rounding of the +scale pass."""
    params = [torch.randn(1000).to(dtype), torch.randn(77).to(dtype)]
    before = [p.clone() for p in params]
    perturb_(params, 3, 1e-3, backend=backend)
    middle = [p.clone() for p in params]
    perturb_(params, 3, -1e-3, backend=backend)
    for p, b, m in zip(params, before, middle):
        ulp = torch.finfo(dtype).eps * torch.maximum(b.float().abs(), m.float().abs())
        assert ((p.float() - b.float()).abs() <= ulp).all()


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_update_equals_sum_of_perturbations(backend, distribution):
    seeds, coeffs = [1, 2**40, 3], [0.25, -0.5, 1.5]
    a = [torch.randn(300), torch.randn(2, 70)]
    b = [t.clone() for t in a]
    zo_update_(a, seeds, coeffs, distribution=distribution, backend=backend)
    for s, c in zip(seeds, coeffs):
        perturb_(b, s, c, distribution=distribution, backend=backend)
    for x, y in zip(a, b):
        torch.testing.assert_close(x, y, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", ALL)
def test_alpha_scales_the_parameters(backend):
    p = [torch.randn(500)]
    want = reference(p, [500], [4], [0.1], "gaussian", alpha=0.9)
    noise_axpby_(p, [4], [0.9, 0.1], backend=backend)
    assert_matches(p, want, "gaussian")


def test_update_takes_coefficients_as_a_tensor():
    a, b = [torch.randn(100)], [torch.randn(100)]
    b[0].copy_(a[0])
    zo_update_(a, [1, 2], torch.tensor([0.5, -1.0]))
    zo_update_(b, [1, 2], [0.5, -1.0])
    assert torch.equal(a[0], b[0])


def test_auto_picks_the_cpu_backend_when_built():
    t = torch.zeros(4)
    expected = "cpu" if "cpu" in zo_opt.available_backends() else "torch"
    assert backends.resolve("auto", t).name == expected
    assert backends.resolve("auto", t.double()).name == "torch"  # float64: reference only


def test_auto_on_cuda_tensors_picks_per_distribution(monkeypatch):
    """On CUDA tensors auto tries triton first for Gaussian passes and cuda first for
    Rademacher ones (AUTO_ORDER: the faster of each on the H200), triton first for exact ones
    of either (EXACT_AUTO_ORDER), and falls back to the other, then to torch. Stand-in backends
    and tensor: no GPU is needed to check the choice."""
    from types import SimpleNamespace

    def fake(name, ok=True):
        return SimpleNamespace(name=name, supports=lambda t: True,
                               unavailable_reason=lambda: None if ok else "not here")

    on_gpu = SimpleNamespace(device=torch.device("cuda", 0))
    monkeypatch.setattr(backends, "BACKENDS", {"torch": fake("torch"), "cpu": fake("cpu"),
                                               "triton": fake("triton"), "cuda": fake("cuda")})
    assert backends.resolve("auto", on_gpu, "gaussian").name == "triton"
    assert backends.resolve("auto", on_gpu, "rademacher").name == "cuda"
    assert backends.resolve("auto", on_gpu).name == "triton"  # Gaussian: the default
    for distribution in ("gaussian", "rademacher"):
        assert backends.resolve("auto", on_gpu, distribution, exact=True).name == "triton"
    assert backends.resolve("cuda", on_gpu, "rademacher", exact=True).name == "cuda"  # named
    backends.BACKENDS["triton"] = fake("triton", ok=False)
    assert backends.resolve("auto", on_gpu, "gaussian").name == "cuda"
    assert backends.resolve("auto", on_gpu, "gaussian", exact=True).name == "cuda"
    backends.BACKENDS["cuda"] = fake("cuda", ok=False)
    assert backends.resolve("auto", on_gpu, "rademacher").name == "torch"


def test_exact_lists_take_the_exact_auto_order(monkeypatch):
    """The optimizer in exact mode prepares its parameters for exact passes
    (EXACT_AUTO_ORDER), one in plain mode for its distribution (AUTO_ORDER): told apart here
    by an exact order that skips the C++ backend."""
    monkeypatch.setattr(backends, "EXACT_AUTO_ORDER", {"cpu": ("torch",)})
    for exact, name in ((True, "torch"), (False, "cpu")):
        p = torch.nn.Parameter(torch.randn(300).to(torch.bfloat16))
        opt = zo_opt.ZOOptimizer([p], lr=1e-3, q=1, seed=1, exact=exact)
        opt.step(lambda: p.float().square().sum())
        assert {b.name for b, *_ in opt._plans[("params", 0)].work} == {name}


def test_prepared_rejects_an_unknown_distribution():
    with pytest.raises(ValueError, match="distribution"):
        zo_opt.functional.Prepared([torch.zeros(4)], distribution="uniform")


def test_availability_is_reported_with_reasons():
    available, missing = zo_opt.available_backends(), zo_opt.unavailable_backends()
    assert "torch" in available
    assert set(available).isdisjoint(missing)
    assert set(available) | set(missing) == {"torch", "cpu", "triton", "cuda"}
    assert all(isinstance(r, str) and r for r in missing.values())


def test_bad_input_is_rejected_with_the_argument_named():
    with pytest.raises(TypeError, match="list of tensors"):
        perturb_(torch.zeros(3), 0, 1.0)
    with pytest.raises(TypeError, match="floating point"):
        perturb_([torch.zeros(3, dtype=torch.int64)], 0, 1.0)
    with pytest.raises(TypeError, match="sparse"):
        perturb_([torch.zeros(3).to_sparse()], 0, 1.0)
    with pytest.raises(ValueError, match="not contiguous"):
        perturb_([torch.zeros(4, 4).t()], 0, 1.0)
    with pytest.raises(ValueError, match="backend"):
        perturb_([torch.zeros(3)], 0, 1.0, backend="fortran")
    with pytest.raises(ValueError, match="distribution"):
        perturb_([torch.zeros(3)], 0, 1.0, distribution="uniform")
    with pytest.raises(ValueError, match="seed"):
        perturb_([torch.zeros(3)], -1, 1.0)
    with pytest.raises(ValueError, match="coeffs"):
        zo_update_([torch.zeros(3)], [1, 2], [1.0])
    with pytest.raises(ValueError, match="does not support"):
        perturb_([torch.zeros(3, dtype=torch.float64)], 0, 1.0, backend="cpu")


NARROW_ISA_CHECK = """
import torch, zo_opt
from zo_opt import noise
from zo_opt.functional import zo_update_
sizes = [1, 3, 7, 129, 2047, 2049, 4099]
for distribution in noise.DISTRIBUTIONS:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        params = [torch.zeros(n, dtype=dtype) for n in sizes]
        zo_update_(params, [5, 2**64 - 1], [1.0, -0.5], distribution=distribution, backend="cpu")
        ref = [noise.direction(sizes, 5, distribution)[k] - 0.5 * noise.direction(sizes, 2**64 - 1, distribution)[k]
               for k in range(len(sizes))]
        for p, r in zip(params, ref):
            err = (p.float() - r.to(dtype).float()).abs().max().item()
            assert err <= 4e-5 + torch.finfo(dtype).eps * r.abs().max().item(), (distribution, dtype, err)
print("ok")
"""


@pytest.mark.skipif("cpu" not in zo_opt.available_backends(), reason="the cpu backend is not built")
@pytest.mark.parametrize("isa", ["avx2", "baseline"])
def test_cpu_backend_narrower_isa_paths(isa):
    """The AVX2 and baseline builds of the CPU kernel, which this AVX-512 machine would not pick."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "ZO_OPT_CPU_ISA": isa}
    run = subprocess.run([sys.executable, "-c", NARROW_ISA_CHECK], env=env, capture_output=True, text=True)
    assert run.returncode == 0 and "ok" in run.stdout, run.stdout + run.stderr


def test_seeds_out_of_range_are_refused_by_prepared_passes():
    """Host seeds reach a Prepared pass unchecked no more: 2**64 would wrap to seed 0 and -1
    to 2**64 - 1."""
    plan = zo_opt.functional.Prepared([torch.zeros(4)])
    for bad in (2**64, -1):
        with pytest.raises(ValueError, match="seed"):
            plan.noise_axpby_([bad], [1.0, 0.1])


def test_update_takes_seeds_as_an_int64_tensor_of_uint64_bits():
    """A capturable step's record holds its seeds as a tensor (uint64 bits as int64, so
    seeds >= 2**63 are negative there): zo_update_ replays it as it is."""
    seeds = [noise.direction_seed(3, 0, i) for i in range(3)]
    assert any(s >= 2**63 for s in seeds)
    bits = torch.tensor([s - 2**64 if s >= 2**63 else s for s in seeds], dtype=torch.int64)
    a, b = [torch.zeros(300)], [torch.zeros(300)]
    zo_update_(a, seeds, [0.5, -1.0, 0.25])
    zo_update_(b, bits, [0.5, -1.0, 0.25])
    assert torch.equal(a[0], b[0])
    with pytest.raises(ValueError, match="seed"):
        zo_update_(b, torch.tensor([1.0]), [0.5])


def test_rounding_seed_refuses_dtypes_it_cannot_store():
    with pytest.raises(ValueError, match=r"params\[1\] is torch.float64"):
        zo_update_([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], [1], [0.5],
                   rounding_seed=2)


def test_cpu_backend_names_an_offset_it_cannot_take():
    """The C++ backends take offsets that are multiples of 128 (noise.offsets' own); the
    message names the tensor, its offset and the backends that take any."""
    if "cpu" not in zo_opt.available_backends():
        pytest.skip("the C++ extension is not built")
    with pytest.raises(RuntimeError, match=r"tensor 0's offset is 1000; it must be a non-negative "
                       r"multiple of 128.*torch and triton backends take any offset"):
        perturb_([torch.zeros(10)], 1, 0.1, backend="cpu", base_offset=1000)


def test_a_0d_coeffs_tensor_is_named():
    with pytest.raises(ValueError, match="coeffs is a 0-d tensor; pass a 1-d one"):
        zo_update_([torch.zeros(3)], [1], torch.tensor(0.5))
    with pytest.raises(ValueError, match="scales is a 2-d tensor"):
        noise_axpby_([torch.zeros(3)], [1], torch.ones(1, 2))


@pytest.mark.parametrize("backend", ALL)
def test_prepared_passes_write_the_tensors_they_were_prepared_on(backend):
    """A param replaced after Prepared (``p.data = ...``, as model.to() does) is not followed:
    every backend writes the storages it was prepared on, as the tables hold their addresses.
    The Triton runner wrote the other tensors at the new tensor's address plus the old
    distances (elsewhere in memory), the C++ and torch ones the new tensor at the old
    offsets (a grown tensor took its neighbour's z)."""
    params = [torch.zeros(200), torch.zeros(200)]
    plan = zo_opt.functional.Prepared(params, backend=backend)
    k = min((0, 1), key=lambda i: params[i].data_ptr())  # the Triton table's base pointer
    old = params[k].data
    params[k].data = torch.zeros(400)
    plan.noise_axpby_([5], [1.0, 1.0])
    want = reference([torch.zeros(200), torch.zeros(200)], [200, 200], [5], [1.0], "gaussian")
    assert_matches([old, params[1 - k]] if k == 0 else [params[0], old], want, "gaussian")
    assert not params[k].any() and not plan.matches(params)


@pytest.mark.parametrize("backend", ALL)
def test_prepared_passes_check_their_arguments(backend):
    """A Prepared pass names a bad distribution or seeds tensor on every backend (Triton
    raised KeyError ('uniform', 4), a float seeds tensor was truncated, a 0-d one failed in
    len())."""
    p = torch.zeros(4)
    plan = zo_opt.functional.Prepared([p], backend=backend)
    with pytest.raises(ValueError, match="Invalid distribution: 'uniform'"):
        plan.noise_axpby_([1], [1.0, 1.0], distribution="uniform")
    with pytest.raises(ValueError, match="Invalid seeds: a torch.float32 tensor"):
        plan.noise_axpby_(torch.tensor([1.7]), [1.0, 1.0])
    with pytest.raises(ValueError, match="seeds is a 0-d tensor; pass a 1-d one"):
        plan.noise_axpby_(torch.tensor(1), [1.0, 1.0])
    assert not p.any()


def test_integer_seeds_of_other_types_are_seeds():
    """numpy integers and 0-d integer tensors are seeds (they were refused as not integers)."""
    import numpy as np

    want = [torch.zeros(300)]
    zo_update_(want, [3, 2**64 - 1], [0.5, -1.0])
    for seeds in ([np.int64(3), np.uint64(2**64 - 1)], [torch.tensor(3), 2**64 - 1],
                  np.array([3, 2**64 - 1], dtype=np.uint64)):
        got = [torch.zeros(300)]
        zo_update_(got, seeds, [0.5, -1.0])
        assert torch.equal(got[0], want[0])
    a, b = ([torch.zeros(300, dtype=torch.bfloat16)] for _ in range(2))
    perturb_(a, 3, 0.5)
    zo_update_(a, [3], [1e-3], rounding_seed=2)
    perturb_(b, np.int32(3), 0.5)
    zo_update_(b, [np.int64(3)], [1e-3], rounding_seed=np.uint64(2))
    assert torch.equal(a[0], b[0])


def test_a_seed_where_a_list_is_expected_is_named():
    for seeds in (3, "3"):
        with pytest.raises(TypeError, match=r"seeds must be a list of seeds.*\[seed\]"):
            zo_update_([torch.zeros(3)], seeds, [0.5])


@pytest.mark.parametrize("backend", ALL)
@pytest.mark.parametrize("base_offset", [-128, 128.0, 2**63])
def test_offsets_out_of_range_are_refused_on_every_backend(backend, base_offset):
    """A negative, fractional or too large base_offset gave another z on one backend and an
    error on another (torch: indices below 0; cpu: its own op's message; triton: overflow)."""
    p = torch.zeros(4)
    with pytest.raises(ValueError, match="base_offset"):
        perturb_([p], 1, 0.5, backend=backend, base_offset=base_offset)
    with pytest.raises(ValueError, match=r"offsets\[1\]"):
        zo_opt.functional.Prepared([p, p.clone()], backend=backend, offsets=[0, -128])
    assert not p.any()


@pytest.mark.parametrize("backend", ALL)
def test_rounding_seed_needs_a_128_aligned_base_offset(backend):
    """The exact pass takes tensors on 128-element table chunks; torch's took any offset, the
    C++ one said 'offset 0 must be a multiple of 128' for base_offset=64."""
    p = torch.zeros(3, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="base_offset 64 is not a multiple of 128"):
        zo_update_([p], [1], [0.5], backend=backend, base_offset=64, rounding_seed=2)
    assert not p.any()


def test_complex_coeffs_are_refused():
    """Their imaginary parts were dropped (with only torch's cast warning)."""
    with pytest.raises(ValueError, match="coeffs is a torch.complex64 tensor"):
        zo_update_([torch.zeros(3)], [1], torch.ones(1, dtype=torch.complex64))


@pytest.mark.parametrize("backend", ALL)
def test_params_sharing_memory_are_refused(backend):
    """A tensor listed twice (tied weights from a state_dict) or overlapping views moved twice
    a pass, with two directions, and raced on the parallel backends."""
    w = torch.zeros(64, 4)
    for params, (i, j) in (([w, w], (0, 1)), ([w[1:3], torch.zeros(3), w], (0, 2))):
        with pytest.raises(ValueError, match=rf"params\[{i}\] and params\[{j}\] share memory"):
            perturb_(params, 1, 0.5, backend=backend)
    assert not w.any()
    perturb_([w[:32], w[32:]], 1, 0.5, backend=backend)  # views side by side: fine


def test_scales_and_coeffs_that_are_not_numbers_are_named():
    """A bare TypeError from float() or len() named no argument; a generator of coeffs, which
    has no len(), was refused."""
    p = [torch.zeros(3)]
    with pytest.raises(TypeError, match=r"coeffs must be a list of numbers or a 1-d tensor, not "
                       r"float; for one seed pass \[coeff\]"):
        zo_update_(p, [1], 0.5)
    with pytest.raises(TypeError, match=r"coeffs\[1\] is None; pass real numbers"):
        zo_update_(p, [1, 2], [0.5, None])
    with pytest.raises(TypeError, match=r"scale is None; pass a real number"):
        perturb_(p, 1, None)
    with pytest.raises(TypeError, match=r"scales\[1\] is 'x'; pass real numbers"):
        noise_axpby_(p, [1], [1.0, "x"])
    assert not p[0].any()
    want = [torch.zeros(3)]
    zo_update_(want, [1, 2], [0.5, -0.25])
    zo_update_(p, (s for s in [1, 2]), (c for c in [0.5, -0.25]))
    assert torch.equal(p[0], want[0])


def test_a_param_the_named_backend_cannot_run_is_named():
    if "cpu" not in zo_opt.available_backends():
        pytest.skip("the C++ extension is not built")
    with pytest.raises(ValueError, match=r"params\[1\] is a torch.float64 tensor on cpu, which "
                       r"backend 'cpu' does not support; use backend='auto' or 'torch'"):
        perturb_([torch.zeros(3), torch.zeros(3, dtype=torch.float64)], 0, 1.0, backend="cpu")


@pytest.mark.parametrize("backend", ALL)
def test_autograd_sees_the_passes_writes(backend):
    """A tensor saved for backward and then moved by a pass makes backward() fail, as after
    any in-place op: the C++ and Triton kernels write through pointers that autograd does not
    see, and their passes left the version counter alone (a silently wrong gradient)."""
    x = torch.ones(300, requires_grad=True)
    for move in (lambda h: perturb_([h], 1, 0.5, backend=backend),
                 lambda h: zo_update_([h], [1], [0.5], backend=backend, rounding_seed=3),
                 lambda h: zo_opt.functional.Prepared([h], backend=backend).noise_axpby_(
                     [1], [1.0, 0.5])):
        h = x.clone()
        out = (h * h).sum()
        move(h)
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            out.backward()


def test_a_backend_whose_module_failed_to_import_says_why(monkeypatch):
    """The ImportError is kept: a triton present but not importable (another version) read as
    'not installed' with nothing more."""
    monkeypatch.setattr(backends, "IMPORT_ERRORS", {})
    assert backends._optional("no_such_backend") is None
    monkeypatch.setattr(backends, "BACKENDS",
                        {k: v for k, v in backends.BACKENDS.items() if k != "triton"})
    backends.IMPORT_ERRORS["triton"] = backends.IMPORT_ERRORS.pop("no_such_backend")
    assert zo_opt.unavailable_backends()["triton"] == (
        "not installed (its module failed to import: ModuleNotFoundError: No module named "
        "'zo_opt.backends.no_such_backend')")


def test_rounding_seed_updates_once_a_list_that_takes_two_runners(monkeypatch):
    """zo_update_ with a rounding_seed made one exact pass per runner, each over every runner:
    a list that takes two (two devices, or two backends on one: forced here by a C++ backend
    that refuses float16) moved every param twice."""
    if "cpu" not in zo_opt.available_backends():
        pytest.skip("the C++ extension is not built")
    cpu = backends.BACKENDS["cpu"]
    monkeypatch.setattr(cpu, "supports",
                        lambda t: t.device.type == "cpu" and t.dtype != torch.float16)
    got = [torch.randn(300).to(torch.bfloat16), torch.randn(200).to(torch.float16)]
    want = [p.clone() for p in got]
    plan = zo_opt.functional.Prepared(got, exact=True)
    assert sorted(b.name for b, *_ in plan.work) == ["cpu", "torch"]
    zo_update_(got, [3], [0.25], distribution="rademacher", rounding_seed=2)
    zo_update_(want, [3], [0.25], distribution="rademacher", rounding_seed=2, backend="torch")
    assert all(torch.equal(g, w) for g, w in zip(got, want))
