"""How many exact-mode codes are non-zero (docs/EXACT.md, "What it costs"): the case for a
sparse code.

Runs the reference exact pass (zo_opt.exact, the contract every backend matches) once with
encode on N(0, std) weights, as the optimizer's first pass does (+eps z), and prints per
distribution and dtype: the side table's share, the share of non-zero codes, and the bytes a
sparse code of 4-byte (position, code) entries would move per element and pass (read and
written) against the dense code's 2.

    python experiments/code_sparsity.py [--n 4000000] [--std 0.02] [--eps 1e-3]
"""
from __future__ import annotations

import argparse

import torch

from zo_opt import exact, noise

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
ENTRY_BYTES = 4  # a (position in tile, code) pair


def code_shares(n: int, std: float, eps: float, dtype: torch.dtype, distribution: str,
                seed: int = 0) -> tuple[float, float]:
    """(table share, non-zero code share) after one encoding pass +eps z over n weights."""
    gen = torch.Generator().manual_seed(seed)
    theta = (torch.randn(n, generator=gen) * std).to(dtype)
    params, offsets = [theta], [0]
    table = exact.build_table(params, offsets, exact.tau(eps, distribution))
    codes = torch.zeros(n, dtype=torch.int8)
    exact.exact_pass_(params, offsets, [noise.direction_seed(seed, 0, 0)],
                      torch.tensor([1.0, eps]), 0, codes, 0, table, encode=True,
                      rounding_seed=None, distribution=distribution)
    esc = codes == exact.ESC
    return esc.float().mean().item(), ((codes != 0) & ~esc).float().mean().item()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=4_000_000)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--eps", type=float, default=1e-3)
    args = ap.parse_args()
    print(f"N(0, {args.std}) weights, eps = {args.eps}, {args.n} elements")
    print("| distribution | dtype | side table | non-zero codes | sparse code, bytes/element/pass |")
    print("|---|---|---|---|---|")
    for distribution in noise.DISTRIBUTIONS:
        for name, dtype in DTYPES.items():
            table, nonzero = code_shares(args.n, args.std, args.eps, dtype, distribution)
            print(f"| {distribution} | {name} | {table:.2%} | {nonzero:.2%} | "
                  f"{2 * nonzero * ENTRY_BYTES:.2f} (dense: 2) |")


if __name__ == "__main__":
    main()
