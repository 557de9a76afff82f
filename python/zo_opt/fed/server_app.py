"""The Flower ServerApp: rounds of record exchange, validation, replay, catch-up.

Per round ``r``: every node gets the round number, the records it lacks to reach the global
model of version ``r - 1`` (``catchup-*``: seeds and float32 coefficients of the missing
rounds, never weights) and that model's sha256; the replies' records are validated
(``protocol.validate_reply``: a rejected reply is logged with its reason and the round goes
on), averaged and applied with one ``zo_update_`` pass (``protocol.apply_round``). After the
last round an ``evaluate`` message brings every node to the final version and collects the
hash of its weights and its validation loss.

With ``out-dir`` set the server writes ``global.pt`` (the final parameters by name),
``records.pt`` (the applied updates of every round) and ``summary.json`` (per round:
accepted/rejected with reasons, bytes each way, what FedAvg would have sent; the clients'
final hashes).
"""
from __future__ import annotations

import json
import time
from logging import INFO, WARNING
from pathlib import Path

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, RecordDict
from flwr.common.logger import log
from flwr.common.serde import recorddict_to_proto
from flwr.serverapp import Grid, ServerApp

from . import protocol, task

app = ServerApp()


def wire_bytes(content: RecordDict) -> int:
    """Serialized size of a message's content (its protobuf form)."""
    return recorddict_to_proto(content).ByteSize()


def fedavg_bytes(model) -> int:
    """What FedAvg sends one way per client: the trained weights as an ArrayRecord (each
    parameter once; a plain ``state_dict`` would send GPT-2's tied embedding twice)."""
    sd = {k: v.detach().cpu() for k, v in model.named_parameters()}
    return wire_bytes(RecordDict({"arrays": ArrayRecord(torch_state_dict=sd)}))


def _wait_for_nodes(grid: Grid, n: int, timeout: float) -> list[int]:
    deadline = time.monotonic() + timeout
    while True:
        nodes = sorted(grid.get_node_ids())
        if len(nodes) >= n or time.monotonic() > deadline:
            return nodes
        time.sleep(0.5)


def _catchup_content(round_: int, known: int, history: protocol.History) -> RecordDict:
    cfg = {"round": round_, "from-version": known, "version": history.version,
           "hash": history.hashes[-1]}
    updates = history.since(known)
    if updates:  # a ConfigRecord holds no empty lists
        cfg.update(protocol.catchup_to_config(updates))
    return RecordDict({"zo": ConfigRecord(cfg)})


def _synced_version(zo, history: protocol.History) -> int:
    """The version a node reports it holds, if its hash matches ours; else 0 (start over)."""
    v, h = zo.get("synced-version"), zo.get("synced-hash")
    if isinstance(v, int) and 0 <= v <= history.version and h == history.hashes[v]:
        return v
    return 0


