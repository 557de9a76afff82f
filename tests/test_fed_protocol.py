"""Federated ZO protocol (zo_opt.fed.protocol), without Flower: seed derivation, wire encoding,
validation of client replies (each malformation rejected with its reason), aggregation equal
to FedAvg of the local models, and bit-identical catch-up from records (sgd and Adam)."""
import math

import pytest
import torch

from zo_opt import ZOOptimizer
from zo_opt.fed import protocol
from zo_opt.fed.protocol import RoundSpec, TrainReply, validate_reply

BASE, STEPS, Q, LR, EPS = 1234, 3, 2, 0.05, 1e-3


def spec(round_=2, **kw):
    args = dict(round=round_, base_seed=BASE, num_clients=2, steps=STEPS, q=Q, lr=LR, eps=EPS,
                distribution="gaussian")
    args.update(kw)
    return RoundSpec(**args)


def good_reply(round_=2, client=1):
    seeds = protocol.expected_seeds(BASE, round_, client, STEPS, Q)
    return TrainReply(round=round_, client_id=client, steps=STEPS, q=Q, lr=LR, eps=EPS, distribution="gaussian",
                      seeds=seeds, grads=torch.linspace(-1, 1, STEPS * Q), train_loss=1.5)


def test_round_seeds_are_a_function_of_base_round_and_client():
    s = protocol.client_seed(BASE, 3, 1)
    assert s == protocol.client_seed(BASE, 3, 1)
    others = {protocol.client_seed(BASE, r, c) for r in range(1, 20) for c in range(8)}
    assert len(others) == 19 * 8  # no collisions across rounds and clients
    assert protocol.client_seed(BASE + 1, 3, 1) != s
    # A ZOOptimizer seeded with the round seed uses exactly the seeds the server derives.
    w = torch.zeros(10)
    opt = ZOOptimizer([w], lr=LR, q=Q, eps=EPS, seed=s)
    seen = []
    for _ in range(STEPS):
        opt.step(lambda: (w - 1).square().sum())
        seen += opt.last_record.seeds
    assert seen == protocol.expected_seeds(BASE, 3, 1, STEPS, Q)


def test_reply_round_trips_through_the_wire_form():
    r = good_reply()
    cfg = r.to_config()
    assert len(cfg["seeds"]) == 8 * STEPS * Q and len(cfg["grads"]) == 4 * STEPS * Q
    back = TrainReply.from_config(cfg)
    assert back.seeds == r.seeds and torch.equal(back.grads, r.grads) and back.round == r.round
    assert back.seeds[0] >= 0 and max(back.seeds) < 2**64  # unsigned 64-bit survives
    assert validate_reply(back, spec()) is None


@pytest.mark.parametrize("field,value,reason", [
    ("seeds", b"\0" * 7, "multiple of 8"),
    ("grads", b"\0" * 5, "multiple of 4"),
    ("round", "2", "type str"),
    ("client-id", True, "type bool"),
    ("seeds", [1, 2], "type list"),
    ("train-loss", [1.0], "type list"),  # was a TypeError, which the server does not catch: it died
    ("train-loss", "1.5", "type str"),
])
def test_malformed_wire_fields_raise_with_the_reason(field, value, reason):
    cfg = good_reply().to_config()
    cfg[field] = value
    with pytest.raises(ValueError, match=reason):
        TrainReply.from_config(cfg)


def test_missing_field():
    cfg = good_reply().to_config()
    del cfg["grads"]
    with pytest.raises(ValueError, match="missing field 'grads'"):
        TrainReply.from_config(cfg)


def _bad(kind):
    r = good_reply()
    if kind == "stale":
        r.round = 1
    elif kind == "future":
        r.round = 3
    elif kind == "client":
        r.client_id = 2
    elif kind == "steps":
        r.steps = STEPS + 1
    elif kind == "short-seeds":
        r.seeds = r.seeds[:-1]
    elif kind == "short-grads":
        r.grads = r.grads[:-1]
    elif kind == "nan":
        r.grads[3] = math.nan
    elif kind == "inf":
        r.grads[0] = math.inf
    elif kind == "lr":
        r.lr = 2 * LR
    elif kind == "eps":
        r.eps = 2 * EPS
    elif kind == "distribution":
        r.distribution = "rademacher"
    elif kind == "seed":
        r.seeds[-1] ^= 1
    elif kind == "other-client-seeds":  # a valid derivation, but for another client
        r.seeds = protocol.expected_seeds(BASE, 2, 0, STEPS, Q)
    elif kind == "last-round-seeds":
        r.seeds = protocol.expected_seeds(BASE, 1, 1, STEPS, Q)
    return r


