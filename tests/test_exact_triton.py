"""The exact pass's Triton kernel (zo_kernels/exact.py) against its torch reference
(zo_opt.exact.exact_pass_), element by element: Rademacher bit for bit (params and codes),
Gaussian within the float32 rounding of Box-Muller; whole central schedules back to the
start bit for bit; stochastic rounding bit-equal to the reference.

Without a GPU the kernel runs under TRITON_INTERPRET=1 (conftest.py) on small CPU tensors.
"""

import pytest
import torch

from zo_opt import exact, noise
from zo_opt.backends import BACKENDS

pytestmark = [pytest.mark.skipif("triton" not in BACKENDS, reason="triton is not installed"),
              # the interpreter's numpy warns on inf - inf (a NaN gap, as in the reference)
              pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")]

from zo_kernels import exact as kernel  # noqa: E402  (after the skip: needs triton)
from zo_kernels import noise_axpby  # noqa: E402

import exact_pair  # noqa: E402
from exact_pair import EPS, bits, central_schedule, many_seeds_schedule, same_bits  # noqa: E402

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DISTS = noise.DISTRIBUTIONS


def device():
    return torch.device("cpu" if noise_axpby.INTERPRETED else "cuda")


def restored(p, start):
    """Bit for bit, NaN payloads included under the interpreter (numpy keeps them, and the
    table gives theta's bits back); compiled, NaN as NaN: the last pass's alpha * theta
    returns the GPU's canonical NaN."""
    return torch.equal(bits(p), bits(start)) if noise_axpby.INTERPRETED else same_bits(p, start)


def make_params(sizes, dtypes, **kw):
    return exact_pair.make_params(sizes, dtypes, device(), **kw)


def Pair(params, offsets, distribution):  # noqa: N802  (builds an exact_pair.Pair)
    return exact_pair.Pair(kernel.prepare_exact(params, offsets), params, offsets, distribution,
                           code_slack=4)


# --- against the reference -----------------------------------------------------------------

@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_schedule_matches_reference_and_restores(dtype, distribution):
    """Ragged sizes (one with an interior tile) with zeros, -0, tiny, subnormal, NaN, inf
    and huge values: every pass as the reference (Rademacher bit for bit, params and codes),
    and at lr = 0 the parameters come back bit for bit (both distributions: the kernel's
    decode undoes its own encode)."""
    sizes = (3, 129, 4096 + 300)
    params = make_params(sizes, [dtype] * len(sizes))
    start = [p.clone() for p in params]
    pair = Pair(params, noise.offsets(sizes), distribution)
    central_schedule(pair, [5, 2**64 - 1])
    for p, s in zip(params, start):
        assert restored(p, s)
    assert (pair.kc == exact.ESC).sum() >= 15  # the table was exercised


@pytest.mark.parametrize("distribution", DISTS)
def test_mixed_dtypes_in_one_call(distribution):
    """Tensors of three dtypes in one run (one launch per dtype, one codes buffer), a step
    with two directions and an update with weight decay."""
    sizes = (130, 7, 300, 513)
    dtypes = (torch.bfloat16, torch.float32, torch.float16, torch.bfloat16)
    params = make_params(sizes, dtypes, seed=1)
    pair = Pair(params, noise.offsets(sizes), distribution)
    central_schedule(pair, [11, 2**33 + 1], lr_g=[-1e-3, 2.5e-4], alpha=1 - 1e-4)


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("base_offset", [2**34 - 256, 2**39 - 1024])
def test_counters_above_2_32(distribution, base_offset):
    """Gaussian counters pass 2^32 at index 2^34, Rademacher ones at 2^39; the codes are
    indexed from code_base = the first offset."""
    sizes = (129, 1000, 3)
    params = make_params(sizes, [torch.bfloat16] * 3, seed=2)
    offsets = [base_offset + o for o in noise.offsets(sizes)]
    pair = Pair(params, offsets, distribution)
    start = [p.clone() for p in params]
    central_schedule(pair, [2**40 + 3])
    for p, s in zip(params, start):
        assert restored(p, s)


def test_many_old_and_new_seeds():
    """The general path (not one old and one new seed): two old, three new seeds, then
    three old, no new (the restore after a failed closure)."""
    sizes = (200, 1000)
    params = make_params(sizes, [torch.bfloat16, torch.float16], seed=3)
    start = [p.clone() for p in params]
    pair = Pair(params, noise.offsets(sizes), "rademacher")
    many_seeds_schedule(pair)
    for p, s in zip(params, start):
        assert restored(p, s)


@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("lazy_masks", [False, True])
def test_tiles_in_halves_match_reference(monkeypatch, distribution, lazy_masks):
    """A CONFIG whose programs run their tiles in two halves (kernel.CONFIG: block, warps,
    halves, lazy_masks) gives the reference's passes too, with either masks: tensors end in
    either half, and the second half's codes and table chunks are its own."""
    monkeypatch.setattr(kernel, "CONFIG", (256, 1, 2, lazy_masks))
    sizes = (130, 300, 4096 + 200)
    params = make_params(sizes, [torch.bfloat16, torch.float32, torch.float16], seed=5)
    start = [p.clone() for p in params]
    pair = Pair(params, noise.offsets(sizes), distribution)
    central_schedule(pair, [9, 2**40 + 1])
    for p, s in zip(params, start):
        assert restored(p, s)
    assert (pair.kc == exact.ESC).sum() >= 15


@pytest.mark.parametrize("dtype", DTYPES)
def test_stochastic_rounding_matches_reference(dtype):
    """The last pass with stochastic rounding (rounding seed last): bit for bit the
    reference's. The update is ~0.3 ulp of a typical weight: round to nearest would drop
    most of it, stochastic rounding moves many (16-bit) weights."""
    sizes = (4096 + 5,)
    params = make_params(sizes, [dtype], seed=4)
    start = [p.clone() for p in params]
    pair = Pair(params, noise.offsets(sizes), "rademacher")
    rseed = noise.direction_seed(7, 3, 2**64 - 1)
    ulp = float(torch.finfo(dtype).eps)
    central_schedule(pair, [9], lr_g=[0.3 * ulp * 0.02], rounding_seed=rseed)
    moved = (bits(params[0]) != bits(start[0])).float().mean()
    if dtype != torch.float32:
        assert moved > 0.1, moved


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_stochastic_rounding_without_old_seeds(dtype):
    """n_old = 0 with a rounding seed: a plain update stored with stochastic rounding, on
    values that include ties, neighbours of zero and of the largest finite value."""
    gen = torch.Generator().manual_seed(5)
    fin = torch.finfo(dtype)
    x = torch.cat([torch.randn(600, generator=gen), torch.tensor(
        [0.0, -0.0, fin.tiny, -fin.tiny, fin.max, -fin.max, float("inf"), float("nan")])])
    params = [x.to(dtype).to(device())]
    pair = Pair(params, [0], "rademacher")
    pair.new_table()
    pair.step([3], [0.999, fin.eps / 3], 0, False, rounding_seed=2**63 + 17)
    pair.check("sr update")


@pytest.mark.parametrize("aligned", [True, False])
@pytest.mark.parametrize("distribution", DISTS)
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_stochastic_rounding_words_in_every_tile(dtype, distribution, aligned):
    """Stochastic rounding alone (theta <- SR(0.999 theta), no direction), so bit for bit the
    reference's in every tile shape: Gaussian tiles of 16-byte aligned 16-bit tensors take a
    row's words from two Philox calls (8-element rows), unaligned ones from one (4-element
    rows), Rademacher tiles join a 128-element row's from its 32 counters."""
    sizes = (2049, 4100, 300)
    made = make_params(sizes, [dtype] * 3, seed=8)
    if aligned:
        params = made
    else:  # views into one buffer at odd element offsets
        buf = torch.zeros(sum(sizes) + 3, dtype=dtype, device=device())
        params = [buf[at:at + n].copy_(p) for p, n, at in zip(made, sizes, (1, 2050, 6150))]
    nearest = [(0.999 * p.float()).to(dtype) for p in params]
    pair = Pair(params, noise.offsets(sizes), distribution)
    pair.new_table()
    pair.step([], [0.999], 0, False, rounding_seed=2**64 - 5)
    assert all(same_bits(a, b) for a, b in zip(pair.k, pair.r))
    assert not any(same_bits(a, b) for a, b in zip(pair.k, nearest))  # the words moved some


@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16))
def test_gaussian_stochastic_rounding_close(dtype):
    sizes = (257,)
    params = make_params(sizes, [dtype], seed=6)
    pair = Pair(params, [0], "gaussian")
    central_schedule(pair, [4], lr_g=[1e-5], rounding_seed=99)