@app.main()
def main(grid: Grid, context: Context) -> None:
    cfg = task.FedConfig.from_run_config(context.run_config)
    cfg.check()  # `flwr run --run-config` bypasses run.py's flags: a bad value would fail every round
    task.setup_threads(cfg)
    model = task.build_model(cfg)
    params = task.trained_params(model)
    opt = cfg.server_opt_spec()
    opt_state = protocol.new_opt_state(params, opt)
    history = protocol.History(protocol.params_hash(params))
    val = task.load_blocks(cfg)["val"][:cfg.eval_blocks] if cfg.eval_blocks else None
    n_params = sum(p.numel() for p in params)
    fedavg_one_way = fedavg_bytes(model)
    log(INFO, "zo-fed: %d rounds, %d clients, %d parameters, %d local steps x q=%d, server %s",
        cfg.rounds, cfg.num_clients, n_params, cfg.local_steps, cfg.q, opt.name)

    nodes = _wait_for_nodes(grid, cfg.num_clients, cfg.round_timeout)
    if len(nodes) < cfg.num_clients:
        log(WARNING, "zo-fed: only %d of %d nodes connected; going on with them", len(nodes), cfg.num_clients)
    known = {node: 0 for node in nodes}  # the global version each node holds (0: the initial model)
    claimed: dict[int, int] = {}  # node id -> the client id it was accepted with
    summary = {"config": {k: v for k, v in context.run_config.items()}, "parameters": n_params,
               "fedavg_bytes_per_client_one_way": fedavg_one_way, "rounds": []}

    for r in range(1, cfg.rounds + 1):
        t0 = time.monotonic()
        messages = [Message(_catchup_content(r, known[node], history), dst_node_id=node, message_type="train",
                            group_id=str(r)) for node in nodes]
        bytes_down = sum(wire_bytes(m.content) for m in messages)
        replies = list(grid.send_and_receive(messages, timeout=cfg.round_timeout))
        spec = cfg.round_spec(r)
        accepted, rejected, seen, bytes_up = [], [], set(), 0
        answered = set()
        for rep in replies:
            node = rep.metadata.src_node_id
            answered.add(node)

            def reject(reason, node=node):
                rejected.append({"node": node, "reason": reason})
                log(WARNING, "zo-fed round %d: rejected the reply of node %d: %s", r, node, reason)

            if rep.has_error():
                reject(f"client error {rep.error.code}: {rep.error.reason}")
                continue
            bytes_up += wire_bytes(rep.content)
            if "zo" not in rep.content.config_records:
                reject("no 'zo' config record")
                continue
            zo = rep.content.config_records["zo"]
            known[node] = _synced_version(zo, history)
            if zo.get("status", "ok") != "ok":
                reject(f"client status {zo.get('status')!r}: {zo.get('reason', '')}")
                continue
            try:
                reply = protocol.TrainReply.from_config(zo)
            except ValueError as e:
                reject(f"malformed: {e}")
                continue
            reason = protocol.judge_reply(reply, node, claimed, spec, seen)
            if reason:
                reject(reason)
                continue
            accepted.append(reply)
        for node in sorted(set(nodes) - answered):
            rejected.append({"node": node, "reason": "no reply before round-timeout"})
            log(WARNING, "zo-fed round %d: node %d did not reply", r, node)

        update = protocol.aggregate(r, accepted)
        protocol.apply_round(params, update, opt, opt_state, distribution=cfg.distribution, backend=cfg.backend)
        history.append(update, protocol.params_hash(params))
        record_bytes = 12 * len(update.seeds)
        row = {"round": r, "accepted": update.clients, "rejected": rejected,
               "directions": len(update.seeds), "bytes_down": bytes_down, "bytes_up": bytes_up,
               "record_payload_bytes": record_bytes,
               "fedavg_bytes": 2 * fedavg_one_way * len(nodes),
               "train_loss": {a.client_id: a.train_loss for a in accepted},
               "hash": history.hashes[-1], "seconds": round(time.monotonic() - t0, 3)}
        if val is not None:
            row["val_loss"] = task.evaluate(model, val, cfg)
        summary["rounds"].append(row)
        log(INFO, "zo-fed round %d: accepted clients %s, rejected %d, %d directions; bytes down %d, up %d "
            "(FedAvg: %d); val loss %s", r, update.clients, len(rejected), len(update.seeds), bytes_down,
            bytes_up, row["fedavg_bytes"], row.get("val_loss"))

    # Final sync: every node catches up to the last version from records and reports its hash.
    messages = [Message(_catchup_content(cfg.rounds + 1, known[node], history), dst_node_id=node,
                        message_type="evaluate", group_id="final") for node in nodes]
    final_down = sum(wire_bytes(m.content) for m in messages)
    clients = []
    for rep in grid.send_and_receive(messages, timeout=cfg.round_timeout):
        node = rep.metadata.src_node_id
        if rep.has_error():
            clients.append({"node": node, "error": rep.error.reason})
            continue
        zo = rep.content.config_records.get("zo", {})
        entry = {"node": node, "client_id": zo.get("client-id"), "synced_version": zo.get("synced-version"),
                 "hash": zo.get("synced-hash"), "status": zo.get("status", "ok"),
                 "bit_identical": zo.get("synced-hash") == history.hashes[-1]}
        metrics = rep.content.metric_records.get("metrics")
        if metrics is not None and "eval-loss" in metrics:
            entry["eval_loss"] = metrics["eval-loss"]
        clients.append(entry)
    summary.update(final_hash=history.hashes[-1], final_bytes_down=final_down, clients=clients)
    log(INFO, "zo-fed: final version %d, hash %s; clients bit-identical: %s", history.version,
        history.hashes[-1][:16], [c.get("bit_identical") for c in clients])

    if cfg.out_dir:
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        torch.save({n: p.detach().cpu() for n, p in model.named_parameters()}, out / "global.pt")
        torch.save([{"version": u.version, "seeds": u.seeds, "coeffs": u.coeffs, "clients": u.clients}
                    for u in history.updates], out / "records.pt")
        (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
        log(INFO, "zo-fed: wrote %s", out)