@pytest.mark.parametrize("kind,reason", [
    ("stale", "stale round: reply for round 1, current round is 2"),
    ("future", "future round"),
    ("client", "client id 2 outside [0, 2)"),
    ("steps", "shape: 4 steps"),
    ("short-seeds", "wrong length: 5 seeds, expected 6"),
    ("short-grads", "wrong length: 5 projected gradients, expected 6"),
    ("nan", "non-finite projected gradients at [3]"),
    ("inf", "non-finite projected gradients at [0]"),
    ("lr", "lr 0.1 differs"),
    ("eps", "eps 0.002 differs"),
    ("distribution", "distribution 'rademacher' differs"),
    ("seed", "seed 5 (step 2, direction 1) does not match the derivation for round 2, client 1"),
    ("other-client-seeds", "seed 0 (step 0, direction 0) does not match"),
    ("last-round-seeds", "seed 0 (step 0, direction 0) does not match"),
])
def test_each_malformed_reply_is_rejected_with_its_reason(kind, reason):
    got = validate_reply(_bad(kind), spec())
    assert got is not None and reason in got, got


@pytest.mark.parametrize("kind", sorted(protocol.FAULTS))
def test_each_injected_fault_is_refused_by_the_server(kind):
    """The faults ``run.py --fault`` injects must each be caught, or a loopback run that names
    one shows nothing."""
    wire = good_reply().to_config()
    protocol.FAULTS[kind](wire, 2)
    try:
        reason = validate_reply(TrainReply.from_config(wire), spec())
    except ValueError as e:  # refused already in decoding the wire form
        reason = str(e)
    assert reason is not None
    # and for the fault's own reason, not another check's
    why = {"nan": "non-finite projected gradients at [0]", "stale": "stale round",
           "seeds": "does not match the derivation", "short": "wrong length: 5 projected gradients"}
    assert set(why) == set(protocol.FAULTS) and why[kind] in reason, reason


def test_duplicates_and_bounds():
    assert validate_reply(good_reply(), spec(), seen={1}) == "client id 1 already replied in round 2"
    assert validate_reply(good_reply(), spec(), seen={0}) is None
    assert "above max-abs-grad" in validate_reply(good_reply(), spec(max_abs_grad=0.5))
    assert validate_reply(good_reply(), spec(max_abs_grad=1.0)) is None


def test_a_node_keeps_the_client_id_it_was_accepted_with():
    """A node's first refused reply (a client id out of range) pins nothing: its next, valid
    one is accepted; once accepted, the node may not change its id."""
    claimed, seen = {}, set()
    wrong = good_reply()
    wrong.client_id = 2
    assert "outside [0, 2)" in protocol.judge_reply(wrong, 7, claimed, spec(), seen)
    assert claimed == {} and seen == set()
    assert protocol.judge_reply(good_reply(), 7, claimed, spec(), seen) is None
    assert claimed == {7: 1} and seen == {1}
    assert protocol.judge_reply(good_reply(client=0), 7, claimed, spec(), set()) == (
        "node claimed client id 1 before, now 0")


def params0():
    g = torch.Generator().manual_seed(0)
    return [torch.randn(7, 5, generator=g), torch.randn(300, generator=g), torch.randn(3, generator=g)]


def loss_fn(params, shift):
    return sum(((p - shift) ** 2).mean() for p in params)


def local(params, round_, client, steps=STEPS, q=Q, lr=LR):
    """A client's local ZO-SGD from ``params`` (a copy), as zo_opt.fed.task.local_train does."""
    ps = [p.clone() for p in params]
    opt = ZOOptimizer(ps, lr=lr, q=q, eps=EPS, seed=protocol.client_seed(BASE, round_, client))
    seeds, grads = [], []
    for _ in range(steps):
        opt.step(lambda: loss_fn(ps, 0.3 * (client + 1)))
        seeds += opt.last_record.seeds
        grads.append(opt.last_record.grads)
    return ps, TrainReply(round_, client, steps, q, lr, EPS, "gaussian", seeds, torch.cat(grads))


