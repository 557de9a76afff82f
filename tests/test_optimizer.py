"""ZOOptimizer: the update it applies, convergence, the estimator's statistics, resume,
failure handling, memory and input validation."""
import functools
import math
import warnings

import pytest
import torch

import zo_opt
from zo_opt import ZOOptimizer, noise

BACKENDS = [b for b in ("torch", "cpu") if b in zo_opt.available_backends()]


def quadratic(p):
    return lambda: (p**2).sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("estimator", ["central", "forward"])
@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_update_is_minus_lr_mean_g_z_from_the_record(backend, estimator, distribution):
    p = torch.randn(1000)
    before = p.clone()
    opt = ZOOptimizer([p], lr=0.1, q=3, seed=5, estimator=estimator,
                      distribution=distribution, backend=backend)
    opt.step(quadratic(p))
    rec = opt.last_record
    z = [noise.direction([1000], s, distribution)[0] for s in rec.seeds]
    expected = before - 0.1 * sum(g * zi for g, zi in zip(rec.grads, z)) / 3
    torch.testing.assert_close(p, expected, rtol=0, atol=1e-5)
    assert rec.q == 3 and rec.lr == 0.1 and rec.eps == 1e-3 and rec.step == 0
    assert rec.seeds == [noise.direction_seed(5, 0, i) for i in range(3)]


def test_record_replays_through_zo_update_on_another_copy():
    p = torch.randn(3000)
    replica = p.clone()
    opt = ZOOptimizer([p], lr=0.05, q=4, seed=1)
    for _ in range(3):
        opt.step(quadratic(p))
        rec = opt.last_record
        zo_opt.functional.zo_update_([replica], rec.seeds, -rec.lr * rec.grads / rec.q)
    torch.testing.assert_close(replica, p, rtol=0, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS + [b for b in ("triton",) if b in zo_opt.available_backends()])
def test_replaced_storage_between_steps_is_followed(backend):
    """``p.data = ...`` between steps (a checkpoint load, a dtype cast) moves the tensor: the
    next step prepares the list again and updates the new storage, not the old address (the
    Triton backend's tables hold raw addresses; under the interpreter it runs here)."""
    model = torch.nn.Linear(300, 4)
    x = torch.randn(8, 300)
    loss = lambda: model(x).square().mean()  # noqa: E731
    opt = ZOOptimizer(model.parameters(), lr=0.1, q=2, seed=3, backend=backend)
    opt.step(loss)
    old = model.weight.data
    model.weight.data = old.clone()
    kept = old.clone()
    before = model.weight.detach().clone()
    opt.step(loss)
    assert torch.equal(old, kept)  # the old storage was not written
    assert not torch.equal(model.weight, before)  # the new one was


def test_a_param_group_added_between_steps_is_stepped():
    """The step's layout (groups, offsets, prepared lists) is kept while nothing changes; a
    group added between steps changes it, and the next step moves the new params too."""
    a, b = torch.zeros(10), torch.zeros(7)
    loss = lambda: (a - 1).square().sum() + (b - 1).square().sum()  # noqa: E731
    opt = ZOOptimizer([a], lr=0.05, q=2, seed=4)
    opt.step(loss)
    opt.step(loss)
    opt.add_param_group({"params": [b]})
    opt.step(loss)
    assert not torch.equal(b, torch.zeros(7))
    assert opt.last_record is not None and len(opt._step_groups) == 2


def test_prepared_matches_only_the_same_storages():
    params = [torch.zeros(5), torch.empty(0), torch.zeros(3)]
    plan = zo_opt.functional.Prepared(params, backend="torch")
    assert plan.matches(params) and plan.matches(tuple(params))
    assert not plan.matches(params[:2])
    params[2].data = torch.ones(3)  # another storage
    assert not plan.matches(params)
    assert not plan.matches([params[0][:4], *params[1:]])  # same start, another size


