"""The CPU exact pass (csrc/cpu/exact_cpu.cpp, ``zo_opt::noise_axpby_exact_``) against its
torch reference ``zo_opt.exact.exact_pass_`` (docs/EXACT.md): bit for bit for Rademacher,
up to the float32 rounding of Box-Muller for Gaussian; a central schedule restores every
bit; stochastic rounding is the reference's and unbiased."""
import os
import subprocess
import sys

import pytest
import torch

import zo_opt
from zo_opt import exact, noise

pytestmark = pytest.mark.skipif("cpu" not in zo_opt.available_backends(),
                                reason="the C++ CPU backend is not built")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
DISTS = ["rademacher", "gaussian"]
EPS = 1e-3
BASE = 2**32 + 3 * 128  # global offsets above 2^32 (the group's first offset)
SHAPES = [(1000,), (129,), (7, 33), (1,), (0,), (2, 2048 + 5)]
SEEDS = [12345, 2**64 - 5, 2**63 + 1, 7]


def int_view(t):
    return t.view(torch.int32 if t.element_size() == 4 else torch.int16)


def make_params(dtype):
    """Ragged tensors of N(0, 0.02) weights with the awkward values planted in them."""
    fi = torch.finfo(dtype)
    tau = exact.tau(EPS, "gaussian")
    special = torch.tensor([0.0, -0.0, float("nan"), -float("nan"), float("inf"), -float("inf"),
                            fi.max, -fi.max, fi.max / 2 * 1.01, fi.tiny, -fi.tiny,
                            fi.tiny * fi.eps, 1e-30, tau, -tau, tau * 0.99, tau * 1.01, 1.0,
                            -3.5, 1e4])
    params = []
    for k, shape in enumerate(SHAPES):
        p = (torch.randn(shape) * 0.02).to(dtype)
        flat = p.view(-1)
        if flat.numel() >= special.numel():
            flat[:special.numel()] = special.to(dtype)
            flat[-special.numel():] = special.flip(0).to(dtype)
        params.append(p)
    return params


def layout(params):
    offsets = [BASE + o for o in noise.offsets([p.numel() for p in params])]
    code_base, n = exact.span(params, offsets)
    return offsets, code_base, n


def cpu_pass(params, offsets, seeds, scales, n_old, codes, code_base, table, encode,
             rounding_seed, distribution):
    """The op through the backend's runner (the interface the optimizer uses)."""
    run = zo_opt.backends.BACKENDS["cpu"].prepare_exact(params, offsets)
    ints = list(seeds) + ([rounding_seed] if rounding_seed is not None else [])
    seeds_t = torch.tensor([s - (1 << 64) if s >= 1 << 63 else s for s in ints], dtype=torch.int64)
    run(seeds_t, torch.tensor(scales, dtype=torch.float32), n_old, codes, code_base, table,
        encode, rounding_seed is not None, distribution)


def ref_pass(params, offsets, seeds, scales, n_old, codes, code_base, table, encode,
             rounding_seed, distribution):
    exact.exact_pass_(params, offsets, list(seeds), torch.tensor(scales, dtype=torch.float32),
                      n_old, codes, code_base, table, encode=encode, rounding_seed=rounding_seed,
                      distribution=distribution)


def schedule(s1, s2):
    """(seeds, scales, n_old, encode) of a central step with two directions, then the update."""
    return [
        ([s1], [1.0, EPS], 0, True),                      # theta -> +eps z1
        ([s1, s1], [1.0, EPS, -EPS], 1, True),            # +eps z1 -> -eps z1 (one seed)
        ([s1, s2], [1.0, -EPS, EPS], 1, True),            # -eps z1 -> +eps z2
        ([s2, s2], [1.0, EPS, -EPS], 1, True),            # +eps z2 -> -eps z2
        ([s2, s1, s2], [0.999, -EPS, -0.3, 0.2], 1, False),  # -eps z2 -> the update
    ]


def same_bits(a, b):
    """Bit equality, any NaN equal to any NaN (the NaN payload a conversion leaves is not part
    of the contract; the CPU op keeps a NaN theta's own bits)."""
    return (int_view(a) == int_view(b)) | (a.isnan() & b.isnan())


