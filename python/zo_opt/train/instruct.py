r"""Instruct: ZO directions guided by a backprop gradient, with a normalised update.

Notation: theta the d trained parameters; every ``bp_interval`` steps a BP gradient g is
taken and kept as the unit vector ``gh = g / |g|`` (one buffer the size of the trained
parameters). z_i are the optimizer's seeded directions (NOISE.md; ``|z_i|^2 ~ d``,
``z_i . z_j ~ 0`` for i != j, ``z_i . gh ~ 0``, all up to O(d^-1/2) relative).

Directions, cosine c = ``--instruct_cosine``::

    u_i = c sqrt(d) gh + sqrt(1 - c^2) z_i        |u_i|^2 ~ d,  cos(u_i, gh) ~ c

so u_i has the size of a plain ZO direction whatever |g| is (the old code multiplied by
|g|, then by |g|^3 in the update). Central differences along u_i::

    g_i = (L(theta + eps u_i) - L(theta - eps u_i)) / (2 eps)       (~ grad L . u_i)

ZO estimate in the span of gh and the z_i (never materialised, kept as coefficients)::

    v = (1/q) sum_i g_i u_i = a gh + sum_i b_i z_i,   a = c sqrt(d) mean(g_i),  b_i = sqrt(1-c^2) g_i / q
    |v|^2 ~ a^2 + d sum_i b_i^2

Blend, lambda = ``--instruct_bp_weight`` on steps that took a fresh BP gradient, 0 otherwise
(the directions still lean on the last gh)::

    D = lambda gh + (1 - lambda) v / |v|,     |D|^2 ~ (lambda + (1-lambda) a/|v|)^2 + (1-lambda)^2 d sum b_i^2 / |v|^2
    theta <- theta - lr sqrt(d) D / |D|       (per-coordinate RMS of the update = lr)

Every term is a ratio of quantities linear in the loss, so multiplying the loss (hence g and
every g_i) by k > 0 leaves the update unchanged: its scale does not depend on |g|
(tests/test_instruct.py checks this). With ``--optimizer adam|mudamw`` the unit-RMS vector
``sqrt(d) D / |D|`` is written into ``.grad`` and the torch optimizer steps.

Cost per step: 2q forwards (+1 forward and backward on BP steps); each perturbation is one
noise pass plus one axpy with gh; the restore is fused with the update.
"""
from __future__ import annotations

import math

import torch

from .. import functional as F
from ..noise import direction_seed


class NoBPGradient(RuntimeError):
    """A step with no usable BP gradient: the trainer reports it in one line."""


