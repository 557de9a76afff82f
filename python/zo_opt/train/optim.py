"""MuDAMW: Adam moments, then a Newton-Schulz orthogonalisation of 2-D updates (Muon-style),
with decoupled weight decay. The old script's ``--optimizer mudamw``.

For a 2-D parameter the Adam direction ``m_hat / (sqrt(v_hat) + eps)`` is replaced by its
nearest semi-orthogonal matrix (5 quintic Newton-Schulz iterations, Muon's coefficients),
scaled by ``0.2 * sqrt(max(rows, cols))`` so its RMS matches Adam's (about 0.2). Other tensors
(biases, LayerNorms) and groups with ``orthogonalize=False`` (embeddings) take the Adam step.
"""
from __future__ import annotations

import torch


def newton_schulz(G: torch.Tensor, steps: int = 5) -> torch.Tensor:
    a, b, c = 3.4445, -4.7750, 2.0315
    X = G.float()
    transposed = X.shape[0] > X.shape[1]
    if transposed:
        X = X.T
    X = X / (X.norm() + 1e-7)
    for _ in range(steps):
        A = X @ X.T
        X = a * X + (b * A + c * A @ A) @ X
    return X.T if transposed else X


class MuDAMW(torch.optim.Optimizer):
    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0,
                 ns_steps=5, orthogonalize=True):
        if lr < 0:
            raise ValueError(f"Invalid learning rate: {lr}")
        if not 0 <= betas[0] < 1 or not 0 <= betas[1] < 1:
            raise ValueError(f"Invalid betas: {betas}")
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay,
                                      ns_steps=ns_steps, orthogonalize=orthogonalize))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                st = self.state[p]
                if not st:
                    st["step"] = torch.zeros((), dtype=torch.float32)
                    st["exp_avg"] = torch.zeros_like(p)
                    st["exp_avg_sq"] = torch.zeros_like(p)
                st["step"] += 1
                t = st["step"].item()
                st["exp_avg"].lerp_(p.grad, 1 - b1)
                st["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                update = (st["exp_avg"] / (1 - b1 ** t)) / ((st["exp_avg_sq"] / (1 - b2 ** t)).sqrt() + group["eps"])
                if group["orthogonalize"] and p.ndim == 2:
                    update = newton_schulz(update, group["ns_steps"]).to(p.dtype) * (0.2 * max(p.shape) ** 0.5)
                if group["weight_decay"]:
                    p.mul_(1 - group["lr"] * group["weight_decay"])
                p.add_(update, alpha=-group["lr"])
        return loss