def test_central_projected_gradient_is_the_directional_derivative():
    w = torch.randn(500)
    p = torch.randn(500)
    opt = ZOOptimizer([p], lr=0.0, q=5, eps=1e-2, seed=2)
    opt.step(lambda: (w * p).sum())  # linear: the central difference is exact
    for s, g in zip(opt.last_record.seeds, opt.last_record.grads):
        z = noise.direction([500], s)[0]
        assert abs(g.item() - (w * z).sum().item()) < 1e-3 * (1 + abs(g.item()))


def test_zo_sgd_reduces_least_squares_tenfold():
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(64, 16, generator=gen) / 4
    x_true = torch.randn(16, generator=gen)
    b = A @ x_true
    x = torch.zeros(16)
    loss = lambda: ((A @ x - b) ** 2).mean()
    start = loss().item()
    opt = ZOOptimizer([x], lr=0.2, q=4, seed=0)
    for _ in range(400):
        opt.step(loss)
    assert loss().item() < start / 10


def test_zo_trains_a_small_mlp_classifier_above_chance():
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen) * 1.5
    y = torch.randint(0, 4, (512,), generator=gen)
    X = centers[y] + torch.randn(512, 8, generator=gen)  # 4 classes: chance is 25%
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))
    opt = ZOOptimizer(model.parameters(), lr=0.1, q=8, eps=1e-3, seed=3)
    loss_fn = lambda: torch.nn.functional.cross_entropy(model(X), y)
    start = loss_fn().item()
    for _ in range(300):
        opt.step(loss_fn)
    accuracy = (model(X).argmax(1) == y).float().mean().item()
    assert accuracy > 0.85, accuracy
    assert loss_fn().item() < start / 4


@pytest.mark.parametrize("distribution", noise.DISTRIBUTIONS)
def test_estimate_points_along_the_true_gradient(distribution):
    """Over many seeds, mean_i g_i z_i of a linear function has cosine > 0.95 with w."""
    w = torch.randn(20, dtype=torch.float64)
    p = torch.zeros(20)
    opt = ZOOptimizer([p], lr=0.0, q=2000, eps=1e-2, seed=7, distribution=distribution)
    opt.step(lambda: (w * p.double()).sum())
    rec = opt.last_record
    z = torch.stack([noise.direction([20], s, distribution)[0] for s in rec.seeds]).double()
    estimate = (rec.grads.double()[:, None] * z).mean(0)
    cosine = torch.nn.functional.cosine_similarity(estimate, w, dim=0).item()
    assert cosine > 0.95
    assert abs(estimate.norm().item() / w.norm().item() - 1) < 0.15  # unbiased in scale too


def test_closure_with_index_gets_each_query_index_twice():
    p = torch.zeros(10)
    seen = []
    opt = ZOOptimizer([p], q=3, seed=0)
    opt.step(lambda i: seen.append(i) or float(p.sum()))
    assert seen == [0, 0, 1, 1, 2, 2]
    seen.clear()
    ZOOptimizer([p], q=3, seed=0, estimator="forward").step(lambda i: seen.append(i) or 0.0)
    assert seen == [0, 0, 1, 2]


class _Closures:
    def method(self):
        return 0.0

    def indexed_method(self, i):
        return 0.0

    def __call__(self, i):
        return 0.0


def _plain(): return 0.0
def _indexed(i=0): return 0.0
def _keyword_only(*, i=0): return 0.0
def _varargs(*args): return 0.0
def _varkw(**kwargs): return 0.0
def _posonly(i, /): return 0.0


@pytest.mark.parametrize("closure, takes", [
    (_plain, False), (_indexed, True), (_keyword_only, False), (_varargs, True), (_varkw, False),
    (_posonly, True), (lambda: 0.0, False), (lambda i: 0.0, True),
    (torch.no_grad()(_plain), False), (torch.no_grad()(_indexed), True),
    (functools.partial(_indexed, 1), False),
    (_Closures().method, False), (_Closures().indexed_method, True), (_Closures(), True), (print, True),
], ids=lambda c: getattr(c, "__name__", type(c).__name__) if callable(c) else str(c))
def test_takes_index_agrees_with_the_signature(closure, takes):
    """The code-object shortcut answers what inspect.signature does (decorators follow
    __wrapped__, bound methods drop self, callables use __call__). Both are checked against
    the known answer: for anything but a plain function the shortcut is the signature path
    itself, so comparing the two alone could not fail there."""
    from zo_opt.optimizer import _signature_takes_index, _takes_index
    assert _signature_takes_index(closure) is takes
    assert _takes_index(closure) is takes


