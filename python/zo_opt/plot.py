"""``zo-plot RUN_DIR... [-o OUT]``: overlay training runs (their metrics.csv) into PNGs.

    loss_vs_step.png            training loss (and eval loss, dashed) against optimizer steps
    loss_vs_forward_passes.png  against model forwards (the cost unit of ZO)
    loss_vs_time.png            against training wall time
    final_loss_vs_q.png         last eval (else training) loss against q, one line per
                                mode/scope/batch size (only when runs of one mode/scope/batch size span several q)

Each run is labelled by its folder name. Needs matplotlib (the ``train`` extra); renders
with the Agg backend, no display needed.
"""
from __future__ import annotations

import argparse
import csv
import sys
from collections import defaultdict
from pathlib import Path


def read_run(path) -> tuple[str, list[dict]]:
    path = Path(path)
    f = path if path.is_file() else path / "metrics.csv"
    if not f.exists():
        raise FileNotFoundError(f"{path}: no metrics.csv")
    with open(f, newline="") as fh:
        rows = list(csv.DictReader(fh))
    # Every run's CSV is metrics.csv: label a run's file by its folder, or each is "metrics".
    label = (path.parent.name if path.name == "metrics.csv" else path.stem) if path.is_file() else path.name
    return label, rows


def _series(rows, x, y):
    pts = [(float(r[x]), float(r[y])) for r in rows if r.get(y) not in (None, "") and r.get(x) not in (None, "")]
    return [a for a, _ in pts], [b for _, b in pts]


def plot_runs(run_dirs, out_dir, smooth: int = 1) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [read_run(r) for r in run_dirs]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for x, xlabel, name in (("step", "step", "loss_vs_step"), ("forward_passes", "forward passes", "loss_vs_forward_passes"),
                            ("elapsed_s", "wall time (s)", "loss_vs_time")):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        for k, (label, rows) in enumerate(runs):
            color = f"C{k % 10}"
            xs, ys = _series(rows, x, "loss")
            if smooth > 1 and len(ys) >= smooth:
                ys = [sum(ys[max(0, i - smooth + 1):i + 1]) / len(ys[max(0, i - smooth + 1):i + 1]) for i in range(len(ys))]
            if xs:
                ax.plot(xs, ys, color=color, lw=1, label=f"{label} (train)")
            xs, ys = _series(rows, x, "eval_loss")
            if xs:
                ax.plot(xs, ys, color=color, ls="--", marker="o", ms=3, lw=1, label=f"{label} (eval)")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("cross-entropy loss")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / f"{name}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)

    by_group = defaultdict(list)
    for label, rows in runs:
        if not rows:
            continue
        last = rows[-1]
        evals = [float(r["eval_loss"]) for r in rows if r.get("eval_loss")]
        losses = [float(r["loss"]) for r in rows if r.get("loss")]
        final = evals[-1] if evals else (losses[-1] if losses else None)
        if final is not None and last.get("q"):
            by_group[(last["mode"], last["scope"], last["batch_size"])].append((int(last["q"]), final))
    if any(len({q for q, _ in pts}) > 1 for pts in by_group.values()):  # a sweep
        fig, ax = plt.subplots(figsize=(6, 4))
        for (mode, scope, bs), pts in sorted(by_group.items()):
            pts.sort()
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=f"{mode} {scope} batch {bs}")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("q (directions per step)")
        ax.set_ylabel("final loss (eval if logged)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
        fig.tight_layout()
        path = out_dir / "final_loss_vs_q.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        written.append(path)
    return written


def main(argv=None):
    p = argparse.ArgumentParser(prog="zo-plot", description="Overlay zo-train runs into PNG plots.")
    p.add_argument("runs", nargs="+", help="run folders (with metrics.csv) or CSV files")
    p.add_argument("-o", "--out", default=None, help="output folder (default: the only run's folder, else ./plots)")
    p.add_argument("--smooth", type=int, default=1, help="moving average window of the training loss")
    args = p.parse_args(argv)
    from .train import require_extra

    require_extra("zo-plot", ("matplotlib",))
    out = args.out or (args.runs[0] if len(args.runs) == 1 and Path(args.runs[0]).is_dir() else "plots")
    try:
        for path in plot_runs(args.runs, out, args.smooth):
            print(path)
    except FileNotFoundError as e:
        sys.exit(f"zo-plot: error: {e}")


if __name__ == "__main__":
    main()