@pytest.mark.parametrize("dtype", DTYPES)
def test_rademacher_schedule_matches_reference_bit_for_bit(dtype):
    ref = make_params(dtype)
    got = [p.clone() for p in ref]
    offsets, code_base, n = layout(ref)
    table = exact.build_table(ref, offsets, exact.tau(EPS, "rademacher"))
    c_ref = torch.zeros(n, dtype=torch.int8)
    c_got = torch.zeros(n, dtype=torch.int8)
    for seeds, scales, n_old, encode in schedule(SEEDS[0], SEEDS[1]):
        args = (seeds, scales, n_old)
        ref_pass(ref, offsets, *args, c_ref, code_base, table, encode, None, "rademacher")
        cpu_pass(got, offsets, *args, c_got, code_base, table, encode, None, "rademacher")
        for a, b in zip(ref, got):
            assert same_bits(a, b).all(), (seeds, scales, n_old)
        assert torch.equal(c_ref, c_got)


@pytest.mark.parametrize("dtype", DTYPES)
def test_gaussian_passes_match_reference(dtype):
    """Each pass from the same state: mostly bit-equal, else within z's float32 rounding (the
    CPU's log/sincos polynomials against torch's float64 reference, |dz| <= 2e-5 by NOISE.md)
    times the displacement, plus an ulp or two of the result."""
    ref = make_params(dtype)
    offsets, code_base, n = layout(ref)
    table = exact.build_table(ref, offsets, exact.tau(EPS, "gaussian"))
    c_ref = torch.zeros(n, dtype=torch.int8)
    equal = total = 0
    for seeds, scales, n_old, encode in schedule(SEEDS[2], SEEDS[3]):
        got = [p.clone() for p in ref]
        c_got = c_ref.clone()
        ref_pass(ref, offsets, seeds, scales, n_old, c_ref, code_base, table, encode, None, "gaussian")
        cpu_pass(got, offsets, seeds, scales, n_old, c_got, code_base, table, encode, None, "gaussian")
        dz = 2e-5 * sum(abs(c) for c in scales[1:])
        for a, b in zip(ref, got):
            same = same_bits(a, b)
            af, bf = a.float(), b.float()
            close = (af - bf).abs() <= dz + 2 * torch.finfo(dtype).eps * af.abs()
            assert (same | close).all()
            equal += int(same.sum())
            total += a.numel()
        assert (c_ref == c_got).float().mean() >= 0.9
    assert equal >= 0.75 * total


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_central_schedule_restores_every_bit(dtype, distribution):
    params = make_params(dtype)
    start = [p.clone() for p in params]
    offsets, code_base, n = layout(params)
    codes = torch.zeros(n, dtype=torch.int8)
    for step in range(3):  # a new table each step, as the optimizer builds it
        table = exact.build_table(params, offsets, exact.tau(EPS, distribution))
        s1, s2 = SEEDS[step], SEEDS[step + 1]
        passes = schedule(s1, s2)[:-1] + [([s2], [1.0, -EPS], 1, False)]  # lr = 0: back to theta
        for k, (seeds, scales, n_old, encode) in enumerate(passes):
            cpu_pass(params, offsets, seeds, scales, n_old, codes, code_base, table, encode,
                     None, distribution)
            if k == 0:  # displaced: a pass that left theta alone would "restore" it too
                assert not all(torch.equal(int_view(a), int_view(b)) for a, b in zip(start, params))
        for a, b in zip(start, params):
            assert torch.equal(int_view(a), int_view(b))  # NaN payloads included