def test_step_returns_the_mean_of_the_evaluations():
    p = torch.randn(10)
    values = []

    def closure():
        values.append((p**2).sum().item())
        return (p**2).sum()

    loss = ZOOptimizer([p], q=2, seed=0).step(closure)
    assert len(values) == 4 and math.isclose(loss.item(), sum(values) / 4, rel_tol=1e-6)


def test_param_groups_weight_decay_and_scheduler():
    a, b = torch.ones(100), torch.ones(100)
    opt = ZOOptimizer([{"params": [a], "lr": 0.0, "weight_decay": 0.0},
                       {"params": [b], "lr": 0.5, "weight_decay": 0.1}], q=1, seed=0)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    opt.step(lambda: 0.0)  # constant loss: g = 0, only the decay acts
    torch.testing.assert_close(a, torch.ones(100), rtol=0, atol=1e-6)
    torch.testing.assert_close(b, torch.full((100,), 1 - 0.5 * 0.1), rtol=0, atol=1e-6)
    sched.step()
    assert opt.param_groups[1]["lr"] == 0.25
    assert opt.last_record.group_lrs == (0.0, 0.5)


def test_momentum_matches_sgd_with_momentum_on_the_estimates():
    p = torch.randn(200)
    ref = p.clone()
    buf = torch.zeros(200)
    opt = ZOOptimizer([p], lr=0.1, q=2, momentum=0.9, weight_decay=0.01, seed=4)
    for _ in range(3):
        opt.step(quadratic(p))
        rec = opt.last_record
        z = [noise.direction([200], s)[0] for s in rec.seeds]
        ghat = sum(g * zi for g, zi in zip(rec.grads, z)) / rec.q
        buf = 0.9 * buf + ghat + 0.01 * ref
        ref = ref - 0.1 * buf
    torch.testing.assert_close(p, ref, rtol=0, atol=1e-4)
    assert "momentum_buffer" in opt.state[p]


def train(p, opt, steps):
    for _ in range(steps):
        opt.step(lambda: ((p - 1) ** 2).sum())


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_resume_is_bit_identical(tmp_path, momentum):
    init = torch.randn(500)
    p = init.clone()
    train(p, ZOOptimizer([p], lr=1e-3, q=2, momentum=momentum), 0)  # seedless construction works
    p = init.clone()
    train(p, ZOOptimizer([p], lr=1e-3, q=2, seed=11, momentum=momentum), 6)

    q = init.clone()
    first = ZOOptimizer([q], lr=1e-3, q=2, seed=11, momentum=momentum)
    train(q, first, 3)
    torch.save({"p": q, "opt": first.state_dict()}, tmp_path / "ckpt.pt")
    ckpt = torch.load(tmp_path / "ckpt.pt")
    r = ckpt["p"].clone()
    second = ZOOptimizer([r], lr=1e-3, q=2, momentum=momentum)  # a different drawn seed
    second.load_state_dict(ckpt["opt"])
    train(r, second, 3)
    assert torch.isfinite(p).all() and not torch.equal(p, init)
    assert torch.equal(r, p)
    assert second.step_count == 6


