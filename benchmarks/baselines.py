"""The two loops zo-opt is measured against, written by us from the published algorithms.

* ``MezoLoop``: MeZO (Malladi et al., 2023; princeton-nlp/MeZO), the op sequence of
  shared/reference/ANCHORS.md: per pass ``torch.manual_seed(seed)`` then, per tensor,
  ``z = torch.normal(0, 1, size)`` and the out-of-place ``p.data = p.data + scale * z``;
  ``g = ((L+ - L-) / (2 eps)).item()``; the update re-seeds and, per tensor,
  ``p.data = p.data - lr * (g * z + wd * p.data)`` (no decay on biases and LayerNorms).
  MeZO has q = 1; for q > 1 every direction is evaluated at the same theta and the update
  regenerates each z_i in turn (the plain MeZO/SPSA average that zo-opt computes).
* ``OldLoop``: the old research repo (shared/reference/SEED.md): a clone of all parameters,
  an accumulator the size of the parameters, each direction regenerated three times per query
  with ``torch.randn_like`` in a Python loop over tensors, and a host sync per direction.

Both take ``draw(params, seed)``, an iterator of one z per tensor: torch's global RNG by
default, or any other source (the smoke tests pass zo_opt's reference noise to check that the
loops compute the same update as ZOOptimizer).
"""
from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

Draw = Callable[[Sequence[torch.Tensor], int], Iterator[torch.Tensor]]


def torch_normal(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """MeZO's noise: re-seed torch's global RNG, then ``torch.normal`` per tensor."""
    torch.manual_seed(seed)
    for p in params:
        yield torch.normal(mean=0.0, std=1.0, size=p.shape, device=p.device, dtype=p.dtype)


def torch_randn_like(params: Sequence[torch.Tensor], seed: int) -> Iterator[torch.Tensor]:
    """The old repo's noise: re-seed, then ``torch.randn_like`` per tensor."""
    torch.manual_seed(seed)
    for p in params:
        yield torch.randn_like(p)


def mezo_perturb_(params: Sequence[torch.Tensor], seed: int, scale: float,
                  draw: Draw = torch_normal) -> None:
    """One MeZO pass: ``p.data = p.data + scale * z`` per tensor (out of place)."""
    for p, z in zip(params, draw(params, seed)):
        p.data = p.data + scale * z


def old_perturb_(params: Sequence[torch.Tensor], seed: int, scale: float,
                 draw: Draw = torch_randn_like) -> None:
    """One pass of the old loop: ``p.data.add_(scale * z)`` per tensor."""
    for p, z in zip(params, draw(params, seed)):
        p.data.add_(scale * z)


def _decays(p: torch.Tensor) -> bool:
    """MeZO skips weight decay on biases and LayerNorm weights (the 1-D tensors here)."""
    return p.ndim >= 2


class _SeededLoop:
    def __init__(self, params, lr: float, q: int, eps: float, seed: int, draw: Draw):
        self.params = list(params)
        self.lr, self.q, self.eps = lr, q, eps
        self.seed, self.draw = seed, draw
        self.step_count = 0

    def seeds(self) -> list[int]:
        """A fresh seed per step (as MeZO draws one); here deterministic per (step, direction)."""
        return [self.seed + 1_000_003 * self.step_count + i for i in range(self.q)]


class MezoLoop(_SeededLoop):
    """MeZO's step (central difference, q directions at the same theta)."""

    def __init__(self, params, lr: float, *, q: int = 1, eps: float = 1e-3,
                 weight_decay: float = 0.0, seed: int = 0, draw: Draw = torch_normal):
        super().__init__(params, lr, q, eps, seed, draw)
        self.wd = weight_decay

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor],
             seeds: Sequence[int] | None = None) -> torch.Tensor:
        seeds = list(self.seeds() if seeds is None else seeds)
        grads, losses = [], []
        for seed in seeds:
            mezo_perturb_(self.params, seed, self.eps, self.draw)
            plus = closure()
            mezo_perturb_(self.params, seed, -2 * self.eps, self.draw)
            minus = closure()
            grads.append(((plus - minus) / (2 * self.eps)).item())
            mezo_perturb_(self.params, seed, self.eps, self.draw)
            losses += [plus, minus]
        for i, (seed, g) in enumerate(zip(seeds, grads)):
            c = g / len(seeds)
            for p, z in zip(self.params, self.draw(self.params, seed)):
                if i == 0 and _decays(p):
                    p.data = p.data - self.lr * (c * z + self.wd * p.data)
                else:
                    p.data = p.data - self.lr * (c * z)
        self.step_count += 1
        return torch.stack(losses).mean()


class OldLoop(_SeededLoop):
    """The old repo's step: clone, accumulator, three regenerations per direction."""

    def __init__(self, params, lr: float, *, q: int = 1, eps: float = 1e-3, seed: int = 0,
                 draw: Draw = torch_randn_like):
        super().__init__(params, lr, q, eps, seed, draw)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor],
             seeds: Sequence[int] | None = None) -> torch.Tensor:
        seeds = list(self.seeds() if seeds is None else seeds)
        theta0 = [p.detach().clone() for p in self.params]
        acc = [torch.zeros_like(p) for p in self.params]
        losses = []
        for seed in seeds:
            for p, z in zip(self.params, self.draw(self.params, seed)):  # regeneration 1
                p.data.add_(self.eps * z)
            plus = closure()
            for p, p0, z in zip(self.params, theta0, self.draw(self.params, seed)):  # 2
                p.data.copy_(p0)
                p.data.sub_(self.eps * z)
            minus = closure()
            g = ((plus - minus) / (2 * self.eps)).item()  # host sync per direction
            for a, z in zip(acc, self.draw(self.params, seed)):  # 3
                a.add_(g / len(seeds) * z)
            for p, p0 in zip(self.params, theta0):
                p.data.copy_(p0)
            losses += [plus, minus]
        for p, a in zip(self.params, acc):
            p.data.sub_(self.lr * a)
        self.step_count += 1
        return torch.stack(losses).mean()


def copy_pass(src: torch.Tensor, dst: torch.Tensor) -> None:
    """The bandwidth ceiling of a pass: read and write the same bytes once."""
    dst.copy_(src)
