"""Exact restore and stochastic rounding (docs/EXACT.md) through ZOOptimizer: bit-exact
weights after many lr=0 steps where round-to-nearest drifts, unchanged perturbations and an
unbiased estimator, unbiased stochastic rounding, and bf16 training that keeps up with float32."""
import math

import pytest
import torch

import zo_opt
from zo_opt import ZOOptimizer, exact, noise
from zo_opt.backends import BACKENDS

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def exact_backends():
    return [b for b in zo_opt.available_backends()
            if hasattr(BACKENDS[b], "prepare_exact") and BACKENDS[b].supports(torch.zeros(1))]


def hard_values(n: int, dtype: torch.dtype, seed: int = 0) -> torch.Tensor:
    """Weights with the cases that break a naive restore: zeros of both signs, values far
    below eps, values near the table threshold, large values, and ordinary N(0, 0.02) ones."""
    gen = torch.Generator().manual_seed(seed)
    p = torch.randn(n, generator=gen) * 0.02
    p[0::11] = 0.0
    p[1::11] = -0.0
    p[2::11] *= 1e-4
    p[3::11] = exact.tau(1e-3, "gaussian") * (1 + torch.rand(len(p[3::11]), generator=gen))
    p[4::11] *= 500
    return p.to(dtype)


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    return torch.equal(a.view(view), b.view(view))