@pytest.mark.parametrize("backend", BACKENDS)
def test_rewinding_the_same_optimizer_replays_its_steps(backend):
    """A step uploads the next step's seeds ahead; a load_state_dict that moves the step
    count (or brings another base seed) must not run on those."""
    p = torch.randn(300)
    opt = ZOOptimizer([p], lr=1e-2, q=2, seed=4, backend=backend)
    train(p, opt, 2)
    at_2 = (p.clone(), opt.state_dict())
    train(p, opt, 2)
    after = p.clone()
    p.copy_(at_2[0])
    opt.load_state_dict(at_2[1])
    train(p, opt, 2)
    assert torch.equal(p, after) and not torch.equal(p, at_2[0])

    other = ZOOptimizer([torch.zeros(300)], lr=1e-2, q=2, seed=5)
    p.copy_(at_2[0])
    opt.load_state_dict(other.state_dict())  # base seed 5, step 0
    train(p, opt, 1)
    assert opt.last_record.seeds == [noise.direction_seed(5, 0, i) for i in range(2)]
    replay = at_2[0].clone()
    zo_opt.functional.zo_update_([replay], opt.last_record.seeds,
                                 -1e-2 * opt.last_record.grads / 2, backend=backend)
    torch.testing.assert_close(p, replay, rtol=0, atol=1e-5)


def test_unseeded_optimizers_draw_distinct_seeds():
    p = torch.zeros(1)
    assert ZOOptimizer([p]).base_seed != ZOOptimizer([p]).base_seed


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fail_at", [0, 1, 2, 3])
def test_closure_exception_restores_parameters(backend, fail_at):
    p = torch.randn(300)
    before = p.clone()
    calls = []

    def closure():
        calls.append((p - before).abs().max().item())  # how far p is displaced at this call
        if len(calls) > fail_at:
            raise RuntimeError("boom")
        return (p**2).sum()

    with pytest.raises(RuntimeError, match="boom"):
        ZOOptimizer([p], q=2, eps=1e-2, seed=0, backend=backend).step(closure)
    assert len(calls) == fail_at + 1 and calls[-1] > 1e-3  # it failed with p displaced
    torch.testing.assert_close(p, before, rtol=0, atol=1e-6)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_loss_skips_with_warning_and_restores(bad):
    p = torch.randn(300)
    before = p.clone()
    calls = []
    opt = ZOOptimizer([p], q=2, eps=1e-2, seed=0, momentum=0.0)

    def closure():
        calls.append(1)
        return bad if len(calls) == 3 else (p**2).sum()

    with pytest.warns(RuntimeWarning, match="non-finite"):
        opt.step(closure)
    torch.testing.assert_close(p, before, rtol=0, atol=1e-6)
    assert opt.step_count == 1  # the next step draws fresh directions


def test_nonfinite_warning_points_at_the_caller_of_step():
    p = torch.randn(30)
    opt = ZOOptimizer([p], q=1, seed=0)
    with pytest.warns(RuntimeWarning, match="step 0: non-finite") as caught:
        opt.step(lambda: float("nan"))
    assert [w.filename for w in caught] == [__file__]