# --- the runner ------------------------------------------------------------------------------

def test_backend_and_checks():
    params = [torch.zeros(130, device=device())]
    assert hasattr(BACKENDS["triton"], "prepare_exact")
    with pytest.raises(ValueError, match="offset 64 is not a multiple of 128"):
        kernel.prepare_exact(params, [64])
    run = kernel.prepare_exact(params, [0])
    table = exact.build_table(params, [0], exact.tau(EPS, "rademacher"))
    codes = torch.zeros(256, dtype=torch.int8, device=device())
    seeds = torch.tensor([1, 2], dtype=torch.int64, device=device())
    scales = torch.tensor([1.0, EPS], device=device())
    with pytest.raises(ValueError, match="encode needs round-to-nearest"):
        run(seeds, scales, 0, codes, 0, table, True, True, "rademacher")
    with pytest.raises(ValueError, match="code_base 3 is not a multiple of 128"):
        run(seeds[:1], scales, 0, codes, 3, table, True, False, "rademacher")


def test_prepared_list_uses_the_kernel(monkeypatch):
    """functional.Prepared(backend="triton").exact_pass_ runs the kernel's runner (not a
    fallback: matching the reference alone would not tell) and matches backend="torch"."""
    from zo_opt import functional

    prepared = []
    real_prepare = kernel.prepare_exact

    def spy(params, offsets):
        prepared.append([p.data_ptr() for p in params])
        return real_prepare(params, offsets)

    monkeypatch.setattr(kernel, "prepare_exact", spy)
    sizes = (300, 5)
    a = make_params(sizes, [torch.bfloat16, torch.float32], seed=7)
    b = [p.clone() for p in a]
    offsets = noise.offsets(sizes)
    table = exact.build_table(a, offsets, exact.tau(EPS, "rademacher"))
    base, n = exact.span(a, offsets)
    ca, cb = (torch.zeros(n, dtype=torch.int8, device=device()) for _ in range(2))
    seeds = torch.tensor([42], dtype=torch.int64, device=device())
    scales = torch.tensor([1.0, EPS], device=device())
    for params, codes, backend in ((a, ca, "triton"), (b, cb, "torch")):
        functional.Prepared(params, backend=backend).exact_pass_(
            seeds, scales, 0, codes, base, table, encode=True, rounding=False,
            distribution="rademacher")
    assert all(same_bits(x, y) for x, y in zip(a, b)) and torch.equal(ca, cb)
    # the triton list went through zo_kernels.exact (in one runner or one per work item)
    assert sorted(x for call in prepared for x in call) == sorted(p.data_ptr() for p in a)
    assert not all(same_bits(x, y) for x, y in zip(a, make_params(sizes, [torch.bfloat16, torch.float32], seed=7)))