@pytest.mark.parametrize("distribution", DISTS)
def test_exception_path_restores_from_any_point(distribution):
    """-eps z_i -> nothing, and +eps z_i -> nothing, both give theta back."""
    params = make_params(torch.bfloat16)
    start = [p.clone() for p in params]
    offsets, code_base, n = layout(params)
    codes = torch.zeros(n, dtype=torch.int8)
    table = exact.build_table(params, offsets, exact.tau(EPS, distribution))

    def displaced():
        return not all(torch.equal(int_view(a), int_view(b)) for a, b in zip(start, params))

    # +eps z_5 -> nothing
    cpu_pass(params, offsets, [5], [1.0, EPS], 0, codes, code_base, table, True, None, distribution)
    assert displaced()
    cpu_pass(params, offsets, [5], [1.0, EPS], 1, codes, code_base, table, False, None, distribution)
    for a, b in zip(start, params):
        assert torch.equal(int_view(a), int_view(b))
    # -eps z_5 (reached as the central schedule does, through +eps z_5) -> nothing
    cpu_pass(params, offsets, [5], [1.0, EPS], 0, codes, code_base, table, True, None, distribution)
    cpu_pass(params, offsets, [5, 5], [1.0, EPS, -EPS], 1, codes, code_base, table, True, None,
             distribution)
    assert displaced()
    cpu_pass(params, offsets, [5], [1.0, -EPS], 1, codes, code_base, table, False, None, distribution)
    for a, b in zip(start, params):
        assert torch.equal(int_view(a), int_view(b))


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_matches_reference_bit_for_bit(dtype):
    ref = make_params(dtype)
    offsets, code_base, n = layout(ref)
    table = exact.build_table(ref, offsets, exact.tau(EPS, "rademacher"))
    c_ref = torch.zeros(n, dtype=torch.int8)
    seeds, scales = [SEEDS[0]], [1.0, EPS]
    ref_pass(ref, offsets, seeds, scales, 0, c_ref, code_base, table, True, None, "rademacher")
    got = [p.clone() for p in ref]
    c_got = c_ref.clone()
    rs = noise.rounding_seed(99, 3) if hasattr(noise, "rounding_seed") else 2**64 - 77
    update = ([SEEDS[0], SEEDS[1], SEEDS[2]], [0.999, EPS, -3e-4, 1e-5], 1)
    ref_pass(ref, offsets, *update, c_ref, code_base, table, False, rs, "rademacher")
    cpu_pass(got, offsets, *update, c_got, code_base, table, False, rs, "rademacher")
    for a, b in zip(ref, got):
        assert same_bits(a, b).all()


def test_float32_ignores_stochastic_rounding():
    a = [(torch.randn(500) * 0.02)]
    b = [a[0].clone()]
    offsets, code_base, n = layout(a)
    codes = torch.zeros(n, dtype=torch.int8)
    table = exact.build_table(a, offsets, exact.tau(EPS, "gaussian"))
    start = a[0].clone()
    cpu_pass(a, offsets, [3, 4], [0.99, 1e-3, -2e-3], 0, codes, code_base, table, False, 17, "gaussian")
    cpu_pass(b, offsets, [3, 4], [0.99, 1e-3, -2e-3], 0, codes, code_base, table, False, None, "gaussian")
    assert torch.equal(int_view(a[0]), int_view(b[0]))
    assert (int_view(a[0]) != int_view(start)).float().mean() > 0.9  # the update was applied


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_is_unbiased(dtype):
    """theta = 1 scaled by alpha = 1 + 2^-10 (an eighth of a bf16 ulp at 1; a float16 ulp is
    2^-10): the mean of the stored values over many elements and rounding seeds is y."""
    n = 1 << 15
    alpha = 1.0 + 2.0**-10 + 2.0**-13
    y = torch.tensor(alpha, dtype=torch.float32).item()
    total = 0.0
    rounds = 8
    for r in range(rounds):
        p = [torch.ones(n, dtype=dtype)]
        offsets, code_base, m = layout(p)
        codes = torch.zeros(m, dtype=torch.int8)
        table = exact.build_table(p, offsets, exact.tau(EPS, "gaussian"))
        cpu_pass(p, offsets, [], [alpha], 0, codes, code_base, table, False, 1000 + r, "gaussian")
        vals = p[0].float()
        lo, hi = vals.min().item(), vals.max().item()
        assert lo <= y <= hi and lo < hi  # only the two neighbours
        total += vals.sum().item()
    mean = total / (n * rounds)
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    prob = (y - 1.0) / ulp if dtype == torch.bfloat16 else (y - (1.0 + 2.0**-10)) / ulp
    sd = ulp * (prob * (1 - prob)) ** 0.5 / (n * rounds) ** 0.5
    assert abs(mean - y) < 5 * sd + 1e-9


