"""The Triton backend against the noise reference (zo_opt.noise), element by element.

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py) on small CPU tensors;
on a GPU they run compiled, and the `gpu` tests repeat the checks at full size.
"""

import pytest
import torch
import triton
import triton.language as tl

from zo_opt import functional, noise
from zo_opt.backends import BACKENDS, resolve
from zo_kernels import noise_axpby as kernels

pytestmark = pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed")

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
RAGGED = (0, 1, 3, 127, 128, 129, 257, 1000)
SEEDS = (0, 1, 2**32 + 7, 2**64 - 1)
GAUSSIAN_TOL = 2e-5  # NOISE.md: |z - z_ref| <= 2e-5


def device_for_kernels():
    return torch.device("cpu" if kernels.INTERPRETED else "cuda")


def triton_pass(params, seeds, scales, distribution, **kw):
    functional.noise_axpby_(params, seeds, scales, distribution=distribution, backend="triton", **kw)


def reference_pass(params, seeds, scales, distribution, **kw):
    """The torch reference backend on float32 copies: the float32 result before rounding."""
    copies = [p.detach().to(torch.float32) for p in params]
    functional.noise_axpby_(copies, seeds, scales, distribution=distribution, backend="torch", **kw)
    return copies


def assert_matches_reference(out, ref32, scales, distribution):
    """Rademacher (with dyadic scales): exactly torch's rounding of the float32 result.
    Gaussian: the float32 results within the contract's tolerance, plus one unit of the
    stored dtype's rounding."""
    noise_bound = GAUSSIAN_TOL * sum(abs(float(c)) for c in scales[1:])
    for k, (o, r) in enumerate(zip(out, ref32)):
        if distribution == "rademacher":
            assert torch.equal(o.cpu(), r.to(o.dtype).cpu()), f"tensor {k} ({o.dtype})"
        else:
            r = r.to(o.device)
            ulp = torch.finfo(o.dtype).eps * r.abs()
            err = (o.to(torch.float32) - r).abs()
            assert (err <= noise_bound + ulp + 1e-30).all(), f"tensor {k}: max err {err.max()}"


def random_params(sizes, dtypes, device, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(n, generator=gen).to(device=device, dtype=dt)
            for n, dt in zip(sizes, dtypes)]


def check_against_reference(sizes, dtypes, seeds, scales, distribution, device, **kw):
    params = random_params(sizes, dtypes, device)
    ref32 = reference_pass(params, seeds, scales, distribution, **kw)
    triton_pass(params, seeds, scales, distribution, **kw)
    assert_matches_reference(params, ref32, scales, distribution)


# --- selection -----------------------------------------------------------------------------

def test_available_where_its_kernels_run():
    """On CPU tensors under the interpreter, on CUDA ones compiled (run.sh runs this file
    compiled on the GPU too)."""
    backend = BACKENDS["triton"]
    assert backend.unavailable_reason() is None
    for dt in DTYPES:
        assert backend.supports(torch.zeros(1, dtype=dt, device=device_for_kernels()))
    assert not backend.supports(torch.zeros(1, dtype=torch.float64, device=device_for_kernels()))
    assert resolve("auto", torch.zeros(1)).name == "cpu"  # auto keeps the C++ loops on CPU


# --- the noise itself ----------------------------------------------------------------------

@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_known_answers(kat, distribution):
    """Each KAT index as the single element of a tensor placed there (odd offsets included)."""
    offsets = kat["indices"]
    for case in kat["cases"]:
        params = [torch.zeros(1, device=device_for_kernels()) for _ in offsets]
        triton_pass(params, [int(case["seed"])], [1.0, 1.0], distribution, offsets=offsets)
        got = torch.cat(params).double().cpu()
        want = torch.tensor(case[distribution], dtype=torch.float64)
        if distribution == "rademacher":
            assert torch.equal(got, want), case["seed"]
        else:
            assert (got - want).abs().max() <= GAUSSIAN_TOL, case["seed"]


def test_offsets_example(kat):
    ex = kat["offsets_example"]
    assert noise.offsets(ex["numels"]) == ex["offsets"]
    params = [torch.zeros(n, device=device_for_kernels()) for n in ex["numels"]]
    triton_pass(params, [5], [0.0, 1.0], "rademacher")
    for p, ref in zip(params, noise.direction(ex["numels"], 5, "rademacher")):
        assert torch.equal(p.cpu(), ref)


