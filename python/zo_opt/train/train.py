"""``zo-train``: GPT-2 with FO, ZO, Instruct (BP-guided ZO) or Calibrate steps.

Read it top to bottom: parse flags -> data -> model -> optimizers -> (resume) -> the loop ->
final eval, checkpoint and plot. Each step of the loop is one of:

  FO         backprop, then the torch optimizer (sgd, adam, mudamw)
  ZO         ZOOptimizer.step(closure): 2q forwards in eval mode; with sgd the update is the
             optimizer's fused pass; with adam/mudamw an lr=0 ZOOptimizer only estimates
             (its last pass just restores theta), the estimate (1/q) sum_i g_i z_i is written
             into .grad by zo_update_ and the torch optimizer steps. That costs one .grad
             buffer (1x the trained parameters) plus the optimizer's moments (2x for adam).
  Instruct   every --bp_interval steps a BP gradient; ZO along directions mixed with it; a
             normalised blend (see instruct.py for the math)
  Calibrate  every --bp_interval steps an FO step instead of the ZO step (the ZO estimate is
             not computed on those steps)

The logged loss is the one the step computed (ZO: the mean of its 2q evaluations); no
forward pass is spent on logging.

Run folder (``--log_dir/--run_name``): metrics.csv, train.log, config.json (resolved flags),
summary.json, checkpoints/, PNG plots. CSV columns: the old ones (timestamp, epoch, step, mode,
scope, q, lr, batch_size, optimizer, bp_interval, loss, grad_norm, eval_loss) and
forward_passes (cumulative model forwards on a training batch; a backward is not counted, an
FO step is 1), tokens (cumulative tokens of the training batches drawn), elapsed_s (training
wall time, evals and checkpoints excluded), peak_memory_bytes (CUDA max allocated, else the
process's peak RSS). Row 0 holds the evaluation before training. grad_norm: the BP gradient
norm on FO steps; on ZO steps the RMS of the projected gradients g_i, an estimate of |grad|
(E[(grad . z)^2] = |grad|^2 for Gaussian z).
"""
from __future__ import annotations

import csv
import json
import math
import resource
import sys
import time
from pathlib import Path

import torch

from .. import functional as F
from ..optimizer import ZOOptimizer
from . import checkpoint as ckpt_io
from . import parallel
from .cli import parse_args, resolved
from .data import BatchStream, DataError, load_blocks, load_tokenizer
from .instruct import Instruct, NoBPGradient
from .model import build_model, describe, no_decay, select_params
from .optim import MuDAMW

CSV_COLUMNS = ["timestamp", "epoch", "step", "mode", "scope", "q", "lr", "batch_size", "optimizer",
               "bp_interval", "loss", "grad_norm", "eval_loss", "forward_passes", "tokens", "elapsed_s",
               "peak_memory_bytes"]


class Log:
    """Lines to the console (above the progress bar) and to <run>/train.log; silent on the
    ranks other than 0 of a data-parallel run."""

    def __init__(self, path: Path, enabled: bool = True):
        self.file = open(path, "a", encoding="utf-8") if enabled else None

    def __call__(self, msg: str):
        from tqdm import tqdm

        if self.file is None:
            return
        tqdm.write(msg, file=sys.stderr)
        self.file.write(f"{time.strftime('%Y-%m-%d %H:%M:%S')} {msg}\n")
        self.file.flush()


def peak_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def make_torch_optimizer(name, groups, lr, momentum):
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum)
    if name == "adam":
        return torch.optim.AdamW(groups, lr=lr)
    return MuDAMW(groups, lr=lr)


def truncate_csv(path: Path, last_step: int):
    """Keep the header and the rows of steps <= last_step (a resume rewrites the rest)."""
    if not path.exists():
        return
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS)
        w.writeheader()
        # A row cut short by a kill mid-write lacks fields (DictReader fills None): it is past the
        # checkpoint anyway, and int() of its missing step crashed the resume.
        w.writerows(r for r in rows if None not in r.values() and int(r["step"]) <= last_step)


