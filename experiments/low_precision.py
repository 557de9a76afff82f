"""ZO training in bfloat16: round-to-nearest vs exact restore + stochastic rounding vs float32.

A small MLP classifier (4 Gaussian clusters in 32 dimensions, 2.3K parameters) trained with
ZOOptimizer from the same initial weights in three ways:

* float32                                   the reference curve
* bfloat16, round to nearest                (exact=False, stochastic_rounding=False): updates
                                            below half an ulp vanish, restores drift
* bfloat16, exact restore + stochastic rounding (the default for 16-bit parameters)

    python experiments/low_precision.py [--steps 600] [--out runs/low_precision]

Writes ``curves.csv`` (step, run, training loss) and ``curves.png``; prints the final losses.
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
    "bfloat16, exact + stochastic rounding": (torch.bfloat16, True, True),
}


def data(n=2048, dim=32, classes=4, seed=0):
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(classes, dim, generator=gen) * 1.5
    y = torch.randint(0, classes, (n,), generator=gen)
    x = centers[y] + torch.randn(n, dim, generator=gen)
    return x, y


def init(dim=32, hidden=64, classes=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(dim, hidden, generator=gen) / dim**0.5, torch.zeros(hidden),
            torch.randn(hidden, classes, generator=gen) / hidden**0.5, torch.zeros(classes)]


def loss_fn(params, x, y):
    w1, b1, w2, b2 = (p.float() for p in params)
    return torch.nn.functional.cross_entropy(torch.relu(x @ w1 + b1) @ w2 + b2, y)


def train(dtype, exact, sr, steps, lr, q, seed):
    x, y = data()
    params = [p.to(dtype) for p in init()]
    opt = ZOOptimizer(params, lr=lr, q=q, eps=1e-2, seed=seed, exact=exact,
                      stochastic_rounding=sr)
    curve = []
    for step in range(steps):
        opt.step(lambda: loss_fn(params, x, y))
        if step % 10 == 0 or step == steps - 1:
            curve.append((step, float(loss_fn(params, x, y))))
    return curve


def plot(curves: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, curve in curves.items():
        ax.plot([s for s, _ in curve], [v for _, v in curve], label=name)
    ax.set_xlabel("ZO step (q=4, central)")
    ax.set_ylabel("training loss")
    ax.set_title("ZO-SGD in bfloat16 vs float32 (MLP, 4 classes)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--q", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="runs/low_precision")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    curves = {name: train(*cfg, args.steps, args.lr, args.q, args.seed) for name, cfg in RUNS.items()}
    with open(out / "curves.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["step", "run", "loss"])
        for name, curve in curves.items():
            w.writerows((s, name, f"{v:.6f}") for s, v in curve)
    try:
        plot(curves, out / "curves.png")
    except ImportError:
        print("matplotlib not installed: no plot (pip install 'zo-opt[train]')")
    for name, curve in curves.items():
        print(f"{name:40s} loss {curve[0][1]:.4f} -> {curve[-1][1]:.4f}")
    return curves


if __name__ == "__main__":
    main()
