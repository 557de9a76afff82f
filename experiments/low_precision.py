"""ZO training in bfloat16: round-to-nearest vs exact restore + stochastic rounding vs float32.

A small model in the fine-tuning regime: linear least squares (256 x 64) whose weights sit
near ``--center`` (1: a bf16 ulp of 1/128 is ~13x the ZO update; 8: ~100x, as MeZO's
lr ~ 1e-6 is against weights ~ 0.02). Trained with ZOOptimizer (q=4, central) from the same
start in four ways:

* float32                                  the reference curve
* bfloat16, round to nearest               exact=False, stochastic_rounding=False
* bfloat16, exact restore only             exact=True, stochastic_rounding=False
* bfloat16, exact + stochastic rounding    the default for 16-bit parameters

    python experiments/low_precision.py [--center 1] [--steps 1500] [--seeds 3] [--out runs/low_precision]

Writes ``curves.csv`` (step, run, seed, loss) and ``curves.png`` (mean over seeds); prints
the final losses.
"""
from __future__ import annotations

import argparse
import csv
from pathlib import Path

import torch

from zo_opt import ZOOptimizer

RUNS = {  # name: (dtype, exact, stochastic_rounding)
    "float32": (torch.float32, False, False),
    "bfloat16, round to nearest": (torch.bfloat16, False, False),
    "bfloat16, exact restore only": (torch.bfloat16, True, False),
    "bfloat16, exact + stochastic rounding": (torch.bfloat16, True, True),
}


def problem(seed, center, rows=256, dim=64):
    gen = torch.Generator().manual_seed(seed)
    A = torch.randn(rows, dim, generator=gen) / dim**0.5
    b = A @ (center + torch.randn(dim, generator=gen))
    return A, b, torch.full((dim,), center)


def train(dtype, exact, sr, steps, lr, q, seed, center):
    A, b, x0 = problem(seed, center)
    x = x0.to(dtype)
    opt = ZOOptimizer([x], lr=lr, q=q, eps=1e-2, seed=seed, exact=exact, stochastic_rounding=sr)
    loss = lambda: ((A @ x.float() - b) ** 2).mean()  # noqa: E731
    curve = [(0, float(loss()))]
    for step in range(1, steps + 1):
        opt.step(loss)
        if step % 25 == 0:
            curve.append((step, float(loss())))
    return curve


def plot(curves: dict, path: Path, center: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for name, runs in curves.items():
        steps = [s for s, _ in runs[0]]
        mean = [sum(r[i][1] for r in runs) / len(runs) for i in range(len(steps))]
        ax.plot(steps, mean, label=name)
    ax.set_xlabel("ZO step (q=4, central)")
    ax.set_ylabel(f"training loss (mean of {len(next(iter(curves.values())))} seeds)")
    ax.set_yscale("log")
    ax.set_title(f"ZO-SGD in bf16, least squares, weights near {center:g}")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--lr", type=float, default=1e-2)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--center", type=float, default=1.0,
                    help="where the weights start (their bf16 ulp is center / 128)")
    ap.add_argument("--out", default="runs/low_precision")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: [train(*cfg, args.steps, args.lr, args.q, seed, args.center)
                     for seed in range(args.seeds)]
              for name, cfg in RUNS.items()}
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "run", "seed", "loss"])
        for name, runs in curves.items():
            for seed, curve in enumerate(runs):
                w.writerows((s, name, seed, f"{v:.6f}") for s, v in curve)
    try:
        plot(curves, out / "curves.png", args.center)
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'zo-opt[train]')")
    for name, runs in curves.items():
        finals = ", ".join(f"{r[-1][1]:.4f}" for r in runs)
        print(f"{name:40s} loss {runs[0][0][1]:.4f} -> {finals}")
    return curves


if __name__ == "__main__":
    main()