# --- compilation ---------------------------------------------------------------------------

# the tl.fma calls of noise_axpby._log (11) and _cos_sin_2pi (7), and _sqrt's PTX (2)
BOX_MULLER_FMAS = 20


def test_exact_mask_modes_compile_for_sm90(compile_reports):
    """The exact kernel with lazy masks and with eager ones (CONFIG's lazy_masks; the GPU
    sweep weighs both) compiles: no approximate math, the same square roots in each of the
    lazy kernel's two copies of its noise code, the passes that encode within their cap and
    without spills, and fewer instructions on an interior tile's path with lazy masks."""
    eager = {(r["dtype"], r["rademacher"], r["variant"]): r for r in compile_reports("exact_eager")}
    lazy = compile_reports("exact_lazy")
    assert len(lazy) == len(eager) == 10
    for r in lazy:
        e = eager[(r["dtype"], r["rademacher"], r["variant"])]
        assert r["lazy_masks"] and not e["lazy_masks"], r
        assert r["approx"] == e["approx"] == [] and r["sqrt_seeds"] == 2 * e["sqrt_seeds"], r
        if r["registers"] is not None and r["variant"] != "update_sr":
            assert r["registers"] <= kernel.ENCODE_MAXNREG and r["spill_bytes"] == 0, r
        if r["aligned"] and r["interior_instructions"] is not None:  # None: no nvdisasm
            assert r["interior_instructions"] < e["interior_instructions"], (r, e)