def load_keeping_flags(opt, state: dict):
    """``opt.load_state_dict(state)`` without its saved lr/momentum/weight_decay: torch's
    restores the param groups' hyperparameters, so ``--learning_rate`` given again on a resume
    was silently ignored (while the CSV logged it). This command line's values win."""
    flags = [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups]
    opt.load_state_dict(state)
    for g, f in zip(opt.param_groups, flags):
        g.update(f)


@torch.no_grad()
def evaluate(model, blocks: torch.Tensor, device, batch_size=16) -> float:
    """Mean next-token cross-entropy over the validation blocks (eval mode)."""
    model.eval()
    total = 0.0
    for start in range(0, len(blocks), batch_size):
        x = blocks[start:start + batch_size].to(device)
        total += model(input_ids=x, labels=x).loss.item() * len(x)
    return total / len(blocks)


def check_data_parallel(cfg, ranks) -> None:
    """Flags that a torchrun launch cannot honour stop here, naming the flag."""
    if ranks.world == 1:
        return
    if cfg["mode"] == "Instruct":
        sys.exit("zo-train: error: --mode Instruct is not data parallel yet; run it in one process")
    for flag in ("batch_size", "zo_query_batch_size", "bp_batch_size"):
        if cfg.get(flag) and cfg[flag] % ranks.world:
            sys.exit(f"zo-train: error: argument --{flag}: {cfg[flag]} does not split over "
                     f"{ranks.world} ranks; use a multiple of {ranks.world}")


def main(argv=None):
    args = parse_args(argv)
    try:
        return train(args)
    except (DataError, NoBPGradient) as e:
        sys.exit(f"zo-train: error: {e}")
    except KeyboardInterrupt:  # train() has logged where to resume from
        sys.exit(130)


def interrupted_note(step: int, checkpoint) -> str:
    """What an interrupt at ``step`` loses, and the command that resumes."""
    if checkpoint is None:
        return (f"interrupted at step {step}: no checkpoint written, nothing to resume from "
                "(--save_interval N saves every N steps)")
    return (f"interrupted at step {step}: the steps after {checkpoint} are lost; "
            f"resume with zo-train --resume {checkpoint}")


