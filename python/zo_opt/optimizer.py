"""ZOOptimizer: zeroth-order SGD (MeZO/SPSA) with fused, seeded, in-place passes."""
from __future__ import annotations

import inspect
import secrets
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from . import backends, noise
from .functional import check_params, noise_axpby_

ESTIMATORS = ("central", "forward")
NONFINITE = ("skip", "raise", "skip_silent")


@dataclass(frozen=True)
class StepRecord:
    """What replays a step anywhere (NOISE.md, "The step record").

    The update of group k was ``theta = (1 - lr_k*wd_k) * theta - lr_k * sum_i (g_i / q) z_i``,
    so ``zo_update_(params, seeds, -lr * grads / q)`` rebuilds it (without weight decay).
    """

    step: int
    seeds: list[int]
    grads: torch.Tensor  # projected gradients g_i, float32, on the loss device (no sync)
    lr: float  # of the first param group; group_lrs has them all
    eps: float
    weight_decay: float
    distribution: str
    estimator: str
    group_lrs: tuple[float, ...]
    group_weight_decays: tuple[float, ...]
    finite: torch.Tensor  # 0-d bool: False when the update was skipped (non-finite loss)

    @property
    def q(self) -> int:
        return len(self.seeds)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= 1")
    return value


def _takes_index(closure: Callable) -> bool:
    """A closure with a positional parameter receives the query index."""
    try:
        sig = inspect.signature(closure)
    except (TypeError, ValueError):
        return False
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD,
             inspect.Parameter.VAR_POSITIONAL)
    return any(p.kind in kinds for p in sig.parameters.values())