class Instruct:
    def __init__(self, params, *, lr, q, eps, cosine=0.9, bp_weight=0.5, distribution="gaussian",
                 seed=0, backend="auto", torch_optimizer=None):
        # q = 0 would apply a NaN update before failing, a cosine past 1 fail mid-step
        for name, value, ok, want in (("q", q, q >= 1, "an int >= 1"), ("eps", eps, eps > 0, "> 0"),
                                      ("lr", lr, lr >= 0, ">= 0"),
                                      ("cosine", cosine, 0 <= cosine <= 1, "in [0, 1]"),
                                      ("bp_weight", bp_weight, 0 <= bp_weight <= 1, "in [0, 1]")):
            if not ok:
                raise ValueError(f"{name} must be {want}, got {value!r}")
        self.params, self.lr, self.q, self.eps = list(params), lr, q, eps
        self.c, self.lam, self.distribution, self.seed, self.backend = cosine, bp_weight, distribution, seed, backend
        self.torch_optimizer = torch_optimizer
        self.d = sum(p.numel() for p in self.params)
        self.ghat: list[torch.Tensor] | None = None
        self.refused_norm: float | None = None  # |g| of the last gradient, if set_gradient refused it
        self.last_grads = None  # the g_i of the last step

    def _noise(self, seeds, coeffs, self_scale=1.0):
        F.noise_axpby_(self.params, seeds, [self_scale, *coeffs], distribution=self.distribution, backend=self.backend)

    def set_gradient(self, grads: list[torch.Tensor]) -> float:
        """Keep gh = g / |g| (reusing the gradient buffers); return |g|."""
        norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads])).item()
        if not math.isfinite(norm) or norm == 0:
            self.refused_norm = norm
            return norm
        torch._foreach_div_(grads, norm)
        self.ghat, self.refused_norm = grads, None
        return norm

    @torch.no_grad()
    def step(self, t: int, closure, fresh_bp: bool) -> torch.Tensor:
        """One step at step index t; closure(i) returns the loss of query i's batch."""
        if self.ghat is None:
            if self.refused_norm is not None:
                raise NoBPGradient(f"Instruct.step: no BP gradient accepted yet, the last one was "
                                   f"non-finite or zero (|g| = {self.refused_norm}); check the "
                                   "model's loss on its BP batch")
            raise RuntimeError("Instruct.step before any BP gradient (call set_gradient first)")
        q, eps, c, d = self.q, self.eps, self.c, self.d
        alpha, beta = eps * c * math.sqrt(d), eps * math.sqrt(1 - c * c)
        seeds = [direction_seed(self.seed, t, i) for i in range(q)]  # NOISE.md's SplitMix64 chain
        losses = []
        g = torch.empty(q, dtype=torch.float64)
        for i, s in enumerate(seeds):
            torch._foreach_add_(self.params, self.ghat, alpha=alpha)
            self._noise([s], [beta])
            lp = closure(i)
            torch._foreach_add_(self.params, self.ghat, alpha=-2 * alpha)
            self._noise([s], [-2 * beta])
            lm = closure(i)
            if i < q - 1:  # restore (the last restore is fused with the update)
                torch._foreach_add_(self.params, self.ghat, alpha=alpha)
                self._noise([s], [beta])
            losses += [lp.detach(), lm.detach()]
            g[i] = (lp.double() - lm.double()).item() / (2 * eps)
        self.last_grads = g.float()
        loss = torch.stack(losses).float().mean()
        if not torch.isfinite(g).all():  # restore only
            torch._foreach_add_(self.params, self.ghat, alpha=alpha)
            self._noise([seeds[-1]], [beta])
            return loss
        a = c * math.sqrt(d) * g.mean().item()
        b = (math.sqrt(1 - c * c) * g / q).tolist()
        v_norm = math.sqrt(a * a + d * sum(x * x for x in b))
        lam = self.lam if fresh_bp and self.refused_norm is None else 0.0  # a refused g kept the old gh
        if v_norm > 0:
            coef_g, coef_z = lam + (1 - lam) * a / v_norm, [(1 - lam) * x / v_norm for x in b]
        else:
            coef_g, coef_z = lam, [0.0] * q
        D_norm = math.sqrt(coef_g ** 2 + d * sum(x * x for x in coef_z))
        scale = math.sqrt(d) / D_norm if D_norm > 0 else 0.0
        if self.torch_optimizer is None:  # restore fused with theta -= lr sqrt(d) D/|D|
            upd = -self.lr * scale
            torch._foreach_add_(self.params, self.ghat, alpha=alpha + upd * coef_g)
            coeffs = [upd * x for x in coef_z]
            coeffs[-1] += beta
            self._noise(seeds, coeffs)
        else:  # restore, then .grad = sqrt(d) D/|D| and the torch optimizer steps
            torch._foreach_add_(self.params, self.ghat, alpha=alpha)
            self._noise([seeds[-1]], [beta])
            grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
            for p, gr in zip(self.params, grads):
                p.grad = gr
            torch._foreach_zero_(grads)
            torch._foreach_add_(grads, self.ghat, alpha=scale * coef_g)
            F.zo_update_(grads, seeds, [scale * x for x in coef_z], distribution=self.distribution, backend=self.backend)
            self.torch_optimizer.step()
        return loss

    def state_dict(self):
        return {"ghat": [g.clone() for g in self.ghat] if self.ghat is not None else None}

    def load_state_dict(self, state):
        if state["ghat"] is not None:
            self.ghat = [g.to(p.device) for g, p in zip(state["ghat"], self.params)]