def test_stochastic_rounding_mean_per_element():
    """Varied y (a Rademacher update on N(0, 0.02) weights): the mean over rounding seeds of
    each stored bf16 value approaches its float32 y."""
    theta = (torch.randn(4096) * 0.02).to(torch.bfloat16)
    offsets, code_base, m = layout([theta])
    table = exact.build_table([theta], offsets, exact.tau(EPS, "rademacher"))
    codes = torch.zeros(m, dtype=torch.int8)
    y = theta.float() * torch.tensor(0.9995) + 1e-5 * noise.direction([4096], 9, "rademacher", BASE)[0]
    acc = torch.zeros(4096, dtype=torch.float64)
    rounds = 400
    for r in range(rounds):
        p = [theta.clone()]
        cpu_pass(p, offsets, [9], [0.9995, 1e-5], 0, codes, code_base, table, False, 5000 + r, "rademacher")
        acc += p[0].double()
    mean = acc / rounds
    ulp = (theta.float().abs().clamp_min(1e-30).log2().floor() - 7).exp2().double()
    z = (mean - y.double()) / (ulp * 0.5 / rounds**0.5)
    assert z.abs().mean() < 1.0  # |z| is at most ~N(0,1)-sized: a bias would blow it up
    assert abs(z.mean()) < 0.1


def test_codes_out_of_range_raise():
    p = [(torch.randn(256) * 0.02).to(torch.bfloat16)]
    p[0][0] = 1e-12
    offsets, code_base, n = layout(p)
    codes = torch.zeros(n, dtype=torch.int8)
    table = exact.build_table(p, offsets, 0.0)  # tau = 0: every finite element takes a code
    with pytest.raises(RuntimeError, match="code out of range"):
        cpu_pass(p, offsets, [1], [1.0, EPS], 0, codes, code_base, table, True, None, "gaussian")


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scales_raise_and_leave_params(bad):
    p = [(torch.randn(256) * 0.02).to(torch.bfloat16)]
    start = p[0].clone()
    offsets, code_base, n = layout(p)
    codes = torch.zeros(n, dtype=torch.int8)
    table = exact.build_table(p, offsets, exact.tau(EPS, "gaussian"))
    with pytest.raises(RuntimeError, match="scales must be finite"):
        cpu_pass(p, offsets, [1], [1.0, bad], 0, codes, code_base, table, False, None, "gaussian")
    assert torch.equal(int_view(p[0]), int_view(start))


def test_encode_needs_alpha_one():
    p = [torch.randn(256)]
    offsets, code_base, n = layout(p)
    codes = torch.zeros(n, dtype=torch.int8)
    table = exact.build_table(p, offsets, exact.tau(EPS, "gaussian"))
    with pytest.raises(RuntimeError, match="encode needs"):
        cpu_pass(p, offsets, [1], [0.5, EPS], 0, codes, code_base, table, True, None, "gaussian")


def test_an_unaligned_offset_is_named_with_its_value():
    """The op said "offset 1 must be a multiple of 128": the tensor's index, read as its offset."""
    p = [torch.randn(256), torch.randn(64)]
    codes = torch.zeros(512, dtype=torch.int8)
    table = exact.build_table(p, [0, 256], exact.tau(EPS, "gaussian"))
    with pytest.raises(RuntimeError, match="tensor 1's offset is 192; it must be a multiple of 128 "
                       "at or above code_base 0"):
        cpu_pass(p, [0, 192], [1], [1.0, EPS], 0, codes, 0, table, True, None, "gaussian")