def test_replay_is_fedavg_of_the_local_models():
    theta = params0()
    locals_, replies = zip(*(local(theta, 1, c) for c in range(2)))
    for reply in replies:
        assert validate_reply(reply, spec(round_=1)) is None
    update = protocol.aggregate(1, list(replies))
    assert len(update.seeds) == 2 * STEPS * Q and update.clients == [0, 1]
    server = [p.clone() for p in theta]
    protocol.apply_round(server, update, protocol.ServerOpt(), {})
    for s, a, b, p0 in zip(server, *locals_, theta):
        assert not torch.equal(s, p0)
        torch.testing.assert_close(s, (a + b) / 2, rtol=0, atol=1e-6)
    # One client alone: the replay rebuilds its local model (up to float rounding).
    solo = [p.clone() for p in theta]
    protocol.apply_round(solo, protocol.aggregate(1, [replies[1]]), protocol.ServerOpt(), {})
    for s, b in zip(solo, locals_[1]):
        torch.testing.assert_close(s, b, rtol=0, atol=1e-6)


def test_empty_round_changes_nothing():
    theta = params0()
    before = protocol.params_hash(theta)
    protocol.apply_round(theta, protocol.aggregate(1, []), protocol.ServerOpt(), {})
    assert protocol.params_hash(theta) == before


@pytest.mark.parametrize("opt", [protocol.ServerOpt(), protocol.ServerOpt(lr=0.5),
                                 protocol.ServerOpt("adam", lr=1e-2)], ids=["sgd", "sgd-lr", "adam"])
def test_catch_up_from_records_is_bit_identical(opt):
    theta0 = params0()
    server = [p.clone() for p in theta0]
    state = protocol.new_opt_state(server, opt)
    history = protocol.History(protocol.params_hash(server))
    for r in range(1, 5):
        replies = [local(server, r, c)[1] for c in range(2) if not (r == 3 and c == 1)]  # a round with one
        update = protocol.aggregate(r, replies)
        protocol.apply_round(server, update, opt, state)
        history.append(update, protocol.params_hash(server))
    assert opt.name != "adam" or state["t"] == 4
    # every round moved the global model: a catch-up that stands still would match otherwise
    assert len(set(history.hashes)) == len(history.hashes)

    def catch_up(params, st, start):
        cfg = protocol.catchup_to_config(history.since(start))  # through the wire form
        for u in protocol.catchup_from_config(cfg):
            protocol.apply_round(params, u, opt, st)
        return params

    fresh = catch_up([p.clone() for p in theta0], protocol.new_opt_state(theta0, opt), 0)
    assert all(torch.equal(a, b) for a, b in zip(fresh, server))
    assert protocol.params_hash(fresh) == history.hashes[-1]
    # A client that synced to version 2 earlier and catches up from there.
    mid = [p.clone() for p in theta0]
    mid_state = protocol.new_opt_state(mid, opt)
    for u in history.since(0)[:2]:
        protocol.apply_round(mid, u, opt, mid_state)
    assert protocol.params_hash(mid) == history.hashes[2]
    catch_up(mid, mid_state, 2)
    assert all(torch.equal(a, b) for a, b in zip(mid, server))


def test_server_optimizers_apply_what_they_name():
    """sgd with a server lr moves theta by lr times the FedAvg delta; adam is torch's Adam
    (betas, eps = tau, bias corrections) stepping along that delta (its gradient is -delta).
    The catch-up test compares apply_round with itself: this checks what it computes."""
    theta0 = params0()
    updates = []
    server = [p.clone() for p in theta0]
    for r in range(1, 4):
        updates.append(protocol.aggregate(r, [local(server, r, c)[1] for c in range(2)]))
        protocol.apply_round(server, updates[-1], protocol.ServerOpt(), {})

    def delta(update):
        d = [torch.zeros_like(p) for p in theta0]
        protocol.apply_round(d, update, protocol.ServerOpt(), {})
        return d

    half = [p.clone() for p in theta0]
    protocol.apply_round(half, updates[0], protocol.ServerOpt(lr=0.5), {})
    for h, p0, d in zip(half, theta0, delta(updates[0])):
        assert d.abs().max() > 0
        torch.testing.assert_close(h, p0 + 0.5 * d, rtol=0, atol=1e-6)

    opt = protocol.ServerOpt("adam", lr=1e-2)
    ours = [p.clone() for p in theta0]
    state = protocol.new_opt_state(ours, opt)
    ref = [p.clone() for p in theta0]
    adam = torch.optim.Adam(ref, lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.tau)
    for u in updates:
        protocol.apply_round(ours, u, opt, state)
        for p, d in zip(ref, delta(u)):
            p.grad = -d
        adam.step()
        for a, b in zip(ours, ref):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
    assert all(not torch.equal(a, p0) for a, p0 in zip(ours, theta0))