def test_exact_kernel_compiles_for_sm90(compile_reports):
    """triton.compile for sm_90 without a GPU. No approximate math but the square root's
    seed, one a pair of normals; with enable_fp_fusion=False no fma but Box-Muller's own (its
    polynomials and square root spell them out, and the PTX has exactly those of the two seed
    loops' normals): none in Rademacher variants; aligned tiles use the 16-byte loads and
    stores the plain kernel does; registers within bounds; no call in a seed loop; and no
    Philox call made twice (see test_aligned_tiles_make_no_philox_call_twice)."""
    reports = compile_reports("exact")
    assert len(reports) == 10
    per_thread = kernel.CONFIG[0] // (kernel.CONFIG[1] * 32)
    for r in reports:
        assert r["kernel"] == "exact" and r["cubin_bytes"] > 0 and r["approx"] == [], r
        box_muller_pairs = 0 if r["rademacher"] else 2 * 2 * per_thread // 4  # loops x calls x 2
        assert r["fma_count"] == BOX_MULLER_FMAS * box_muller_pairs, r
        assert r["sqrt_seeds"] == box_muller_pairs, r
        if r["loop_calls"] is not None:  # nvdisasm: the seed loops found, none calls
            assert r["loop_instructions"] and r["loop_calls"] == 0, r
        if r["registers"] is not None:  # ptxas: the passes that encode (the first and the
            # 2q - 1 middle ones) fit three 256-thread blocks an SM without spills, the last
            # one at least one without the 255-register cap's spills
            if r["variant"] == "update_sr":
                assert r["registers"] <= 192, r
            else:
                assert r["registers"] <= kernel.ENCODE_MAXNREG and r["spill_bytes"] == 0, r
        # a Philox call per 4 elements a thread holds (at most) in each tile of words the
        # code makes: z of the old seeds, of the new seeds, and the rounding words
        tiles = {"first": 2, "restore_perturb": 2, "update_sr": 3}[r["variant"]]
        assert 0 < r["philox_multiplies"] <= 20 * tiles * per_thread // 4, r
        if r["aligned"]:  # 16-byte vectors of parameters for every dtype
            assert "ld.global.v4.b32" in r["loads"] and "st.global.v4.b32" in r["stores"], r


# --- on a GPU ------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(noise_axpby.INTERPRETED, reason="the interpreter is on")
def test_gpu_graph_capture_matches_reference():
    """Full-size tensors; the middle pass captured in a CUDA graph and replayed."""
    sizes = (1, 129, 3 * 768 * 768 + 5, 1 << 20)
    dtypes = (torch.bfloat16, torch.float16, torch.bfloat16, torch.float32)
    params = make_params(sizes, dtypes, seed=8)
    pair = Pair(params, noise.offsets(sizes), "rademacher")
    pair.new_table()
    pair.step([1], [1.0, EPS], 0, True)
    pair.check("first")
    seeds = torch.tensor([1, 1], dtype=torch.int64, device="cuda")
    scales = torch.tensor([1.0, EPS, -EPS], device="cuda")
    pair.run(seeds, scales, 1, pair.kc, pair.base, pair.table, True, False, "rademacher")
    torch.cuda.synchronize()  # compiled; now capture the same pass and replay it
    s = torch.cuda.Stream()
    with torch.cuda.stream(s):
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            pair.run(seeds, scales, 1, pair.kc, pair.base, pair.table, True, False,
                     "rademacher")
    scales.copy_(torch.tensor([1.0, -EPS, EPS]))  # back to +eps z
    graph.replay()
    exact.exact_pass_(pair.r, pair.offsets, [1, 1], torch.tensor([1.0, EPS, -EPS]), 1,
                      pair.rc, pair.base, pair.table, encode=True, rounding_seed=None,
                      distribution="rademacher")
    exact.exact_pass_(pair.r, pair.offsets, [1, 1], torch.tensor([1.0, -EPS, EPS]), 1,
                      pair.rc, pair.base, pair.table, encode=True, rounding_seed=None,
                      distribution="rademacher")
    pair.check("graph")