ISA_SCRIPT = """
import sys, torch
from zo_opt import _extension, exact
assert _extension.load() is None
from zo_opt.backends import cpu
from zo_opt.functional import Prepared
torch.manual_seed(0)
out = []
for dtype in (torch.float32, torch.bfloat16, torch.float16):
    for dist in ("gaussian", "rademacher"):
        p = [(torch.randn(5000) * 0.02).to(dtype), (torch.randn(3, 131) * 0.02).to(dtype)]
        offsets = [2**32, 2**32 + 5120]
        codes = torch.zeros(5120 + 512, dtype=torch.int8)
        table = exact.build_table(p, offsets, exact.tau(1e-3, dist))
        built = Prepared(p, backend="cpu", offsets=offsets).build_table(exact.tau(1e-3, dist))
        out += [built.chunk_base.view(torch.uint8), built.bits.view(torch.uint8)]
        run = cpu.BACKEND.prepare_exact(p, offsets)
        run(torch.tensor([3]), torch.tensor([1.0, 1e-3]), 0, codes, 2**32, table, True, False, dist)
        run(torch.tensor([3, 4]), torch.tensor([1.0, 1e-3, -1e-3]), 1, codes, 2**32, table, True, False, dist)
        run(torch.tensor([4, 5, 6]), torch.tensor([0.99, -1e-3, 1e-4]), 1, codes, 2**32, table, False, True, dist)
        out += [t.reshape(-1).view(torch.uint8) for t in p] + [codes.view(torch.uint8)]
sys.stdout.write(torch.cat(out).numpy().tobytes().hex())
"""


def test_isa_paths_agree_bit_for_bit():
    """The baseline, AVX2 and (where the CPU has it) AVX-512 clones give the same bits, the
    Gaussian included: no FMA contraction anywhere, so the same float operations. The side
    table's two passes too (test_exact_table matches the default clone's with the reference)."""
    outs = {}
    for isa in ("baseline", "avx2", ""):
        env = dict(os.environ, ZO_OPT_CPU_ISA=isa)
        res = subprocess.run([sys.executable, "-c", ISA_SCRIPT], env=env, capture_output=True,
                             text=True, timeout=600)
        assert res.returncode == 0, res.stderr[-2000:]
        outs[isa] = res.stdout
    assert outs["baseline"] == outs["avx2"] == outs[""]


ISA_PROBE = r"""
#include <cstdio>
#include "cpu/cpu_noise.h"
int main() { std::printf("%d\n", pick_isa()); }
"""


def test_isa_cap_selects_each_clone(tmp_path):
    """The run above compares three clones only if ZO_OPT_CPU_ISA picks them: were the cap
    ignored, its three runs would take one clone and agree with themselves. The kernels'
    own selector (cpu_noise.h's pick_isa), compiled from the same header with g++, must give
    AVX-512 (2), AVX2 (1) and baseline (0) as this CPU allows."""
    import platform
    import shutil
    from pathlib import Path

    compiler = shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        pytest.skip("no host C++ compiler")
    if platform.machine() != "x86_64" or not Path("/proc/cpuinfo").is_file():
        pytest.skip("the ISA clones are x86-64 only (flags read from /proc/cpuinfo)")
    flags = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    has_v3 = {"avx2", "fma"} <= flags
    has_v4 = has_v3 and {"avx512f", "avx512bw", "avx512dq", "avx512vl"} <= flags
    root = Path(__file__).resolve().parents[1] / "csrc"
    (tmp_path / "probe.cpp").write_text(ISA_PROBE)
    exe = tmp_path / "probe"
    build = subprocess.run([compiler, "-std=c++17", "-O1", f"-I{root}", str(tmp_path / "probe.cpp"),
                            "-o", str(exe)], capture_output=True, text=True)
    assert build.returncode == 0, build.stderr[-3000:]
    picked = {}
    for isa in ("", "avx2", "baseline"):
        env = {k: v for k, v in os.environ.items() if k != "ZO_OPT_CPU_ISA"}
        if isa:
            env["ZO_OPT_CPU_ISA"] = isa
        picked[isa] = int(subprocess.run([str(exe)], env=env, capture_output=True, text=True,
                                         check=True).stdout)
    widest = 2 if has_v4 else 1 if has_v3 else 0
    assert picked == {"": widest, "avx2": min(widest, 1), "baseline": 0}, (picked, widest)