def test_history_and_wire_errors():
    h = protocol.History("h0")
    with pytest.raises(ValueError, match="version 2 after version 0"):
        h.append(protocol.RoundUpdate(2, [], torch.zeros(0)), "h")
    with pytest.raises(ValueError, match="outside"):
        h.since(1)
    with pytest.raises(ValueError, match="2 seeds, 1 coeffs"):
        protocol.RoundUpdate.from_config(1, protocol.seeds_to_bytes([1, 2]), protocol.floats_to_bytes([0.5]))
    with pytest.raises(ValueError, match="different lengths"):
        protocol.catchup_from_config({"catchup-versions": [1], "catchup-seeds": [], "catchup-coeffs": []})
    with pytest.raises(ValueError, match="Invalid server optimizer"):
        protocol.ServerOpt("lion")
    assert protocol.params_hash([torch.zeros(2)]) != protocol.params_hash([torch.zeros(2, dtype=torch.float64)])


def test_run_config_round_trip_and_app_pyproject():
    from zo_opt.fed.app import pyproject_toml, run_config
    from zo_opt.fed.task import FedConfig

    cfg = FedConfig.from_run_config(run_config(rounds=5, lr=0.01, model_path="/x", server_opt="adam"))
    assert (cfg.rounds, cfg.lr, cfg.model_path, cfg.server_opt) == (5, 0.01, "/x", "adam")
    with pytest.raises(ValueError, match="unknown federated settings"):
        run_config(round=3)
    text = pyproject_toml(rounds=2, out_dir='/tmp/a "b"')
    flwr_config = pytest.importorskip("flwr.common.config", reason="flwr not installed (pip install zo-opt[fed])")
    import tomllib

    conf = tomllib.loads(text)
    assert conf["tool"]["flwr"]["app"]["config"]["out-dir"] == '/tmp/a "b"'
    ok, errors, _ = flwr_config.validate_config(conf, check_module=True)
    assert ok, errors


@pytest.mark.parametrize("fault", ["1:2", "0:1:nun", "2:1:nan", "0:9:nan", "a:1:nan"])
def test_a_bad_fault_flag_is_a_one_line_error_before_anything_starts(fault, capsys, monkeypatch):
    """``--fault 1:2`` crashed (unpacking); an unknown kind, client or round did nothing, silently."""
    from zo_opt.fed import run as fedrun

    monkeypatch.setattr(fedrun, "run", lambda *a, **k: pytest.fail("started a federated run"))
    with pytest.raises(SystemExit) as e:
        fedrun.main(["--rounds", "3", "--num-clients", "2", "--fault", fault])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and "--fault" in err[-1] and repr(fault) in err[-1]


@pytest.mark.parametrize("argv, flag", [(["--distribution", "normal"], "--distribution"), (["--q", "0"], "--q"),
                                        (["--server-opt", "lion"], "--server-opt"), (["--lr", "-1"], "--lr"),
                                        (["--model-size", "7B"], "--model-size"), (["--rounds", "0"], "--rounds")])
def test_a_bad_setting_is_a_one_line_error_before_anything_starts(argv, flag, capsys, monkeypatch):
    """A bad value failed in every client (each round's replies all rejected, nothing trained,
    exit code 0) or killed the server, after the processes had started."""
    from zo_opt.fed import run as fedrun

    monkeypatch.setattr(fedrun, "run", lambda *a, **k: pytest.fail("started a federated run"))
    with pytest.raises(SystemExit) as e:
        fedrun.main(argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and f"argument {flag} " in err[-1], err