def test_deferred_warnings_wait_for_their_flag_and_keep_step_order():
    from zo_opt.nonfinite import DeferredWarnings

    class Event:  # a CUDA event that has not completed yet
        done = False

        def query(self):
            return self.done

    pending, event = DeferredWarnings(), Event()
    pending._pending.append((7, torch.tensor(False), torch.tensor([float("nan"), 1.0]), event))
    pending.add(8, torch.tensor(True), torch.tensor([1.0, 2.0]))
    pending.add(9, torch.tensor(False), torch.tensor([float("inf"), 1.0]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        pending.warn_arrived()  # step 7's flag is not on the host: nothing, and no wait
        assert caught == []
        event.done = True
        pending.warn_arrived()
        pending.warn_arrived()  # each step warns once
    assert [str(w.message).split(":")[0] for w in caught] == ["ZOOptimizer step 7", "ZOOptimizer step 9"]


@pytest.mark.gpu
def test_gpu_skip_step_does_not_wait_and_warns_by_the_next_step():
    """nonfinite="skip" on a GPU: the step makes no host sync (sync debug mode would raise);
    its warning comes once the flag is on the host, at the latest from the next step."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    p = torch.randn(1000, device="cuda")
    opt = ZOOptimizer([p], q=2, seed=0)
    good = lambda: (p ** 2).sum()  # noqa: E731
    opt.step(good)
    opt.step(good)  # warm: tables and constants uploaded
    before = p.clone()
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("error")
        try:
            opt.step(lambda: (p ** 2).sum() * float("nan"))
        finally:
            torch.cuda.set_sync_debug_mode("default")
        torch.cuda.synchronize()
        torch.testing.assert_close(p, before, rtol=0, atol=1e-6)
        opt.step(good)
    ours = [str(w.message).split(":")[0] for w in caught if w.category is RuntimeWarning]
    assert ours == ["ZOOptimizer step 2"]  # (torch warns that the sync debug mode is a prototype)
    assert not torch.equal(p, before)


def test_nonfinite_skip_silent_restores_without_warning():
    p = torch.randn(300)
    before = p.clone()
    opt = ZOOptimizer([p], q=2, seed=0, nonfinite="skip_silent")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step(lambda: float("inf"))
    torch.testing.assert_close(p, before, rtol=0, atol=1e-6)
    assert not opt.last_record.finite
    opt.step(lambda: (p**2).sum())
    assert opt.last_record.finite and not torch.equal(p, before)


def test_nonfinite_raise_restores_then_raises():
    p = torch.randn(300)
    before = p.clone()
    opt = ZOOptimizer([p], q=1, seed=0, nonfinite="raise", momentum=0.5)
    with pytest.raises(FloatingPointError, match="non-finite"):
        opt.step(lambda: float("nan"))
    torch.testing.assert_close(p, before, rtol=0, atol=1e-6)
    assert torch.equal(opt.state[p]["momentum_buffer"], torch.zeros(300))


@pytest.mark.skipif("cpu" not in zo_opt.available_backends(), reason="the cpu backend is not built")
def test_a_step_allocates_nothing_parameter_sized():
    params = [torch.randn(1 << 20) for _ in range(4)]  # 4 MiB each
    opt = ZOOptimizer(params, lr=1e-3, q=4, seed=0, backend="cpu")
    closure = lambda: params[0][:10].sum()
    opt.step(closure)  # warm up (lazy init)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        opt.step(closure)
    sizes = [e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0]
    assert sizes, "the profiler saw no allocation at all: the measurement is broken"
    assert max(sizes) < params[0].numel() * 4 // 100  # < 1% of one parameter's bytes


def test_the_memory_probe_sees_parameter_sized_allocations():
    """The probe above would catch a clone: check it on one."""
    p = torch.randn(1 << 20)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU],
                                profile_memory=True) as prof:
        p.clone()
    assert max(e.cpu_memory_usage for e in prof.events()) >= p.numel() * 4


def test_step_without_closure_is_a_clear_error():
    with pytest.raises(TypeError, match="closure"):
        ZOOptimizer([torch.zeros(2)]).step()


@pytest.mark.parametrize("kwargs, match", [
    (dict(q=0), "q"), (dict(q=2.5), "q"), (dict(eps=0.0), "eps"), (dict(eps=-1.0), "eps"),
    (dict(lr=-1.0), "lr"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(momentum=-0.5), "momentum"), (dict(distribution="cauchy"), "distribution"),
    (dict(estimator="backward"), "estimator"), (dict(backend="tpu"), "backend"),
    (dict(nonfinite="ignore"), "nonfinite"), (dict(seed=-3), "seed"),
    (dict(eps=float("inf")), "eps"), (dict(eps=None), "eps"), (dict(eps="1e-3"), "eps"),
    (dict(lr=None), "lr"), (dict(lr=float("inf")), "lr"),
])
def test_bad_arguments_are_named(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ZOOptimizer([torch.zeros(2)], **kwargs)


def test_bad_params_are_named(monkeypatch):
    with pytest.raises(TypeError, match="floating point"):
        ZOOptimizer([torch.zeros(2, dtype=torch.int32)])
    with pytest.raises(TypeError, match="sparse"):
        ZOOptimizer([torch.zeros(2).to_sparse()])
    unavailable = next(iter(zo_opt.unavailable_backends()), None)
    if unavailable is None:  # a machine with every backend (a StopIteration here, before)
        unavailable = "cuda"
        monkeypatch.setattr(zo_opt.backends.BACKENDS["cuda"], "unavailable_reason",
                            lambda: "made unavailable by this test")
    with pytest.raises(ValueError, match=f"backend '{unavailable}' is not available"):
        ZOOptimizer([torch.zeros(2)], backend=unavailable)


def test_params_on_several_devices_in_one_group_are_rejected():
    meta = torch.zeros(2, device="meta")
    with pytest.raises(ValueError, match="several devices"):
        ZOOptimizer([torch.zeros(2), meta])


def test_closure_must_return_a_scalar_loss():
    opt = ZOOptimizer([torch.zeros(2)], seed=0)
    with pytest.raises(ValueError, match="scalar"):
        opt.step(lambda: torch.zeros(3))
    with pytest.raises(TypeError, match="loss"):
        opt.step(lambda: None)


def test_load_state_dict_from_another_optimizer_is_rejected():
    p = torch.zeros(2)
    sgd = torch.optim.SGD([p], lr=0.1)
    with pytest.raises(ValueError, match="ZOOptimizer"):
        ZOOptimizer([p]).load_state_dict(sgd.state_dict())


def test_a_refused_param_group_is_not_kept():
    """add_param_group raises on a bad group and leaves the optimizer as it was: the group
    must not stay behind for the next step to run (here with a negative lr)."""
    a, b = torch.zeros(10), torch.zeros(10)
    opt = ZOOptimizer([a], lr=0.1, q=2, seed=0)
    with pytest.raises(ValueError, match="lr"):
        opt.add_param_group({"params": [b], "lr": -1.0})
    with pytest.raises(ValueError, match="not contiguous"):
        opt.add_param_group({"params": [torch.zeros(4, 4).t()]})
    assert len(opt.param_groups) == 1
    opt.step(lambda: (a - 1).square().sum() + (b - 1).square().sum())
    assert torch.equal(b, torch.zeros(10))


def test_params_sharing_memory_are_rejected():
    """A tensor listed twice (torch.optim only warns within a group) or two overlapping views
    would be moved twice a pass: z is then the sum of two directions, a replay on the model
    moves it once, and exact mode no longer restores it. Views that do not overlap are fine."""
    p = torch.randn(300)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch's duplicate warning
        with pytest.raises(ValueError, match="param 1 of group 0 shares memory with param 0"):
            ZOOptimizer([p, p])
    base = torch.randn(256)
    with pytest.raises(ValueError, match="shares memory"):
        ZOOptimizer([base[:200], base[100:]])
    opt = ZOOptimizer([base[:128]], seed=0)
    with pytest.raises(ValueError, match="param 0 of group 1 shares memory"):
        opt.add_param_group({"params": [base[64:192]]})
    opt.add_param_group({"params": [base[128:]]})
    opt.step(lambda: base.square().sum())


def test_exact_and_rounding_refuse_params_they_cannot_store():
    """The exact pass and the stochastically rounded store take float32/float16/bfloat16: a
    float64 param among them is named at construction (it failed mid-step, with the 16-bit
    params already displaced). A float64 group of its own is fine with stochastic rounding."""
    d, h = torch.randn(300, dtype=torch.float64), torch.randn(300).bfloat16()
    with pytest.raises(ValueError, match=r"param 1 of group 0 is torch.float64.*exact=False"):
        ZOOptimizer([h, d], seed=0)
    with pytest.raises(ValueError, match=r"param 0 of group 0 is torch.float64.*exact=False"):
        ZOOptimizer([d], seed=0, exact=True)
    with pytest.raises(ValueError, match="stochastic_rounding=False"):
        ZOOptimizer([h, d], seed=0, exact=False)
    opt = ZOOptimizer([{"params": [h]}, {"params": [d]}], lr=1e-3, seed=0, exact=False)
    with pytest.raises(ValueError, match="param 0 of group 1 is torch.float64"):
        ZOOptimizer([h], seed=0).add_param_group({"params": [torch.zeros(3, dtype=torch.float64)]})
    h0 = h.clone()
    opt.step(lambda: d.square().sum() + h.float().square().sum())
    assert opt.stochastic_rounding and not torch.equal(h, h0)


def test_stochastic_rounding_is_not_claimed_for_momentum():
    """The momentum step stores theta - lr * buf round-to-nearest: the default leaves
    stochastic rounding off there (and the record says so), and asking for it is an error."""
    p = torch.randn(300).bfloat16()
    opt = ZOOptimizer([p], lr=1e-3, q=1, seed=0, momentum=0.9)
    opt.step(lambda: p.float().square().sum())
    assert not opt.stochastic_rounding and opt.last_record.rounding_seed is None
    with pytest.raises(ValueError, match="momentum"):
        ZOOptimizer([p], momentum=0.9, stochastic_rounding=True)
    opt = ZOOptimizer([p], lr=1e-3, seed=0)
    with pytest.raises(ValueError, match="momentum"):
        opt.add_param_group({"params": [torch.zeros(3, dtype=torch.float16)], "momentum": 0.5})
    ZOOptimizer([p, torch.zeros(3)], seed=0).add_param_group({"params": [torch.zeros(3)],
                                                             "momentum": 0.5})  # float32: fine


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_deep_copy_steps_like_the_original(dtype):
    """copy.deepcopy of a model and its optimizer (torch.optim's __getstate__ keeps only the
    groups and state, which lost q, the seed and the step) continues identically."""
    import copy

    p = torch.randn(300).to(dtype)
    opt = ZOOptimizer([p], lr=1e-2, q=2, seed=7, momentum=0.0)
    loss = lambda t: (lambda: t.float().square().sum())  # noqa: E731
    opt.step(loss(p))
    p2, opt2 = copy.deepcopy((p, opt))
    opt.step(loss(p))
    opt2.step(loss(p2))
    assert torch.equal(p, p2) and opt2.step_count == 2 and opt2.param_groups[0]["params"][0] is p2


def test_closure_may_return_a_numpy_scalar():
    np = pytest.importorskip("numpy")
    p = torch.zeros(3)
    assert ZOOptimizer([p], seed=0).step(lambda: np.float32(1.5)).item() == 1.5


def test_frozen_params_beside_trained_ones_are_refused():
    """A model with frozen layers (requires_grad=False) passed whole: torch's optimizers skip
    those params, having no gradient for them, but a ZO pass would move them. The error names
    the param and the filter; plain tensors (none require grad) and filtered lists are fine."""
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Linear(4, 1))
    model[0].weight.requires_grad_(False)
    with pytest.raises(ValueError, match=r"param 0 of group 0 has requires_grad=False.*p.requires_grad"):
        ZOOptimizer(model.parameters())
    opt = ZOOptimizer([p for p in model.parameters() if p.requires_grad], seed=0)
    with pytest.raises(ValueError, match="param 0 of group 1 has requires_grad=False"):
        opt.add_param_group({"params": [model[0].weight]})
    assert len(opt.param_groups) == 1
    ZOOptimizer([torch.zeros(3), torch.zeros(5)])  # plain tensors: none require grad


def test_loading_a_state_saved_with_other_settings_says_so():
    """The saved q, eps, distribution and estimator do not override the optimizer's own (a
    new q for the rest of a run may be meant), but a mismatch is said: the run then differs
    from the one that saved it. Matching settings load quietly."""
    p = torch.zeros(10)
    saved = ZOOptimizer([p], q=4, seed=1).state_dict()
    with pytest.warns(UserWarning, match=r"saved with q=4; this optimizer keeps its own q=2"):
        ZOOptimizer([p], q=2).load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = ZOOptimizer([p], q=4)
        opt.load_state_dict(saved)
    assert opt.base_seed == 1


def test_a_complex_loss_is_refused():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="complex64 loss; it must be real"):
        ZOOptimizer([p], seed=0).step(lambda: torch.tensor(1 + 2j, dtype=torch.complex64))
    assert torch.equal(p, torch.zeros(3))  # a refused loss leaves the params where they were