def _as_loss(value) -> torch.Tensor:
    """The loss as a float64 scalar: L+ - L- cancels most digits, so the difference of two
    float32 losses is taken exactly rather than rounded again."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"the closure returned a tensor of shape {tuple(value.shape)}; "
                             "it must return the scalar loss")
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(float(value), dtype=torch.float64)
    raise TypeError(f"the closure returned {type(value).__name__}; it must return the loss "
                    "(a scalar tensor or a float)")


def _resolve_group(group):
    if group is False:
        return None
    if group is None:
        if not (dist.is_available() and dist.is_initialized()):
            return None
        group = dist.group.WORLD
    return group if dist.get_world_size(group) > 1 else None


def _comm_device(group) -> torch.device:
    """NCCL moves CUDA tensors only; gloo takes CPU tensors."""
    if dist.get_backend(group) == dist.Backend.NCCL:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _broadcast_seed(seed: int, group) -> int:
    as_signed = seed - (1 << 64) if seed >= 1 << 63 else seed
    t = torch.tensor([as_signed], dtype=torch.int64, device=_comm_device(group))
    dist.broadcast(t, src=dist.get_global_rank(group, 0), group=group)
    return int(t.item()) & noise.MASK64


def _mean_over_ranks(grads: torch.Tensor, losses: torch.Tensor, group):
    """One all-reduce of the q projected gradients and the losses: the only traffic of a
    data-parallel step (a non-finite value on any rank makes every rank skip)."""
    flat = torch.cat([grads, losses]).to(_comm_device(group))
    dist.all_reduce(flat, op=dist.ReduceOp.SUM, group=group)
    flat = (flat / dist.get_world_size(group)).to(grads.device)
    return flat[:grads.numel()], flat[grads.numel():]


class ZOOptimizer(torch.optim.Optimizer):
    """Zeroth-order SGD: q seeded directions per step, forward passes only.

    Each step perturbs all parameters in place along ``z_i = z(seed_i)`` (NOISE.md), calls
    ``closure`` at ``theta +- eps*z_i`` (``estimator="central"``: 2q calls) or at ``theta``
    and ``theta + eps*z_i`` (``"forward"``: q+1 calls), and applies

        g_i = (L(theta + eps z_i) - L(theta - eps z_i)) / (2 eps)
        theta <- (1 - lr*wd) * theta - lr * (1/q) * sum_i g_i z_i

    Every pass is one fused, in-place launch over all parameters; restores are fused with the
    next perturbation and the last restore with the update (2q+1 passes for 2q evaluations).
    z is regenerated from its seed inside the kernels and never stored, so a step allocates
    nothing the size of a parameter; only ``momentum > 0`` keeps state, one buffer per
    parameter (``buf = momentum*buf + ghat + wd*theta; theta -= lr*buf``, as torch.optim.SGD).

    Args:
        params: parameters or param groups (each group may set ``lr``, ``weight_decay``,
            ``momentum``).
        lr: learning rate (>= 0).
        q: directions per step (>= 1).
        eps: perturbation size (> 0).
        distribution: ``"gaussian"`` or ``"rademacher"``.
        estimator: ``"central"`` or ``"forward"``.
        weight_decay: decoupled from the noise, applied in the update pass.
        momentum: ZO-SGD with momentum (costs one buffer per parameter).
        seed: 64-bit base seed; ``None`` draws one from the OS (saved in ``state_dict``).
            Direction seeds are ``noise.direction_seed(seed, step, i)``.
        backend: ``"auto"``, ``"torch"``, ``"cpu"``, ``"triton"`` or ``"cuda"``.
        nonfinite: what a non-finite loss does: ``"skip"`` restores the parameters and skips
            the update with a warning; ``"raise"`` restores them and raises FloatingPointError;
            ``"skip_silent"`` skips on the device with no warning and no host sync
            (``last_record.finite`` tells), so that a GPU step never waits for the GPU.
        process_group: data parallel over torch.distributed. ``None`` uses the default group
            when one is initialised (``False`` never does). Every rank evaluates the same
            directions on its own shard of the batch; per step the ranks all-reduce only the
            q projected gradients and the losses (O(q) floats), and apply identical updates.
            The base seed is broadcast from rank 0 at construction.

    ``step(closure)``: the closure runs under ``torch.no_grad()``, returns the loss, and may
    take one argument, the query index i in ``range(q)`` (both evaluations of direction i get
    the same i, so each direction can use its own mini-batch). Returns the mean of the
    evaluated losses. An exception in the closure restores the parameters before it
    propagates. No host sync per direction; one per step for the non-finite check, none
    with ``nonfinite="skip_silent"``.
    ``last_record`` holds the :class:`StepRecord` of the last step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, *, q: int = 1, eps: float = 1e-3,
                 distribution: str = "gaussian", estimator: str = "central",
                 weight_decay: float = 0.0, momentum: float = 0.0, seed: int | None = None,
                 backend: str = "auto", nonfinite: str = "skip", process_group=None):
        self.q = _positive_int("q", q)
        if not eps > 0:
            raise ValueError(f"Invalid eps: {eps!r}; it must be > 0")
        if estimator not in ESTIMATORS:
            raise ValueError(f"Invalid estimator: {estimator!r}; choose one of {ESTIMATORS}")
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}; choose one of {NONFINITE}")
        self.eps = float(eps)
        self.distribution = noise.check_distribution(distribution)
        self.estimator = estimator
        self.backend = backends.check_name(backend)
        self.nonfinite = nonfinite
        self.base_seed = secrets.randbits(64) if seed is None else noise.check_seed(seed)
        self.process_group = _resolve_group(process_group)
        if self.process_group is not None:
            self.base_seed = _broadcast_seed(self.base_seed, self.process_group)
        self.step_count = 0
        self.last_record: StepRecord | None = None
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        group = self.param_groups[-1]
        for name in ("lr", "weight_decay", "momentum"):
            value = group[name]
            if isinstance(value, torch.Tensor) or not value >= 0:
                raise ValueError(f"Invalid {name}: {value!r}; it must be a float >= 0")
        check_params(group["params"], name="params")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"a param group holds params on several devices {sorted(map(str, devices))}; "
                             "put each device's params in its own group")

    # -- the pass schedule -------------------------------------------------------------------

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _shift(self, params, offsets, old: tuple[int, float] | None, new: tuple[int, float] | None):
        """One pass: move theta from ``theta0 + old`` to ``theta0 + new`` ((seed, scale) pairs)."""
        if old is not None and new is not None and old[0] == new[0]:
            seeds, coeffs = [new[0]], [new[1] - old[1]]
        else:
            terms = ([(old[0], -old[1])] if old else []) + ([new] if new else [])
            seeds, coeffs = [s for s, _ in terms], [c for _, c in terms]
        if seeds:
            noise_axpby_(params, seeds, [1.0, *coeffs], distribution=self.distribution,
                         backend=self.backend, offsets=offsets)
        self._displacement = new

    def _evaluate(self, closure, i: int) -> torch.Tensor:
        return _as_loss(closure(i) if self._pass_index else closure())

    def _estimate(self, closure, params, offsets, seeds) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the 2q (or q+1) evaluations; returns (g, all losses). Leaves theta displaced
        by ``self._displacement``."""
        losses, grads = [], []
        if self.estimator == "forward":
            base = self._evaluate(closure, 0)
            losses.append(base)
        for i, seed in enumerate(seeds):
            self._shift(params, offsets, self._displacement, (seed, self.eps))
            plus = self._evaluate(closure, i)
            losses.append(plus)
            if self.estimator == "central":
                self._shift(params, offsets, self._displacement, (seed, -self.eps))
                minus = self._evaluate(closure, i)
                losses.append(minus)
                grads.append((plus - minus) / (2 * self.eps))
            else:
                grads.append((plus - base) / self.eps)
        return torch.stack(grads), torch.stack(losses)

    def _update(self, params, offsets, seeds, coeffs: torch.Tensor, ok: torch.Tensor) -> None:
        """The last pass per group: undo the displacement, then decay and step (SGD), or
        update the momentum buffers and step. ``ok`` masks the update on a non-finite loss."""
        disp_seed, disp_scale = self._displacement
        start = 0
        for group in self.param_groups:
            n = len(group["params"])
            ps, offs = params[start:start + n], offsets[start:start + n]
            start += n
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            dev = ps[0].device if ps else coeffs.device
            c, okd = coeffs.to(dev), ok.to(dev)
            if mu:
                self._shift(ps, offs, self._displacement, None)
                self._momentum_step(ps, offs, seeds, c, okd, lr, wd, mu)
                continue
            one = torch.ones((), device=dev)
            alpha = torch.where(okd, one * (1.0 - lr * wd), one)
            step = torch.where(okd, -lr * c, torch.zeros_like(c))
            undo = torch.zeros_like(c)
            undo[seeds.index(disp_seed)] = 1.0
            scales = torch.cat([alpha.reshape(1), step - alpha * disp_scale * undo])
            noise_axpby_(ps, seeds, scales, distribution=self.distribution,
                         backend=self.backend, offsets=offs)
        self._displacement = None

    def _momentum_step(self, ps, offs, seeds, c, ok, lr, wd, mu) -> None:
        bufs = []
        for p in ps:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs.append(state["momentum_buffer"])
        one = torch.ones((), device=c.device)
        keep = torch.where(ok, one * mu, one)
        noise_axpby_(bufs, seeds, torch.cat([keep.reshape(1), torch.where(ok, c, torch.zeros_like(c))]),
                     distribution=self.distribution, backend=self.backend, offsets=offs)
        if bool(ok):
            if wd:
                torch._foreach_add_(bufs, ps, alpha=wd)
            torch._foreach_add_(ps, bufs, alpha=-lr)

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:
        if closure is None:
            raise TypeError("ZOOptimizer.step needs a closure that returns the loss, e.g. "
                            "opt.step(lambda: loss_fn(model(x), y)); ZO estimates the gradient "
                            "from loss evaluations, it cannot use .grad")
        self._pass_index = _takes_index(closure)
        params = self._params()
        offsets = noise.offsets([p.numel() for p in params])
        seeds = [noise.direction_seed(self.base_seed, self.step_count, i) for i in range(self.q)]
        self._displacement = None
        try:
            grads, losses = self._estimate(closure, params, offsets, seeds)
        except BaseException:
            self._shift(params, offsets, self._displacement, None)
            raise
        if self.process_group is not None:
            grads, losses = _mean_over_ranks(grads, losses, self.process_group)
        ok = torch.isfinite(losses).all()
        self._update(params, offsets, seeds, grads / self.q, ok)
        self.last_record = StepRecord(
            step=self.step_count, seeds=seeds, grads=grads.float(), lr=self.param_groups[0]["lr"],
            eps=self.eps, weight_decay=self.param_groups[0]["weight_decay"],
            distribution=self.distribution, estimator=self.estimator,
            group_lrs=tuple(g["lr"] for g in self.param_groups),
            group_weight_decays=tuple(g["weight_decay"] for g in self.param_groups), finite=ok)
        self.step_count += 1
        if self.nonfinite != "skip_silent" and not bool(ok):
            message = (f"ZOOptimizer step {self.step_count - 1}: non-finite loss "
                       f"({losses.tolist()}); parameters restored, update skipped")
            if self.nonfinite == "raise":
                raise FloatingPointError(message)
            warnings.warn(message, RuntimeWarning, stacklevel=3)  # the caller of step()
        return losses.mean().float()

    # -- state ------------------------------------------------------------------------------

    def state_dict(self) -> dict:
        sd = super().state_dict()
        sd["zo"] = {"base_seed": self.base_seed, "step": self.step_count, "q": self.q,
                    "eps": self.eps, "distribution": self.distribution,
                    "estimator": self.estimator}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("this state_dict has no 'zo' entry; it was not saved by ZOOptimizer")
        super().load_state_dict(state_dict)
        self.base_seed = noise.check_seed(int(zo["base_seed"]))
        self.step_count = int(zo["step"])