def ulps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Distance in units in the last place of b (both of one float dtype)."""
    view = {4: torch.int32, 2: torch.int16}[a.element_size()]
    mag = {4: 0x7FFFFFFF, 2: 0x7FFF}[a.element_size()]

    def ordered(x):
        bits = x.view(view).to(torch.int64)
        return torch.where(bits < 0, -(bits & mag), bits)

    return (ordered(a) - ordered(b)).abs()


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", exact_backends())
def test_200_lr0_steps_restore_every_bit(backend, dtype, distribution):
    n = 300 if backend == "triton" else 2000  # the Triton interpreter is slow
    p = hard_values(n, dtype)
    start = p.clone()
    opt = ZOOptimizer([p], lr=0.0, q=1, eps=1e-3, seed=3, distribution=distribution,
                      backend=backend, exact=True)
    for _ in range(200):
        opt.step(lambda: p.float().square().sum())
    assert same_bits(p, start)


def gpu_exact_backends():
    if not torch.cuda.is_available():
        return ["none"]
    probe = torch.zeros(1, device="cuda")
    return [b for b in zo_opt.available_backends()
            if hasattr(BACKENDS[b], "prepare_exact") and BACKENDS[b].supports(probe)] or ["none"]


@pytest.mark.gpu
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("backend", gpu_exact_backends())
def test_gpu_200_lr0_steps_restore_every_bit(backend, dtype, distribution):
    if backend == "none":
        pytest.skip("no GPU backend with an exact pass")
    p = hard_values(300_000, dtype).cuda()
    start = p.clone()
    opt = ZOOptimizer([p], lr=0.0, q=2, eps=1e-3, seed=3, distribution=distribution,
                      backend=backend, exact=True)
    for _ in range(200):
        opt.step(lambda: p.float().square().sum())
    assert same_bits(p, start)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_round_to_nearest_drifts_where_exact_does_not(dtype):
    """The failure the exact mode removes, measured: the MeZO-style +eps, -2eps, +eps loop and
    our own passes without exact mode both move bf16/fp16 weights at lr = 0."""
    from benchmarks.baselines import mezo_perturb_

    p = hard_values(5000, dtype)
    start = p.clone()
    for step in range(50):
        for scale in (1, -2, 1):
            mezo_perturb_([p], 100 + step, scale * 1e-3)
    assert ulps(p, start).max() > 0
    q = hard_values(5000, dtype)
    opt = ZOOptimizer([q], lr=0.0, q=1, seed=3, exact=False, stochastic_rounding=False)
    for _ in range(50):
        opt.step(lambda: q.float().sum())
    assert ulps(q, start).float().mean() > 0


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_exact_mode_perturbs_exactly_like_round_to_nearest(dtype, distribution):
    """The closure sees RN(theta + eps z) in both modes: the perturbation's distribution, and
    so the estimator, are unchanged; exact mode changes only where theta returns to. (The
    plain and exact kernels may round Box-Muller's z differently in the last float32 bit,
    which NOISE.md allows: Gaussian points agree to an ulp, Rademacher ones bit for bit.)"""
    seen = {}
    for mode in (True, False):
        p = hard_values(3000, dtype)
        points = []

        def closure():
            points.append(p.clone())
            return p.float().sum()

        ZOOptimizer([p], lr=0.0, q=3, seed=8, exact=mode, stochastic_rounding=False,
                    distribution=distribution).step(closure)
        seen[mode] = points
    first = ulps(seen[True][0], seen[False][0])  # the first point: same theta, same z
    assert first.max() == 0 if distribution == "rademacher" else first.max() <= 1
    # later points start from the exact theta in exact mode, from a drifted one otherwise:
    # apart by a few roundings of theta +- eps z
    theta = hard_values(3000, dtype).float()
    bound = 4 * torch.finfo(dtype).eps * (theta.abs() + 6e-3)
    for a, b in zip(seen[True][1:], seen[False][1:]):
        a, b = a.float(), b.float()
        finite = torch.isfinite(theta)
        assert ((a - b).abs()[finite] <= bound[finite]).all()


def test_estimator_is_unbiased_in_bf16_exact_mode():
    n = 64
    w = torch.randn(n)
    p = (torch.randn(n) * 0.5).to(torch.bfloat16)
    opt = ZOOptimizer([p], lr=0.0, q=2048, eps=1e-2, seed=4, exact=True)
    opt.step(lambda: (w * p.float()).sum())
    rec = opt.last_record
    z = torch.stack([noise.direction([n], s)[0] for s in rec.seeds])
    estimate = (rec.grads[:, None] * z).mean(0)
    cosine = torch.nn.functional.cosine_similarity(estimate, w, dim=0)
    assert cosine > 0.95, cosine


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_stochastic_rounding_is_unbiased(dtype):
    gen = torch.Generator().manual_seed(1)
    y = torch.randn(64, generator=gen) * torch.logspace(-3, 2, 64)
    draws = torch.stack([exact.stochastic_round(y, dtype, exact.rounding_words(torch.arange(64), s)).float()
                         for s in range(4000)])
    lo = y.to(dtype).float()
    gap = (torch.nextafter(lo.to(dtype), torch.tensor(math.inf, dtype=dtype)).float() - lo).abs()
    sigma = gap / 2 / math.sqrt(len(draws))
    assert ((draws.mean(0) - y).abs() <= 5 * sigma + 1e-12).all()
    assert set(draws.unique().tolist()) <= set(torch.cat([draws.min(0).values, draws.max(0).values]).tolist())


@pytest.mark.parametrize("backend", [b for b in exact_backends() if b != "triton"])
def test_stochastic_update_matches_the_float32_update_on_average(backend):
    """An update of ~1/100 ulp: round-to-nearest keeps every weight, stochastic rounding moves
    them by the float32 update on average (and the record replays it bit for bit)."""
    n, lr = 20000, 1e-3
    w = torch.randn(n)
    moved = {}
    for sr in (False, True):
        p = torch.ones(n, dtype=torch.bfloat16)
        opt = ZOOptimizer([p], lr=lr, q=1, seed=6, exact=True, stochastic_rounding=sr,
                          backend=backend)
        opt.step(lambda: (w * p.float()).sum() * 1e-2)
        rec = opt.last_record
        z = noise.direction([n], rec.seeds[0])[0]
        update = -lr * rec.grads[0] * z
        moved[sr] = (p.float() - 1.0, update, rec)
    delta, update, _ = moved[False]
    assert update.abs().max() < 2.0**-9  # below half an ulp of 1.0 in bf16
    assert torch.count_nonzero(delta) == 0
    delta, update, rec = moved[True]
    assert torch.count_nonzero(delta) > 0
    sigma = math.sqrt(float((update.abs() * (2.0**-7 - update.abs())).mean()) / n)
    assert abs(float((delta - update).mean())) < 5 * sigma
    replica = torch.ones(n, dtype=torch.bfloat16)
    zo_opt.functional.zo_update_([replica], rec.seeds, -rec.lr * rec.grads / rec.q,
                                 rounding_seed=rec.rounding_seed, backend=backend)
    assert same_bits(replica, torch.ones(n, dtype=torch.bfloat16) + delta.to(torch.bfloat16))


def _least_squares_run(dtype, exact_mode, sr, steps=300):
    """ZO-SGD on least squares with weights near 8, where a bf16 ulp is 1/16 and the update
    about 1/100 of it: the regime of MeZO's lr ~ 1e-6 on weights ~ 0.02."""
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(256, 32, generator=gen) / 6
    b = A @ (8.0 + torch.randn(32, generator=gen))
    x = torch.full((32,), 8.0).to(dtype)
    opt = ZOOptimizer([x], lr=1e-2, q=4, eps=1e-2, seed=9, exact=exact_mode,
                      stochastic_rounding=sr)
    loss = lambda: ((A @ x.float() - b) ** 2).mean()  # noqa: E731
    start = float(loss())
    for _ in range(steps):
        opt.step(loss)
    return start - float(loss())  # the progress