@triton.jit
def _box_muller_of_words(words_ptr, out_ptr, BLOCK: tl.constexpr, FUSED: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    w = tl.load(words_ptr + offs).to(tl.uint32, bitcast=True)
    z0, z1 = kernels._box_muller(w, w, FUSED)
    tl.store(out_ptr + 2 * offs, z0)
    tl.store(out_ptr + 2 * offs + 1, z1)


@pytest.mark.parametrize("fused", [False, True])
def test_box_muller_on_every_uniform(fused):
    """The kernels' float32 log and cos/sin of 2 pi u (polynomials, not libdevice) on all 2^23
    uniforms u = (m + 1/2) 2^-23 that NOISE.md can draw: r cos and r sin within the
    contract's 2e-5 of the same formula in float64, everywhere (the tails included), as the
    plain pass writes them (fused=False: the GPU's compiler contracts them to fma) and as
    the exact pass does (fmas spelled out). On a GPU too (test_gpu_box_muller_on_every_uniform)."""
    m = torch.arange(2**23, dtype=torch.int64)
    words = (m << 9).to(torch.int32).to(device_for_kernels())  # uint32 bits, wrapped
    out = torch.empty(2 * m.numel(), device=words.device)
    # Large programs make the interpreter fast (numpy over a block); compiled, a 2^16-element
    # program takes ptxas ~20 s (most of this test's minute on the H200), 1024 under a second.
    block = 2**16 if kernels.INTERPRETED else 1024
    _box_muller_of_words[(m.numel() // block,)](words, out, BLOCK=block, FUSED=fused)
    u = (m.double() + 0.5) * 2.0**-23
    r, t = torch.sqrt(-2 * torch.log(u)), 2 * torch.pi * u
    err = (out.cpu().double().view(-1, 2) - torch.stack([r * torch.cos(t), r * torch.sin(t)], 1)).abs()
    assert err.max() <= GAUSSIAN_TOL, (err.max(), m[err.max(1).values.argmax()])


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("seed", SEEDS)
def test_ragged_sizes_and_seeds(distribution, seed):
    check_against_reference(RAGGED, [torch.float32] * len(RAGGED), [seed], [0.5, 0.375],
                            distribution, device_for_kernels())


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("base_offset", [2**34 - 300, 2**39 - 1000 + 77])
def test_counters_above_2_32(distribution, base_offset):
    """Gaussian counters pass 2^32 at index 2^34, Rademacher ones at 2^39: tensors straddle
    those points (the second base is not a multiple of 128 either)."""
    sizes = (129, 1000, 3)
    check_against_reference(sizes, [torch.float32] * 3, [2**40 + 3], [1.0, -0.25], distribution,
                            device_for_kernels(), base_offset=base_offset)


# --- dtypes and rounding -------------------------------------------------------------------

@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_dtypes(distribution, dtype):
    check_against_reference(RAGGED, [dtype] * len(RAGGED), [123], [0.5, 0.375], distribution,
                            device_for_kernels())


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_mixed_dtypes_in_one_call(distribution):
    sizes = (130, 7, 300, 128, 1, 513)
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16, torch.float16,
              torch.float32)
    check_against_reference(sizes, dtypes, [99], [1.0, 0.125], distribution, device_for_kernels())


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_store_rounds_like_torch(dtype):
    """The half-precision store equals torch's round-to-nearest-even of the kernel's own
    float32 result (the same pass on a float32 twin), on random values, exact ties, and
    infinities and NaN."""
    device = device_for_kernels()
    ulp = torch.finfo(dtype).eps
    k = torch.arange(1, 121, dtype=torch.float32)
    ties = 1.0 + k * ulp  # + or - ulp/2 is exactly halfway; odd k must round to even
    special = torch.tensor([float("inf"), float("-inf"), float("nan"), 0.0, -0.0, 1e-40])
    x = torch.cat([torch.randn(700, generator=torch.Generator().manual_seed(1)), ties, special])
    half = x.to(dtype).to(device)
    for scales, distribution in (([1.0, ulp / 2], "rademacher"), ([0.9, 0.3, -1e-3], "gaussian")):
        twin = half.to(torch.float32)
        seeds = list(range(len(scales) - 1))
        triton_pass([half, twin], seeds, scales, distribution, offsets=[0, 0])
        torch.testing.assert_close(half.cpu(), twin.to(dtype).cpu(), rtol=0, atol=0,
                                   equal_nan=True)


def test_bf16_ties_round_to_even_not_truncate():
    ulp = torch.finfo(torch.bfloat16).eps
    x = torch.full((128,), 1.0 + ulp, dtype=torch.bfloat16, device=device_for_kernels())
    triton_pass([x], [0], [1.0, ulp / 2], "rademacher")  # 1 + ulp +- ulp/2: two ties
    z = noise.direction([128], 0, "rademacher")[0]
    want = torch.where(z > 0, 1.0 + 2 * ulp, 1.0)  # both to the even neighbour
    assert torch.equal(x.float().cpu(), want)


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_coefficients_give_the_references_signed_zeros(distribution, dtype):
    """The sum of the directions starts from +0, as the reference's does: with coefficients 0
    (a direction whose two losses are equal), a -0.0 weight comes out +0.0 wherever a
    reference term is -0.0 too. Compared as bits, which torch.equal does not see."""
    seeds, scales = [3, 2**64 - 9], [1.0, 0.0, -0.0]
    params = [torch.tensor([-0.0, 0.0, 1.5] * 300, dtype=dtype, device=device_for_kernels())]
    ref = reference_pass(params, seeds, scales, distribution)[0].to(dtype)
    triton_pass(params, seeds, scales, distribution)
    bits = {2: torch.int16, 4: torch.int32}[dtype.itemsize]
    assert torch.equal(params[0].view(bits).cpu(), ref.view(bits).cpu())
    assert (ref.view(bits)[::3] == 0).all()  # the case: -0.0 weights that end as +0.0


# --- the optimizer's passes ----------------------------------------------------------------

@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_zo_update_many_seeds(distribution):
    """The fused update / federated replay: many seeds (one above 2^63) in one pass."""
    device = device_for_kernels()
    sizes = (300, 129, 5)
    seeds = [0, 1, 2**33 + 1, 2**63 + 5, 2**64 - 1, 77]
    coeffs = [0.5, -0.25, 0.125, 1.0, -2.0, 0.0625]
    params = random_params(sizes, [torch.float32] * 3, device)
    ref32 = reference_pass(params, seeds, [1.0, *coeffs], distribution)
    functional.zo_update_(params, seeds, torch.tensor(coeffs, device=device),
                          distribution=distribution, backend="triton")
    assert_matches_reference(params, ref32, [1.0, *coeffs], distribution)


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_unaligned_views_take_the_unaligned_tiles(distribution):
    """Views that start off a 16-byte boundary (one buffer, odd starts) run the unaligned
    configuration (shorter tiles, scalar accesses) and still match the reference."""
    buf = torch.randn(20_000, generator=torch.Generator().manual_seed(4)).to(device_for_kernels())
    params = [buf[1:5001], buf[5003:5003 + 9000], buf[14_005:14_010]]
    assert not kernels.table_for(params, noise.offsets([5000, 9000, 5]), 4096).aligned
    ref32 = reference_pass(params, [11, 2**64 - 7], [1.0, 0.25, -0.5], distribution)
    triton_pass(params, [11, 2**64 - 7], [1.0, 0.25, -0.5], distribution)
    assert_matches_reference(params, ref32, [1.0, 0.25, -0.5], distribution)
    assert kernels.config(torch.float32, distribution, aligned=False) == kernels.UNALIGNED


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("tiling", [kernels.Tiling(1024, 4), kernels.Tiling(1024, 4, halves=2),
                                    kernels.Tiling(512, 2, halves=2, maxnreg=64),
                                    kernels.Tiling(1024, 4, halves=2, lazy_masks=True),
                                    kernels.Tiling(1024, 4, persistent=1),
                                    kernels.Tiling(512, 2, halves=2, lazy_masks=True,
                                                   persistent=3)])
def test_tilings_give_the_same_bits(monkeypatch, distribution, tiling):
    """A tiling from a GPU sweep (kernels.TILINGS) changes the tiles, never a value: z is a
    function of (seed, global index) alone. Tensors end in either half of a two-half program,
    one program holds a tensor's end and the next's start, and a persistent grid's programs
    walk several tiles each (kernels.INTERPRETER_SMS stands in for a GPU's SMs)."""
    sizes, dtypes = (5000, 129, 1, 700), (torch.bfloat16, torch.float32, torch.float16, torch.float32)
    offsets = [2**33 + o for o in noise.offsets(sizes)]
    default = random_params(sizes, dtypes, device_for_kernels())
    tiled = [p.clone() for p in default]
    triton_pass(default, [7, 2**64 - 3], [1.0, 0.5, -0.25], distribution, offsets=offsets)
    monkeypatch.setattr(kernels, "TILINGS", {key: tiling for key in kernels.TILINGS})
    run = kernels.prepare(tiled, offsets)
    seeds = functional.seeds_on([7, 2**64 - 3], device_for_kernels())
    run(seeds, torch.tensor([1.0, 0.5, -0.25], device=device_for_kernels()), distribution)
    for a, b in zip(default, tiled):
        assert torch.equal(a.view(torch.uint8), b.view(torch.uint8))
    assert kernels.config(torch.bfloat16, distribution) == tiling


def test_perturb_then_restore_is_exact():
    """+eps z then -eps z with Rademacher, a dyadic eps and values on a 2^-10 grid restores
    float32 bit for bit; the second call reuses the cached tensor table."""
    gen = torch.Generator().manual_seed(3)
    params = [(torch.randint(-2**12, 2**12, (n,), generator=gen) * 2.0**-10).to(device_for_kernels())
              for n in (300, 1, 4096 + 3)]
    before = [p.clone() for p in params]
    functional.perturb_(params, 2**50 + 1, 2**-4, distribution="rademacher", backend="triton")
    assert not torch.equal(params[0], before[0])
    functional.perturb_(params, 2**50 + 1, -2**-4, distribution="rademacher", backend="triton")
    for p, b in zip(params, before):
        assert torch.equal(p, b)


# --- compilation ---------------------------------------------------------------------------

def test_every_kernel_compiles_for_sm90(compile_reports):
    """triton.compile for a CUDA sm_90 target, no GPU needed. No approximate math may appear
    but the estimate sqrt_rn's fast path refines, one a pair of normals (kernels._sqrt: two
    for each Philox call of a Gaussian pass, none in a Rademacher one); no call in a seed loop
    (sqrt_rn's slow path took one a pair of normals, behind a branch); aligned tensors of
    every dtype must get 16-byte vector loads and stores, and no uncapped variant spills (the
    unaligned one, a scalar address an element, runs shorter tiles: kernels.UNALIGNED);
    capped ones keep within their tiling's maxnreg (kernels.TILINGS) and spill at most
    kernels.CAP_SPILL_BYTES, the most a cap measured faster on a GPU took."""
    reports = compile_reports()
    assert len(reports) == 12
    for r in reports:
        assert_compiled_code(r)
        calls = -(-r["philox_multiplies"] // 20)  # the first round's 0 * M1 is made once
        assert r["sqrt_seeds"] == (0 if r["rademacher"] else 2 * calls), r
        if r["registers"] is not None:  # ptxas: aligned, two 256-thread blocks an SM at least
            assert r["registers"] <= (128 if r["aligned"] else 160), r
            if r["maxnreg"] is None:
                assert r["spill_bytes"] == 0, r
            else:
                assert r["registers"] <= r["maxnreg"], r
                assert r["spill_bytes"] <= kernels.CAP_SPILL_BYTES, r


def assert_compiled_code(r):
    """What every plain variant's PTX and SASS must show: no approximate math (the sqrt seeds
    are counted apart), no call in a seed loop, 16-byte vectors in aligned tiles."""
    assert r["cubin_bytes"] > 0 and r["approx"] == [], r
    if r["loop_calls"] is not None:  # nvdisasm: the seed loops found, none calls
        assert r["loop_instructions"] and r["loop_calls"] == 0, r
    if r["aligned"]:
        assert "ld.global.v4.b32" in r["loads"] and "st.global.v4.b32" in r["stores"], r


def test_mask_modes_compile_for_sm90(compile_reports):
    """Every variant with lazy masks and with eager ones (Tiling.lazy_masks; the GPU sweep
    weighs both) compiles as the defaults do: no approximate math but the sqrt seeds, no call
    in a seed loop, 16-byte vectors, registers within a capped tiling's maxnreg (spills are
    what a sweep weighs, so they are not bounded here), and the same Philox work in each of
    the lazy kernel's two copies of its noise code. Lazy masks keep every mask off an interior
    tile's path: fewer instructions there than eager ones, and in Rademacher passes no element
    compares (2 an element and part when LLVM hoisted the masked path's onto it)."""
    eager = {(r["dtype"], r["rademacher"], r["aligned"]): r for r in compile_reports("eager")}
    lazy = compile_reports("lazy")
    assert len(lazy) == len(eager) == 12
    for r in lazy:
        e = eager[(r["dtype"], r["rademacher"], r["aligned"])]
        assert r["lazy_masks"] and not e["lazy_masks"], r
        for report in (r, e):
            assert_compiled_code(report)
            if report["registers"] is not None and report["maxnreg"] is not None:
                assert report["registers"] <= report["maxnreg"], report
        assert r["sqrt_seeds"] == 2 * e["sqrt_seeds"], r
        assert 0 < r["philox_multiplies"] <= 2 * e["philox_multiplies"], r
        if r["aligned"] and r["interior_instructions"] is not None:
            assert r["interior_instructions"] < e["interior_instructions"], (r, e)
            if r["rademacher"]:
                elements = r["block"] // (r["halves"] * r["warps"] * 32)  # a part, a thread
                assert e["interior_compares"] >= 2 * elements > r["interior_compares"], (r, e)


def test_persistent_grids_compile_for_sm90(compile_reports):
    """Every variant on a persistent grid (Tiling.persistent: its programs walk the tiles in
    a loop) compiles as launched, with the same Philox work and square roots: no
    approximate math but the sqrt seeds, no call in a loop, 16-byte vectors, registers within
    a capped tiling's maxnreg."""
    default = {(r["dtype"], r["rademacher"], r["aligned"]): r for r in compile_reports()}
    reports = compile_reports("persistent")
    assert len(reports) == 12
    for r in reports:
        d = default[(r["dtype"], r["rademacher"], r["aligned"])]
        assert r["persistent"] and not d["persistent"], r
        assert_compiled_code(r)
        for work in ("sqrt_seeds", "philox_multiplies"):
            assert r[work] == d[work], r
        if r["registers"] is not None and r["maxnreg"] is not None:
            assert r["registers"] <= r["maxnreg"], r


def test_aligned_tiles_make_no_philox_call_twice(compile_reports):
    """The Philox work of one thread and seed in each copy of the noise code (Philox makes 20
    multiplies a call, the PTX counts them): a Gaussian call per 4 elements it holds, and
    one Rademacher call for all of them, since its elements are the slices of one
    128-element row (kernels.LANES) where a row-per-warp layout had each thread make a call
    for every 16-byte vector."""
    for r in compile_reports():
        if r["aligned"]:
            per_thread = r["block"] // (r["warps"] * 32)
            calls = r["halves"] if r["rademacher"] else per_thread // 4
            copies = 2 if r["lazy_masks"] else 1  # of the noise code: lazy masks' two paths
            assert 0 < r["philox_multiplies"] <= 20 * calls * copies, r


# --- full size on a GPU --------------------------------------------------------------------

needs_compiled = pytest.mark.skipif(kernels.INTERPRETED,
                                    reason="the interpreter is on: unset TRITON_INTERPRET")
GPU_SIZES = (1, 127, 129, 768, 3 * 768 * 768 + 5, 1 << 22)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("fused", [False, True])
def test_gpu_box_muller_on_every_uniform(fused):
    test_box_muller_on_every_uniform(fused)


@triton.jit
def _sqrt_of(x_ptr, out_ptr, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(out_ptr + offs, kernels._sqrt(tl.load(x_ptr + offs)))


@pytest.mark.gpu
@needs_compiled
def test_gpu_sqrt_is_sqrt_rn_on_its_domain():
    """The kernels' square root (sqrt_rn's fast path written out: an approximate rsqrt and a
    Newton step) against torch's correctly rounded one, bit for bit, on every float32 in
    [2^-24, 64): Box-Muller's -2 ln u lie in [1.1e-7, 33.3]."""
    bits = lambda v: int(torch.tensor(v, dtype=torch.float32).view(torch.int32))
    x = torch.arange(bits(2.0**-24), bits(64.0), dtype=torch.int32, device="cuda")
    x = x.view(torch.float32)
    out = torch.empty_like(x)
    _sqrt_of[(x.numel() // 1024,)](x, out, BLOCK=1024)  # 30 binades of 2^23 floats
    wrong = (out.view(torch.int32) != torch.sqrt(x).view(torch.int32)).nonzero()
    assert wrong.numel() == 0, x[wrong[:8, 0]].tolist()


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_gpu_full_size(distribution, dtype):
    check_against_reference(GPU_SIZES, [dtype] * len(GPU_SIZES), [2**64 - 1], [0.5, 0.375],
                            distribution, torch.device("cuda"), base_offset=2**34 - 4096)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_gpu_mixed_dtypes_many_seeds(distribution):
    dtypes = [DTYPES[k % 3] for k in range(len(GPU_SIZES))]
    seeds = [0, 1, 2**32 + 7, 2**64 - 1]
    check_against_reference(GPU_SIZES, dtypes, seeds, [1.0, 0.5, -0.25, 0.125, 1.0],
                            distribution, torch.device("cuda"), base_offset=2**39 - 128)


@pytest.mark.gpu
@needs_compiled
def test_gpu_known_answers(kat):
    for distribution in noise.DISTRIBUTIONS:
        test_known_answers(kat, distribution)