def train(args) -> Path:
    cfg = resolved(args)
    mode, q = cfg["mode"], cfg["query_budget_q"]
    ranks, cfg["device"] = parallel.setup(cfg["device"])
    check_data_parallel(cfg, ranks)
    device = torch.device("cuda" if cfg["device"] == "auto" and torch.cuda.is_available()
                          else "cpu" if cfg["device"] == "auto" else cfg["device"])
    torch.manual_seed(cfg["seed"])

    # ---- run folder, logs
    if not cfg["run_name"]:
        cfg["run_name"] = f"{mode}_{cfg['scope']}_q{q}_{time.strftime('%Y%m%d-%H%M%S')}"
    run_dir = Path(cfg["log_dir"]) / cfg["run_name"]
    run_dir.mkdir(parents=True, exist_ok=True)
    csv_path = Path(cfg["csv_file"]) if cfg["csv_file"] else run_dir / "metrics.csv"
    ckpt_dir = Path(cfg["checkpoint_dir"]) if cfg["checkpoint_dir"] else run_dir / "checkpoints"
    log = Log(run_dir / "train.log", enabled=ranks.main)
    log(f"zo-train {' '.join(sys.argv[1:])}")

    # ---- data: train blocks, held-out validation blocks, BP/ZO streams
    tokenizer = load_tokenizer(cfg["cache_dir"])
    def blocks(spec, flag="--dataset"):
        return load_blocks(spec, block_size=cfg["block_size"], max_samples=cfg["max_samples"],
                           val_fraction=cfg["val_fraction"], text_field=cfg["text_field"],
                           cache_dir=cfg["cache_dir"], tokenizer=tokenizer, log=log, flag=flag)
    data = blocks(cfg["dataset"])
    train_blocks, val_blocks = data["train"], data["val"]
    if cfg["eval_dataset"] and cfg["eval_dataset"] != cfg["dataset"]:
        other = blocks(cfg["eval_dataset"], "--eval_dataset")
        val_blocks = torch.cat([other["train"], other["val"]])  # never trained on
    val_blocks = val_blocks[: cfg["eval_blocks"]]
    zo_blocks = bp_blocks = train_blocks
    if cfg["split_dataset_for_bp_zo"]:
        half = len(train_blocks) // 2
        if half == 0:  # else "no blocks for the bp stream", naming no flag
            raise DataError(f"--split_dataset_for_bp_zo: the training data holds {len(train_blocks)} block; "
                            "splitting it into BP and ZO halves needs 2 or more (more data, or a smaller "
                            "--block_size)")
        bp_blocks, zo_blocks = train_blocks[:half], train_blocks[half:]
    if cfg["bp_dataset"]:
        bp_blocks = blocks(cfg["bp_dataset"], "--bp_dataset")["train"]
    share = cfg["zo_share_data_across_queries"]
    if mode == "FO":
        bp_stream = BatchStream(train_blocks, cfg["batch_size"], cfg["seed"], "fo")
        zo_stream, per_step, n_main = None, cfg["batch_size"], len(train_blocks)
    else:
        bp_stream = BatchStream(bp_blocks, cfg["bp_batch_size"], cfg["seed"], "bp")
        zo_stream = BatchStream(zo_blocks, cfg["batch_size"] if share else cfg["zo_query_batch_size"],
                                cfg["seed"], "zo")
        per_step, n_main = (cfg["batch_size"] if share else q * cfg["zo_query_batch_size"]), len(zo_blocks)
    if len(val_blocks) == 0:
        log("warning: no validation blocks (corpus too small for --val_fraction); eval_loss stays empty")
    max_steps = cfg["max_steps"] or max(1, math.ceil(cfg["epochs"] * n_main / per_step))
    cfg["max_steps"] = max_steps
    resume = Path(cfg["resume"]) if cfg["resume"] else None
    resumed_at = ckpt_io.checkpoint_step(resume) if resume else 0
    if resumed_at > max_steps:  # only --epochs can get here: cli checked --max_steps against the checkpoint
        sys.exit(f"zo-train: error: argument --epochs: {cfg['epochs']} epochs end at step {max_steps}, before "
                 f"the checkpoint's step {resumed_at} (epoch {resumed_at * per_step / n_main:.2f}); pass "
                 f"more epochs or --max_steps {resumed_at} or more")

    # ---- model and the trained parameters
    model = build_model(cfg["model_size"], model_name_or_path=str(resume) if resume else cfg["model_name_or_path"],
                        dropout=cfg["dropout"], seed=cfg["seed"]).to(device)
    model.eval()
    named = select_params(model, cfg["scope"])
    decay = [p for n, p in named if not no_decay(n, p)]
    nodecay = [p for n, p in named if no_decay(n, p)]
    params = decay + nodecay  # optimizer order = noise order (NOISE.md)
    n_trained = sum(p.numel() for p in params)
    log(f"model: {describe(model)}; scope {cfg['scope']}: training {n_trained / 1e6:.2f}M parameters "
        f"({len(params)} tensors); device {device}")

    # ---- optimizers
    wd, lr, bp_lr = cfg["weight_decay"], cfg["learning_rate"], cfg["bp_learning_rate"]
    groups = [{"params": decay, "weight_decay": wd}, {"params": nodecay, "weight_decay": 0.0}]
    fused = cfg["optimizer"] == "sgd"
    zo_kw = dict(q=q, eps=cfg["eps"], distribution=cfg["distribution"], estimator=cfg["estimator"],
                 seed=cfg["seed"], backend=cfg["backend"])
    torch_opt = zo = instruct = None
    if mode == "FO" or not fused or mode == "Calibrate":
        opt_lr = bp_lr if mode == "Calibrate" else lr
        if cfg["optimizer"] == "mudamw":  # embeddings (2-D, tied to the head) take plain Adam steps
            emb = {id(model.get_input_embeddings().weight), id(model.transformer.wpe.weight)}
            torch_opt = MuDAMW([{"params": [p for p in g["params"] if id(p) not in emb], "weight_decay": g["weight_decay"]}
                                for g in groups] + [{"params": [p for p in params if id(p) in emb],
                                                     "weight_decay": 0.0, "orthogonalize": False}], lr=opt_lr)
        else:
            torch_opt = make_torch_optimizer(cfg["optimizer"], groups, opt_lr, cfg["momentum"])
    if mode in ("ZO", "Calibrate"):
        if fused:  # the fused update: decay and step inside the optimizer's last pass
            zo = ZOOptimizer(groups, lr=lr, momentum=cfg["momentum"], **zo_kw)
        else:  # estimate only: lr=0 makes the last pass a pure restore
            zo = ZOOptimizer(params, lr=0.0, **zo_kw)
    if mode == "Instruct":
        instruct = Instruct(params, lr=lr, q=q, eps=cfg["eps"], cosine=cfg["instruct_cosine"],
                            bp_weight=cfg["instruct_bp_weight"], distribution=cfg["distribution"],
                            seed=cfg["seed"], backend=cfg["backend"], torch_optimizer=None if fused else torch_opt)
    if not fused and mode != "FO":
        log(f"memory: --optimizer {cfg['optimizer']} keeps .grad buffers (+{n_trained * 4 / 2**20:.0f} MiB) "
            f"and two moments (+{2 * n_trained * 4 / 2**20:.0f} MiB) beyond the fused ZO path")

    # ---- resume
    start, counters = 0, {"forward_passes": 0, "tokens": 0, "elapsed_s": 0.0, "zo_time": 0.0,
                          "zo_fwd_time": 0.0, "zo_steps": 0, "step_time": 0.0}
    if resume:
        state = ckpt_io.load_state(resume)
        start, counters = state["step"], state["counters"]
        if zo is not None:
            load_keeping_flags(zo, state["zo"])
        if torch_opt is not None:
            load_keeping_flags(torch_opt, state["torch_opt"])
        if instruct is not None:
            instruct.load_state_dict(state["instruct"])
        torch.set_rng_state(state["rng_cpu"])
        if device.type == "cuda" and state.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(state["rng_cuda"], device)
        if ranks.main:
            truncate_csv(csv_path, start)
        log(f"resumed from {resume} at step {start}")
        if start == max_steps:
            log(f"nothing to train: the checkpoint is at the run's last step, {start}; "
                "pass a larger --max_steps or --epochs to go on")
    if ranks.world > 1:
        log(f"data parallel: {ranks.world} ranks, each evaluates its 1/{ranks.world} of every batch")
    if ranks.main:
        (run_dir / "config.json").write_text(json.dumps(cfg, indent=1))
    if ranks.main and (not resume or not csv_path.exists() or csv_path.stat().st_size == 0):  # fresh run, fresh CSV
        csv_path.parent.mkdir(parents=True, exist_ok=True)
        with open(csv_path, "w", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS).writeheader()

    def write_row(step, loss, grad_norm, eval_loss):
        if not ranks.main:
            return
        row = {"timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"), "epoch": f"{step * per_step / n_main:.4f}",
               "step": step, "mode": mode, "scope": cfg["scope"], "q": q, "lr": lr, "batch_size": cfg["batch_size"],
               "optimizer": cfg["optimizer"], "bp_interval": cfg["bp_interval"],
               "loss": "" if loss is None else f"{loss:.6f}", "grad_norm": "" if grad_norm is None else f"{grad_norm:.6g}",
               "eval_loss": "" if eval_loss is None else f"{eval_loss:.6f}",
               "forward_passes": counters["forward_passes"], "tokens": counters["tokens"],
               "elapsed_s": f"{counters['elapsed_s']:.3f}", "peak_memory_bytes": peak_memory_bytes(device)}
        with open(csv_path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=CSV_COLUMNS).writerow(row)

    last_checkpoint = [resume]  # where a resume would start from (an interrupt says so)

    def save(step):
        if not ranks.main:
            return
        state = {"step": step, "counters": dict(counters), "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
                 "zo": zo.state_dict() if zo else None, "torch_opt": torch_opt.state_dict() if torch_opt else None,
                 "instruct": instruct.state_dict() if instruct else None}
        path = ckpt_io.save_checkpoint(ckpt_dir, step, model, tokenizer, state, cfg, keep=cfg["keep_checkpoints"])
        last_checkpoint[0] = path
        log(f"checkpoint: {path}")

    # ---- the two kinds of work a step does
    fwd_time = [0.0]
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def forward_loss(x):
        """One forward: mean next-token cross-entropy of a batch of blocks."""
        return model(input_ids=x, labels=x).loss

    def backprop(x):
        """A BP gradient on one batch (train mode: dropout if set), left in p.grad."""
        for p in params:
            p.grad = None
        model.train()
        with torch.enable_grad():
            loss = forward_loss(x)
            loss.backward()
        model.eval()
        ranks.average_gradients(params)
        norm = torch.nn.utils.clip_grad_norm_(params, cfg["grad_clip"] or float("inf"))
        return ranks.mean(loss), norm

    def zo_batches(step):
        if share:
            return [ranks.shard(zo_stream.batch(step)).to(device)]
        return [ranks.shard(zo_stream.batch(step * q + i)).to(device) for i in range(q)]

    def closure_over(batches):
        def closure(i=0):
            sync()
            t0 = time.perf_counter()
            loss = forward_loss(batches[i if len(batches) > 1 else 0])
            sync()
            fwd_time[0] += time.perf_counter() - t0
            return loss
        return closure

    # ---- the loop
    if start == 0 and cfg["eval_interval"] and len(val_blocks) and ranks.main:
        ev = evaluate(model, val_blocks, device)
        log(f"step 0: eval_loss {ev:.4f}")
        write_row(0, None, None, ev)
    from tqdm import tqdm

    bar = tqdm(range(start, max_steps), initial=start, total=max_steps, disable=not (cfg["progress"] and ranks.main),
               dynamic_ncols=True, desc=f"{mode} q={q}" if mode != "FO" else "FO")
    t_last = time.perf_counter()
    done = start
    try:
        for step in bar:
            t0 = time.perf_counter()
            fwd_time[0] = 0.0
            bp_step = mode in ("Instruct", "Calibrate") and step % cfg["bp_interval"] == 0
            if mode == "FO" or (mode == "Calibrate" and bp_step):
                x = ranks.shard(bp_stream.batch(step if mode == "FO" else step // cfg["bp_interval"])).to(device)
                if torch_opt is not None and mode == "Calibrate":
                    for g in torch_opt.param_groups:
                        g["lr"] = bp_lr
                loss, grad_norm = backprop(x)
                torch_opt.step()
                for p in params:
                    p.grad = None
                n_fwd, n_tok = 1, x.numel()
            elif mode == "Instruct":
                n_fwd, n_tok = 2 * q, 0
                if bp_step:
                    x = bp_stream.batch(step // cfg["bp_interval"]).to(device)
                    _, norm = backprop(x)
                    instruct.set_gradient([p.grad for p in params])
                    for p in params:
                        p.grad = None
                    n_fwd, n_tok = n_fwd + 1, x.numel()
                batches = zo_batches(step)
                loss = instruct.step(step, closure_over(batches), fresh_bp=bp_step)
                grad_norm = instruct.last_grads.pow(2).mean().sqrt()
                n_tok += sum(b.numel() for b in batches)
            else:  # a ZO step
                batches = zo_batches(step)
                if torch_opt is not None and mode == "Calibrate":
                    for g in torch_opt.param_groups:
                        g["lr"] = lr
                loss = zo.step(closure_over(batches))
                rec = zo.last_record
                if not fused and torch.isfinite(rec.grads).all():
                    grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in params]
                    torch._foreach_zero_(grads)
                    F.zo_update_(grads, rec.seeds, rec.grads / q, distribution=cfg["distribution"], backend=cfg["backend"])
                    for p, g in zip(params, grads):
                        p.grad = g
                    torch_opt.step()
                # E[(grad . z)^2] = |grad|^2 for Gaussian z: the RMS of the g_i estimates |grad|
                grad_norm = rec.grads.pow(2).mean().sqrt()
                n_fwd = 2 * q if cfg["estimator"] == "central" else q + 1
                n_tok = sum(b.numel() for b in batches)
                counters["zo_steps"] += 1
            sync()
            dt = time.perf_counter() - t0
            if mode != "FO" and not bp_step:
                counters["zo_time"] += dt
                counters["zo_fwd_time"] += fwd_time[0]
            counters["step_time"] += dt
            counters["forward_passes"] += n_fwd
            counters["tokens"] += n_tok * ranks.world  # the global batch
            now = time.perf_counter()
            counters["elapsed_s"] += now - t_last
            t_last = now

            done = step + 1
            is_eval = cfg["eval_interval"] and len(val_blocks) and (done % cfg["eval_interval"] == 0 or done == max_steps)
            ev = evaluate(model, val_blocks, device) if is_eval and ranks.main else None
            if done % cfg["log_interval"] == 0 or is_eval or done == max_steps:
                lv, gv = float(loss), float(grad_norm)
                write_row(done, lv, gv, ev)
                bar.set_postfix(loss=f"{lv:.4f}", refresh=False)
                if ev is not None:
                    log(f"step {done}: loss {lv:.4f} eval_loss {ev:.4f}")
            if not cfg["disable_checkpoint"] and ((cfg["save_interval"] and done % cfg["save_interval"] == 0) or done == max_steps):
                save(done)
            t_last = time.perf_counter()  # evals and checkpoints are not training time
    except KeyboardInterrupt:
        bar.close()
        log(interrupted_note(done, last_checkpoint[0]))
        raise
    bar.close()
    if not ranks.agree(params):
        raise RuntimeError("data-parallel ranks hold different parameters: a rank saw other seeds "
                           "or another model; check that every rank runs the same command")
    if ranks.world > 1:
        log(f"data parallel: the {ranks.world} ranks hold identical parameters")
    parallel.teardown(ranks)
    if not ranks.main:
        return run_dir

    # ---- summary
    s = {"steps": max_steps, "s_per_step": counters["step_time"] / max(1, max_steps),
         "forward_passes": counters["forward_passes"], "tokens": counters["tokens"]}
    if counters["zo_steps"]:
        s["zo_s_per_step"] = counters["zo_time"] / counters["zo_steps"]
        s["zo_share_outside_forwards"] = 1 - counters["zo_fwd_time"] / max(counters["zo_time"], 1e-12)
    with open(csv_path, newline="") as f:
        evals = [float(r["eval_loss"]) for r in csv.DictReader(f) if r["eval_loss"]]
    if evals:
        s["eval_loss_first"], s["eval_loss_last"] = evals[0], evals[-1]
    (run_dir / "summary.json").write_text(json.dumps(s, indent=1))
    log("summary: " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items()))
    if cfg["plot"]:
        from ..plot import plot_runs

        for path in plot_runs([run_dir], run_dir):
            log(f"plot: {path}")
    log(f"run folder: {run_dir}")
    log.file.close()
    return run_dir
