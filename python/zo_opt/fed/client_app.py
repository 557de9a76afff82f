"""The Flower ClientApp: catch up from records, train locally with ZOOptimizer, send records.

The node's ``--node-config`` gives ``partition-id`` (the client id, which enters the seed
derivation) and ``num-partitions``. The client keeps the global model of the version it
last synced to in ``context.state`` (Flower's per-run node state, kept by the SuperNode
across rounds; it moves only between the SuperNode and its ClientApp process on the same
machine), so each round it applies only the records of the rounds it missed. A client with
no state starts from the initial model (version 0), which it builds like the server.

``train``: catch up to version ``r - 1``, check the sha256 against the server's, store that
model, run the local ZO steps, reply with the step records (``protocol.TrainReply``).
``evaluate``: catch up to the final version, check, report the hash and the validation loss.

Test hook: node-config ``fault="ROUND:KIND"`` corrupts this client's reply in that round
(KIND: ``nan``, ``stale``, ``seeds``, ``short``), to exercise the server's validation.
"""
from __future__ import annotations

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp

from . import protocol, task

app = ClientApp()
STATE_MODEL, STATE_ADAM, STATE_META = "zo-fed-model", "zo-fed-adam", "zo-fed-meta"


class OutOfSync(RuntimeError):
    pass


def _client_id(context: Context, cfg: task.FedConfig) -> int:
    nc = context.node_config
    cid = int(nc.get("partition-id", -1))
    n = int(nc.get("num-partitions", cfg.num_clients))
    if n != cfg.num_clients or not 0 <= cid < n:
        raise ValueError(f"node-config partition-id={cid} num-partitions={n} does not fit num-clients="
                         f"{cfg.num_clients}")
    return cid


def _restore(st: RecordDict, cfg: task.FedConfig):
    """(model, params, opt_state, version) from the node state ``st``, or the initial model."""
    model = task.build_model(cfg)
    params = task.trained_params(model)
    opt = cfg.server_opt_spec()
    opt_state = protocol.new_opt_state(params, opt)
    version = 0
    if STATE_META in st.config_records and STATE_MODEL in st.array_records:
        sd = st.array_records[STATE_MODEL].to_torch_state_dict()
        names = [n for n, _ in model.named_parameters()]
        with torch.no_grad():
            for n, p in zip(names, params):
                p.copy_(sd[n])
            if opt.name == "adam":
                ad = st.array_records[STATE_ADAM].to_torch_state_dict()
                for k, n in enumerate(names):
                    opt_state["m"][k].copy_(ad[f"m.{n}"])
                    opt_state["v"][k].copy_(ad[f"v.{n}"])
                opt_state["t"] = int(st.config_records[STATE_META]["adam-t"])
        version = int(st.config_records[STATE_META]["version"])
    return model, params, opt_state, version


def _store(context: Context, model, opt_state, version: int, digest: str) -> None:
    """The global model of ``version`` into the node state (copied: training may follow)."""
    named = list(model.named_parameters())
    context.state[STATE_MODEL] = ArrayRecord(
        torch_state_dict={n: p.detach().cpu().clone() for n, p in named})
    meta = {"version": version, "hash": digest}
    if "m" in opt_state:
        ad = {f"m.{n}": m.cpu().clone() for (n, _), m in zip(named, opt_state["m"])}
        ad.update({f"v.{n}": v.cpu().clone() for (n, _), v in zip(named, opt_state["v"])})
        context.state[STATE_ADAM] = ArrayRecord(torch_state_dict=ad)
        meta["adam-t"] = int(opt_state["t"])
    context.state[STATE_META] = ConfigRecord(meta)


def _catch_up(context: Context, cfg: task.FedConfig, zo):
    """Brings the stored model to the server's current version with its records."""
    model, params, opt_state, version = _restore(context.state, cfg)
    target, start = int(zo["version"]), int(zo["from-version"])
    if start != version:
        if start != 0:  # the server's view of us differs: tell it what we hold, start over
            raise OutOfSync(f"holds version {version}, server sent records from version {start}")
        model, params, opt_state, version = _restore(RecordDict(), cfg)  # the initial model
    updates = protocol.catchup_from_config(zo)
    if [u.version for u in updates] != list(range(start + 1, target + 1)):
        raise OutOfSync(f"catch-up versions {[u.version for u in updates]} do not lead from {start} to {target}")
    opt = cfg.server_opt_spec()
    for u in updates:
        protocol.apply_round(params, u, opt, opt_state, distribution=cfg.distribution, backend=cfg.backend)
    digest = protocol.params_hash(params)
    if digest != zo["hash"]:
        raise OutOfSync(f"after replaying to version {target} the weights' sha256 {digest[:16]} differs "
                        f"from the server's {str(zo['hash'])[:16]}")
    _store(context, model, opt_state, target, digest)
    return model, target, digest


def _out_of_sync_reply(msg: Message, context: Context, cid: int, reason: str) -> Message:
    for key in (STATE_MODEL, STATE_ADAM, STATE_META):  # start over from version 0 next time
        for records in (context.state.array_records, context.state.config_records):
            if key in records:
                del records[key]
    zo = ConfigRecord({"status": "out-of-sync", "reason": reason, "client-id": cid, "synced-version": 0,
                       "synced-hash": ""})
    return Message(RecordDict({"zo": zo}), reply_to=msg)


def _inject_fault(context: Context, round_: int, cfg: dict) -> dict:
    spec = str(context.node_config.get("fault", ""))
    if spec and int(spec.split(":")[0]) == round_:
        protocol.FAULTS[spec.split(":")[1]](cfg, round_)
    return cfg


@app.train()
def train(msg: Message, context: Context) -> Message:
    cfg = task.FedConfig.from_run_config(context.run_config)
    task.setup_threads(cfg)
    cid = _client_id(context, cfg)
    zo = msg.content.config_records["zo"]
    round_ = int(zo["round"])
    try:
        model, version, digest = _catch_up(context, cfg, zo)
    except OutOfSync as e:
        return _out_of_sync_reply(msg, context, cid, str(e))
    blocks = task.partition(task.load_blocks(cfg)["train"], cid, cfg.num_clients)
    reply = task.local_train(model, blocks, cfg, round_, cid)  # the stored copy stays at `version`
    out = _inject_fault(context, round_, reply.to_config())
    out.update({"status": "ok", "synced-version": version, "synced-hash": digest})
    return Message(RecordDict({"zo": ConfigRecord(out)}), reply_to=msg)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    cfg = task.FedConfig.from_run_config(context.run_config)
    task.setup_threads(cfg)
    cid = _client_id(context, cfg)
    zo = msg.content.config_records["zo"]
    try:
        model, version, digest = _catch_up(context, cfg, zo)
    except OutOfSync as e:
        return _out_of_sync_reply(msg, context, cid, str(e))
    content = RecordDict({"zo": ConfigRecord({"status": "ok", "client-id": cid, "synced-version": version,
                                              "synced-hash": digest})})
    if cfg.eval_blocks:
        val = task.load_blocks(cfg)["val"][:cfg.eval_blocks]
        content["metrics"] = MetricRecord({"eval-loss": task.evaluate(model, val, cfg)})
    return Message(content, reply_to=msg)