def test_bf16_training_with_stochastic_rounding_keeps_up_with_float32():
    f32 = _least_squares_run(torch.float32, False, False)
    assert f32 > 0.2
    assert _least_squares_run(torch.bfloat16, True, True) > 0.5 * f32  # the default
    assert _least_squares_run(torch.bfloat16, True, False) == 0.0  # RN drops every update
    assert _least_squares_run(torch.bfloat16, False, False) < 0.1 * f32  # and drift on top


def test_extra_memory_is_a_byte_per_parameter_plus_the_table():
    p = (torch.randn(100_000) * 0.02).to(torch.bfloat16)
    opt = ZOOptimizer([p], lr=0.0, q=1, seed=1, exact=True)
    opt.step(lambda: p.float().sum())
    codes = opt._codes[0]
    table = opt._tables[0]
    extra = codes.numel() + table.chunk_base.numel() * 4 + table.bits.numel() * 4
    assert codes.dtype == torch.int8 and codes.numel() < p.numel() + 128
    special = int((p.float().abs() < table.tau).sum())
    assert table.count == special
    padded = -(-p.numel() // 128) * 128
    assert extra == padded + 4 * (padded // 128 + 1) + 4 * special
    assert extra / p.numel() < 1.07  # N(0, 0.02) weights at eps = 1e-3: 0.7% in the table


@pytest.mark.parametrize("backend", exact_backends())
def test_prepared_exact_passes_name_codes_and_counts_that_do_not_fit(backend):
    """Prepared.exact_pass_ checks its arguments' shapes on every backend before a launch:
    codes too short crashed the Triton pass (heap corruption under the interpreter: it wrote
    past them), a code_base above the params' indices or seeds that do not fit the scales
    ran silently on the reference (codes read and written from their end)."""
    ps = [hard_values(300, torch.bfloat16), hard_values(100, torch.bfloat16, seed=1)]
    before = [p.clone() for p in ps]
    plan = zo_opt.functional.Prepared(ps, backend=backend, exact=True)
    table = plan.build_table(exact.tau(1e-3, "gaussian"))
    seeds, scales = torch.tensor([3]), torch.tensor([1.0, 1e-3])
    codes = torch.zeros(512, dtype=torch.int8)
    bad = [(dict(codes=codes[:200]), r"codes cover global indices \[0, 200\); the params' are "
                                     r"\[0, 512\)"),
           (dict(code_base=128), r"codes cover global indices \[128, 640\); the params' are"),
           (dict(code_base=64), "code_base 64 is not a multiple of 128"),
           (dict(codes=codes.int()), "codes must be an int8 tensor, not torch.int32"),
           (dict(scales=torch.tensor([1.0, 1e-3, 1.0])), r"1 seeds and 3 scales do not fit "
                                                         r"n_old=0, rounding=False"),
           (dict(rounding=True), "encode needs round-to-nearest stores"),
           (dict(distribution="uniform"), "Invalid distribution: 'uniform'")]
    for change, message in bad:
        args = dict(seeds=seeds, scales=scales, n_old=0, codes=codes, code_base=0, table=table,
                    encode=True, rounding=False, distribution="gaussian") | change
        with pytest.raises((ValueError, TypeError), match=message):
            plan.exact_pass_(**args)
    small = exact.Table(table.chunk_base[:2], table.bits, table.tau, table.count)
    with pytest.raises(ValueError, match=r"table.chunk_base has 2 entries; the params' chunks "
                       r"need 4"):
        plan.exact_pass_(torch.tensor([3, 4]), torch.tensor([1.0, 1e-3, 1e-3]), 1, codes, 0,
                         small, encode=True, rounding=False, distribution="gaussian")
    assert all(same_bits(p, b) for p, b in zip(ps, before)) and not codes.any()
