"""Instruct (zo_opt.train.instruct): BP-guided ZO directions with a normalised update, on a
least-squares problem small enough to check by hand."""
import math

import pytest
import torch

from zo_opt.train.instruct import Instruct

D = 24


def problem(scale=1.0):
    gen = torch.Generator().manual_seed(0)
    A = torch.randn(32, D, generator=gen, dtype=torch.float64)
    b = torch.randn(32, generator=gen, dtype=torch.float64)
    w = torch.zeros(D, dtype=torch.float64)
    return [w], lambda i: scale * ((A @ w - b) ** 2).mean(), A, b


def bp_gradient(w, A, b, scale=1.0):
    return [scale * 2 * A.T @ (A @ w - b) / len(b)]


def instruct(params, **kw):
    return Instruct(params, **{"lr": 0.01, "q": 3, "eps": 1e-3, "seed": 5, "backend": "torch", **kw})


def test_the_update_does_not_depend_on_the_loss_scale():
    """The module docstring's claim: g and every g_i scale with the loss, the update does not."""
    ends = []
    for k in (1.0, 7.0):
        params, loss, A, b = problem(k)
        ins = instruct(params)
        for t in range(3):
            assert ins.set_gradient(bp_gradient(params[0], A, b, k)) > 0
            ins.step(t, loss, fresh_bp=t == 0)
        ends.append(params[0].clone())
    assert not torch.equal(ends[0], torch.zeros(D, dtype=torch.float64))
    torch.testing.assert_close(ends[1], ends[0], rtol=1e-9, atol=1e-12)


def test_the_update_has_rms_lr_per_coordinate():
    params, loss, A, b = problem()
    ins = instruct(params, lr=0.01)
    ins.set_gradient(bp_gradient(params[0], A, b))
    ins.step(0, loss, fresh_bp=True)
    # |D| is computed from |z_i|^2 ~ d and z_i . gh ~ 0, true up to O(d^-1/2) (0.8% at d = 24)
    assert math.isclose(params[0].pow(2).mean().sqrt().item(), 0.01, rel_tol=0.05)
    # and it leans on the BP direction (cosine 0.9 blended half and half with the ZO estimate)
    g = bp_gradient(torch.zeros(D, dtype=torch.float64), A, b)[0]
    assert torch.nn.functional.cosine_similarity(-g, params[0], dim=0) > 0.5


@pytest.mark.parametrize("name, value", [("q", 0), ("eps", 0.0), ("eps", -1e-3), ("cosine", 1.5),
                                         ("cosine", -0.1), ("bp_weight", 2.0), ("lr", -0.01)])
def test_a_bad_setting_is_refused_by_name_before_any_step(name, value):
    params, *_ = problem()
    with pytest.raises(ValueError, match=f"^{name} "):
        instruct(params, **{name: value})


def test_a_step_on_a_refused_first_gradient_says_why_and_leaves_the_params():
    params, loss, A, b = problem()
    ins = instruct(params)
    assert math.isnan(ins.set_gradient([torch.full((D,), float("nan"), dtype=torch.float64)]))
    with pytest.raises(RuntimeError, match="non-finite or zero.*nan"):
        ins.step(0, loss, fresh_bp=True)
    assert torch.equal(params[0], torch.zeros(D, dtype=torch.float64))


def test_a_refused_later_gradient_does_not_count_as_fresh():
    """A non-finite BP gradient keeps the last gh, which is then no fresher than on any other
    step: the step must not give it the weight of a fresh one."""
    ends = []
    for refused in (True, False):
        params, loss, A, b = problem()
        ins = instruct(params)
        ins.set_gradient(bp_gradient(params[0], A, b))
        ins.step(0, loss, fresh_bp=True)
        if refused:
            ins.set_gradient([torch.full((D,), float("inf"), dtype=torch.float64)])
        ins.step(1, loss, fresh_bp=refused)
        ends.append(params[0].clone())
    assert torch.equal(ends[0], ends[1])
