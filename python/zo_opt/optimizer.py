"""ZOOptimizer: zeroth-order SGD (MeZO/SPSA) with fused, seeded, in-place passes."""
from __future__ import annotations

import inspect
import math
import numbers
import secrets
import types
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable

import torch
import torch.distributed as dist

from . import backends, exact as exact_mod, noise, nonfinite as nonfinite_mod
from .functional import Prepared, check_params, seeds_on, shared_memory

ESTIMATORS = ("central", "forward")
NONFINITE = ("skip", "raise", "skip_silent")


@dataclass(frozen=True)
class StepRecord:
    """What replays a step anywhere (NOISE.md, "The step record").

    The update of group k was ``theta = (1 - lr_k*wd_k) * theta - lr_k * sum_i (g_i / q) z_i``,
    so ``zo_update_(params, seeds, -lr * grads / q)`` rebuilds it (without weight decay).
    """

    step: int
    seeds: list[int] | torch.Tensor  # a tensor (uint64 bits as int64) when capturable
    grads: torch.Tensor  # projected gradients g_i, float32, on the loss device (no sync)
    lr: float  # of the first param group; group_lrs has them all
    eps: float
    weight_decay: float
    distribution: str
    estimator: str
    group_lrs: tuple[float, ...]
    group_weight_decays: tuple[float, ...]
    finite: torch.Tensor  # 0-d bool: False when the update was skipped (non-finite loss)
    rounding_seed: int | None = None  # the update's stochastic-rounding stream, if any

    @property
    def q(self) -> int:
        return len(self.seeds)


def _positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"Invalid {name}: {value!r}; it must be an integer >= 1")
    return value


def _finite_eps(value) -> float:
    """An infinite eps would leave theta at inf - inf = nan after the restore."""
    if not isinstance(value, numbers.Real) and not isinstance(value, torch.Tensor):
        value = math.nan
    if not 0 < value < math.inf:
        raise ValueError(f"Invalid eps: {value!r}; it must be a finite float > 0")
    return float(value)


def _frozen_among_trained(groups: list[dict]) -> tuple[int, int] | None:
    """A (group, index) param with requires_grad=False in a list that also has trainable
    ones (a model with frozen layers): torch's optimizers skip it, having no gradient for it,
    but a ZO pass moves every param it is given. None when all or none require grad (plain
    tensors, which the functional API and tests pass, require none)."""
    flags = [(p.requires_grad, g, k) for g, group in enumerate(groups)
             for k, p in enumerate(group["params"])]
    if any(f for f, _, _ in flags):
        return next(((g, k) for f, g, k in flags if not f), None)
    return None


def _warn_on_other_settings(saved: dict, own: dict) -> None:
    """A state loaded into an optimizer made with other settings (q, eps, ...): they stay this
    optimizer's, which may be meant (a new q for the rest of a run), but the run then differs
    from the one that saved it, so it is said."""
    other = {k: saved[k] for k, v in own.items() if k in saved and saved[k] != v}
    if other:
        warnings.warn("load_state_dict: the state was saved with "
                      + ", ".join(f"{k}={v!r}" for k, v in other.items())
                      + "; this optimizer keeps its own "
                      + ", ".join(f"{k}={own[k]!r}" for k in other)
                      + " (pass the saved values to resume the same run)", stacklevel=3)


def _takes_index(closure: Callable) -> bool:
    """A closure with a positional parameter receives the query index. A plain function
    answers from its code object, as ``inspect.signature`` would, in a twentieth of the time
    (this runs before every step's first launch)."""
    if (type(closure) is types.FunctionType and not hasattr(closure, "__wrapped__")
            and not hasattr(closure, "__signature__")):
        code = closure.__code__
        return bool(code.co_argcount or code.co_flags & inspect.CO_VARARGS)
    return _signature_takes_index(closure)


def _signature_takes_index(closure: Callable) -> bool:
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
        if value.is_complex():  # the cast below would keep the real part, with only a warning
            raise ValueError(f"the closure returned a {value.dtype} loss; it must be real")
        return value.detach().reshape(()).to(torch.float64)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):  # numpy scalars too
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
        nonfinite: what a non-finite loss does: ``"skip"`` (the default) restores the
            parameters and skips the update, with a warning that needs no host sync (on a GPU
            it comes from a later ``step()`` call, once the step's flag has reached the host:
            zo_opt/nonfinite.py); ``"raise"`` restores them and raises FloatingPointError (one
            host sync a step, for the flag); ``"skip_silent"`` skips with no warning
            (``last_record.finite`` tells).
        exact: restore the parameters bit for bit after each direction (docs/EXACT.md): one
            byte per parameter of codes plus a small side table. ``None`` (the default) turns
            it on when a parameter is float16 or bfloat16, where round-to-nearest drifts
            (not with ``capturable=True``: the side table is sized on the host).
        stochastic_rounding: store the update of float16/bfloat16 parameters with unbiased
            stochastic rounding from the step's own Philox stream (replayable from the
            record); ``None`` (the default) turns it on when a parameter is float16 or
            bfloat16, where round-to-nearest drops updates below half an ulp.
        capturable: keep the whole step on the device so that it can be captured in a CUDA
            graph (see "CUDA graphs" in the README): the step counter lives on the device and
            the direction seeds are derived there, every scale stays a device tensor, and
            ``last_record.seeds`` is a device tensor. Needs one device, ``momentum=0``, no
            process group, and the non-finite check on the device (``nonfinite`` defaults to
            ``"skip_silent"``). ``lr`` and ``weight_decay`` are read when the graph is captured.
        process_group: data parallel over torch.distributed. ``None`` uses the default group
            when one is initialised (``False`` never does). Every rank evaluates the same
            directions on its own shard of the batch; per step the ranks all-reduce only the
            q projected gradients and the losses (O(q) floats), and apply identical updates.
            The base seed is broadcast from rank 0 at construction.

    ``step(closure)``: the closure runs under ``torch.no_grad()``, returns the loss, and may
    take one argument, the query index i in ``range(q)`` (both evaluations of direction i get
    the same i, so each direction can use its own mini-batch). Returns the mean of the
    evaluated losses. An exception in the closure restores the parameters before it
    propagates. A step on a GPU does not wait for the GPU (the caller syncs when it reads
    the loss), except with ``nonfinite="raise"``, with ``momentum > 0`` (the buffers step only
    on a finite loss, decided on the host) and in exact mode (its side table is sized on the
    host): one sync a step.
    ``last_record`` holds the :class:`StepRecord` of the last step.
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, *, q: int = 1, eps: float = 1e-3,
                 distribution: str = "gaussian", estimator: str = "central",
                 weight_decay: float = 0.0, momentum: float = 0.0, seed: int | None = None,
                 backend: str = "auto", nonfinite: str | None = None,
                 exact: bool | None = None, stochastic_rounding: bool | None = None,
                 capturable: bool = False, process_group=None):
        self.q = _positive_int("q", q)
        self.eps = _finite_eps(eps)
        if estimator not in ESTIMATORS:
            raise ValueError(f"Invalid estimator: {estimator!r}; choose one of {ESTIMATORS}")
        if nonfinite is None:
            nonfinite = "skip_silent" if capturable else "skip"
        if nonfinite not in NONFINITE:
            raise ValueError(f"Invalid nonfinite: {nonfinite!r}; choose one of {NONFINITE}")
        if capturable and nonfinite != "skip_silent":
            raise ValueError(f"capturable=True needs nonfinite='skip_silent' (got {nonfinite!r}): "
                             "the other modes read the loss on the host, which a CUDA graph cannot")
        self.distribution = noise.check_distribution(distribution)
        self.estimator = estimator
        self.backend = backends.check_name(backend)
        self.nonfinite = nonfinite
        self.base_seed = secrets.randbits(64) if seed is None else noise.check_seed(seed)
        self.process_group = _resolve_group(process_group)
        if self.process_group is not None:
            self.base_seed = _broadcast_seed(self.base_seed, self.process_group)
        if capturable and self.process_group is not None:
            raise ValueError("capturable=True does not take a process group yet: pass "
                             "process_group=False, or capturable=False for data parallel")
        self.capturable = bool(capturable)
        self.step_count = 0
        self.last_record: StepRecord | None = None
        self._plans: dict[tuple[str, int], Prepared] = {}
        self._layout = None  # (key, groups, devices): see _groups
        self._constants: dict[tuple, torch.Tensor] = {}
        self._prefetched = None  # (key, seeds, seeds by device) of the next step
        self._warnings = nonfinite_mod.DeferredWarnings()
        self._built = False  # the groups' joint checks run once all are in (_check_joint)
        defaults = dict(lr=lr, weight_decay=weight_decay, momentum=momentum)
        super().__init__(params, defaults)
        if self.capturable:
            devices = {p.device for p in self._params()}
            if len(devices) != 1:
                raise ValueError(f"capturable=True needs every param on one device; got {sorted(map(str, devices))}")
            if any(g["momentum"] for g in self.param_groups):
                raise ValueError("capturable=True supports momentum=0 only")
            self._step_t = torch.zeros((), dtype=torch.int64, device=devices.pop())
        low = any(p.dtype in (torch.float16, torch.bfloat16) for p in self._params())
        self.exact = (low and not self.capturable) if exact is None else bool(exact)
        # the momentum step stores theta - lr * buf round-to-nearest: no default rounding there
        rounds = low and not any(g["momentum"] for g in self.param_groups)
        self.stochastic_rounding = rounds if stochastic_rounding is None else bool(stochastic_rounding)
        if self.capturable and self.exact:
            raise ValueError("capturable=True needs exact=False: the exact mode's side table "
                             "is sized on the host each step")
        self._check_joint(0)
        self._built = True
        self._codes: dict[int, torch.Tensor] = {}
        self._tables: dict[int, exact_mod.Table] = {}

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1])
            if self._built:
                self._check_joint(len(self.param_groups) - 1)
        except Exception:
            self.param_groups.pop()  # a refused group must not stay for the next step to run
            raise

    def _check_group(self, group: dict) -> None:
        for name in ("lr", "weight_decay", "momentum"):
            value = group[name]
            if not isinstance(value, numbers.Real) or not 0 <= value < math.inf:
                raise ValueError(f"Invalid {name}: {value!r}; it must be a finite float >= 0")
        check_params(group["params"], name="params")
        devices = {p.device for p in group["params"]}
        if len(devices) > 1:
            raise ValueError(f"a param group holds params on several devices {sorted(map(str, devices))}; "
                             "put each device's params in its own group")

    def _check_joint(self, first: int) -> None:
        """The checks across params and groups (run again when the layout changes). Groups
        ``first`` on against exact and stochastic_rounding: the exact pass, and a rounded
        store over a group with 16-bit params, take float32, float16 and bfloat16 only
        (another dtype failed mid-step, with the others already displaced), and the momentum
        step has no rounded store. No two params, in any group, may share memory: a pass would
        move it twice (z the sum of two directions, which a replay on the model does not
        apply, and exact mode does not restore). No frozen param beside trainable ones
        (_frozen_among_trained)."""
        frozen = _frozen_among_trained(self.param_groups)
        if frozen is not None:
            raise ValueError(f"param {frozen[1]} of group {frozen[0]} has requires_grad=False beside "
                             "params that require grad: ZO moves every param it is given (there is "
                             "no gradient to skip it by); pass only the params to train, e.g. "
                             "[p for p in model.parameters() if p.requires_grad]")
        where = [(g, k) for g, group in enumerate(self.param_groups) for k in range(len(group["params"]))]
        shared = shared_memory([p for group in self.param_groups for p in group["params"]])
        if shared is not None:
            (g0, k0), (g1, k1) = where[shared[0]], where[shared[1]]
            raise ValueError(f"param {k1} of group {g1} shares memory with param {k0} of group {g0} "
                             "(the same tensor twice, or overlapping views): a pass would move it "
                             "twice; pass each tensor once")
        for g, group in enumerate(self.param_groups[first:], first):
            low = any(p.dtype in (torch.float16, torch.bfloat16) for p in group["params"])
            rounds = self.stochastic_rounding and low and not self.exact
            for k, p in enumerate(group["params"]):
                if (self.exact or rounds) and p.dtype not in exact_mod.DTYPES:
                    fix = ("pass exact=False (the default with float16/bfloat16 params), or cast it"
                           if self.exact else "pass stochastic_rounding=False, or put it in a "
                           "group without float16/bfloat16 params")
                    raise ValueError(f"param {k} of group {g} is {p.dtype}, which the "
                                     f"{'exact' if self.exact else 'stochastic-rounding'} pass "
                                     f"cannot store: {fix}")
            if self.stochastic_rounding and low and group["momentum"]:
                raise ValueError(f"group {g} has momentum={group['momentum']} and 16-bit params: "
                                 "its step (theta -= lr * buf) has no stochastic rounding; pass "
                                 "stochastic_rounding=False, or momentum=0 for that group")

    # -- the pass schedule -------------------------------------------------------------------
    # A displacement is (i, scale): theta sits at theta0 + scale * z(seeds[i]). Seeds and
    # scales reach the kernels as device tensors (the seeds made once per step, the constant
    # scales once per run), so a pass costs one launch and no host work per tensor.

    def _params(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"]]

    def _plan(self, kind: str, k: int, tensors: list[torch.Tensor], offsets: list[int]) -> Prepared:
        """The prepared list of group ``k``'s params (or momentum buffers), made again only
        when a tensor moved (``p.data = ...``) or the group changed."""
        plan = self._plans.get((kind, k))
        if plan is None or not plan.matches(tensors):
            plan = self._plans[(kind, k)] = Prepared(tensors, backend=self.backend, offsets=offsets,
                                                     distribution=self.distribution,
                                                     exact=self.exact and kind == "params")
        return plan

    def _groups(self) -> tuple[list, set]:
        """(k, group, params, offsets, prepared) per group (offsets global over all groups),
        and the params' devices. Taken once per step (``self._step_groups``): the passes reuse
        it, so a pass does no work per tensor on the host. Made again only when the layout
        changed: a param moved (``p.data = ...``), changed size, dtype or device, or the
        groups changed; checking that is the one walk over the params a step makes."""
        params = self._params()
        key = (tuple(len(g["params"]) for g in self.param_groups), Prepared.layout(params))
        if self._layout is None or self._layout[0] != key:
            self._check_joint(0)  # a param cast by hand (p.data = p.data.double())
            offsets = noise.offsets([p.numel() for p in params])
            groups, start = [], 0
            for k, group in enumerate(self.param_groups):
                n = len(group["params"])
                ps, offs = params[start:start + n], offsets[start:start + n]
                start += n
                if ps:
                    groups.append((k, ps, offs, self._plan("params", k, ps, offs)))
            self._layout = (key, groups, {p.device for p in params})
        _, groups, devices = self._layout
        return [(k, self.param_groups[k], ps, offs, plan) for k, ps, offs, plan in groups], devices

    def _constant(self, values: tuple[float, ...], device: torch.device) -> torch.Tensor:
        """A float32 vector of constants on ``device``, uploaded once (not during a capture)."""
        key = (values, device)
        if key not in self._constants:
            self._constants[key] = torch.tensor(values, dtype=torch.float32).to(device)
        return self._constants[key]

    def _shift(self, old: tuple[int, float] | None, new: tuple[int, float] | None):
        """One pass: move theta from ``theta0 + old`` to ``theta0 + new``."""
        if old is None and new is None:
            return
        if self.exact:
            return self._shift_exact(old, new)
        if old is not None and new is not None and old[0] == new[0]:
            first, coeffs = new[0], (new[1] - old[1],)
        elif old is not None and new is not None:
            assert new[0] == old[0] + 1, "directions are visited in order"
            first, coeffs = old[0], (-old[1], new[1])
        else:
            (first, c) = old if old is not None else new
            coeffs = (-c,) if old is not None else (c,)
        for _, group, ps, offs, plan in self._step_groups:
            for device, seeds in self._seeds.items():
                if ps[0].device == device:
                    plan.noise_axpby_(seeds[first:first + len(coeffs)],
                                      self._constant((1.0, *coeffs), device),
                                      distribution=self.distribution)
        self._displacement = new

    # -- exact mode (docs/EXACT.md): every pass recovers theta exactly, then displaces it ----

    def _exact_state(self, k: int, ps, offs) -> tuple[torch.Tensor, int, exact_mod.Table]:
        """Group k's codes (kept across steps) and side table (this step's; see _begin_exact)."""
        base, n = exact_mod.span(ps, offs)
        codes = self._codes.get(k)
        if codes is None or codes.numel() != n or codes.device != ps[0].device:
            codes = self._codes[k] = torch.zeros(n, dtype=torch.int8, device=ps[0].device)
        return codes, base, self._tables[k]

    def _begin_exact(self) -> None:
        """The side tables of this step, from theta before its first displacement."""
        tau = exact_mod.tau(self.eps, self.distribution)
        self._tables = {k: plan.build_table(tau) for k, _, _, _, plan in self._step_groups}

    def _exact_pass(self, plan, k, ps, offs, seeds, scales, n_old, *, encode, rounding) -> None:
        codes, base, table = self._exact_state(k, ps, offs)
        plan.exact_pass_(seeds, scales, n_old, codes, base, table, encode=encode,
                         rounding=rounding, distribution=self.distribution)

    def _shift_exact(self, old, new) -> None:
        for k, _, ps, offs, plan in self._step_groups:
            seeds = self._seeds[ps[0].device]
            picked = [term[0] for term in (old, new) if term is not None]
            if len(picked) == 2 and picked[1] == picked[0] + 1:
                pair = seeds[picked[0]:picked[0] + 2]
            else:
                pair = torch.cat([seeds[i:i + 1] for i in picked])
            coeffs = tuple(term[1] for term in (old, new) if term is not None)
            self._exact_pass(plan, k, ps, offs, pair, self._constant((1.0, *coeffs), ps[0].device),
                             int(old is not None), encode=new is not None, rounding=False)
        self._displacement = new

    def _evaluate(self, closure, i: int) -> torch.Tensor:
        return _as_loss(closure(i) if self._pass_index else closure())

    def _estimate(self, closure) -> tuple[torch.Tensor, torch.Tensor]:
        """Runs the 2q (or q+1) evaluations; returns (g, all losses). Leaves theta displaced
        by ``self._displacement``."""
        losses, grads = [], []
        if self.estimator == "forward":
            base = self._evaluate(closure, 0)
            losses.append(base)
        for i in range(self.q):
            self._shift(self._displacement, (i, self.eps))
            plus = self._evaluate(closure, i)
            losses.append(plus)
            if self.estimator == "central":
                self._shift(self._displacement, (i, -self.eps))
                minus = self._evaluate(closure, i)
                losses.append(minus)
                grads.append((plus - minus) / (2 * self.eps))
            else:
                grads.append((plus - base) / self.eps)
        return torch.stack(grads), torch.stack(losses)

    def _update(self, coeffs: torch.Tensor, ok: torch.Tensor) -> None:
        """The last pass per group: undo the displacement, then decay and step (SGD), or
        update the momentum buffers and step. ``ok`` masks the update on a non-finite loss."""
        disp_index, disp_scale = self._displacement
        for k, group, ps, offs, plan in self._step_groups:
            lr, wd, mu = group["lr"], group["weight_decay"], group["momentum"]
            dev = ps[0].device
            seeds = self._seeds[dev]
            c, okd = coeffs.to(dev), ok.to(dev)
            if mu:  # restore this group, then step through the momentum buffers
                undo = seeds[disp_index:disp_index + 1]
                if self.exact:
                    self._exact_pass(plan, k, ps, offs, undo, self._constant((1.0, disp_scale), dev),
                                     1, encode=False, rounding=False)
                else:
                    plan.noise_axpby_(undo, self._constant((1.0, -disp_scale), dev),
                                      distribution=self.distribution)
                self._momentum_step(k, ps, offs, seeds[:self.q], c, okd, lr, wd, mu)
                continue
            rounding = self.stochastic_rounding and plan.has_16bit
            if self.exact:  # recover theta from the displacement, then decay and step
                alpha = torch.where(okd, 1.0 - lr * wd, 1.0).reshape(1)
                self._exact_pass(plan, k, ps, offs,
                                 torch.cat([seeds[disp_index:disp_index + 1], seeds[:self.q + rounding]]),
                                 torch.cat([alpha, self._constant((disp_scale,), dev),
                                            torch.where(okd, c * -lr, 0.0)]),
                                 1, encode=False, rounding=rounding)
                continue
            scales = self._update_scales(c, okd, lr, wd, dev)
            if rounding:  # the plain pass with a stochastic-rounding store: n_old = 0
                codes, table = exact_mod.no_state(dev)
                plan.exact_pass_(seeds[:self.q + 1], scales, 0, codes, 0, table, encode=False,
                                 rounding=True, distribution=self.distribution)
            else:
                plan.noise_axpby_(seeds[:self.q], scales, distribution=self.distribution)
        self._displacement = None

    def _update_scales(self, c: torch.Tensor, ok: torch.Tensor, lr: float, wd: float,
                       dev: torch.device) -> torch.Tensor:
        """The scales of the last plain pass: ``alpha * (p - disp) - lr * sum_i c_i z_i``
        with ``alpha = 1 - lr*wd`` is ``alpha * restore + [0, -lr * c]``, where ``restore =
        [1, -disp one-hot]`` (a cached constant: an index assignment would copy from the host,
        which a capture cannot); ``restore`` alone when ``ok`` is False. Four small launches,
        all on the device."""
        index, scale = self._displacement
        restore = self._constant((1.0, *(-scale if i == index else 0.0 for i in range(self.q))), dev)
        step = torch.add(restore * (1.0 - lr * wd), torch.nn.functional.pad(c, (1, 0)), alpha=-lr)
        return torch.where(ok, step, restore)

    def _momentum_step(self, k, ps, offs, seeds, c, ok, lr, wd, mu) -> None:
        bufs = []
        for p in ps:
            state = self.state[p]
            if "momentum_buffer" not in state:
                state["momentum_buffer"] = torch.zeros_like(p, memory_format=torch.contiguous_format)
            bufs.append(state["momentum_buffer"])
        one = torch.ones((), device=c.device)
        keep = torch.where(ok, one * mu, one)
        self._plan("momentum", k, bufs, offs).noise_axpby_(
            seeds, torch.cat([keep.reshape(1), torch.where(ok, c, torch.zeros_like(c))]),
            distribution=self.distribution)
        if bool(ok):
            if wd:
                torch._foreach_add_(bufs, ps, alpha=wd)
            torch._foreach_add_(ps, bufs, alpha=-lr)

    def _step_seeds(self, devices: set) -> list[int] | torch.Tensor:
        """This step's direction seeds, and ``self._seeds``: them (then the rounding seed,
        with stochastic rounding) on each of the params' ``devices``; uploaded by the last
        step when nothing they depend on has changed since (``_prefetch_seeds``)."""
        if self.capturable:
            seeds = noise.direction_seeds(self.base_seed, self._step_t, self.q,
                                          rounding=self.stochastic_rounding)
            self._seeds = {seeds.device: seeds}
            return seeds[:self.q]
        prefetched, self._prefetched = self._prefetched, None
        if prefetched is not None and prefetched[0] == self._seeds_key(devices):
            _, seeds, self._seeds = prefetched
        else:
            seeds, self._seeds = self._host_seeds(devices)
        return seeds

    def _seeds_key(self, devices: set) -> tuple:
        return (self.base_seed, self.step_count, self.q, self.stochastic_rounding,
                frozenset(devices))

    def _host_seeds(self, devices: set) -> tuple[list[int], dict[torch.device, torch.Tensor]]:
        seeds = [noise.direction_seed(self.base_seed, self.step_count, i) for i in range(self.q)]
        extra = ([noise.rounding_seed(self.base_seed, self.step_count)]
                 if self.stochastic_rounding else [])
        return seeds, {d: seeds_on(seeds + extra, d) for d in devices}

    def _prefetch_seeds(self, devices: set) -> None:
        """The next step's seeds, made and uploaded while the device still runs this step's
        last pass: the next step's first launch then waits on no seed work (a GPU idles
        through the host work a step does before its first launch). The copy is on the stream
        current now; a next step on another stream must wait for this one anyway, for the
        parameters, and so waits for the copy too."""
        self._prefetched = (self._seeds_key(devices), *self._host_seeds(devices))

    @torch.no_grad()
    def step(self, closure: Callable | None = None) -> torch.Tensor:
        if closure is None:
            raise TypeError("ZOOptimizer.step needs a closure that returns the loss, e.g. "
                            "opt.step(lambda: loss_fn(model(x), y)); ZO estimates the gradient "
                            "from loss evaluations, it cannot use .grad")
        self._warnings.warn_arrived()  # for earlier steps whose flags have reached the host
        self._pass_index = _takes_index(closure)
        self._step_groups, devices = self._groups()
        seeds = self._step_seeds(devices)
        self._displacement = None
        if self.exact:
            self._begin_exact()
        try:
            grads, losses = self._estimate(closure)
        except BaseException:
            self._shift(self._displacement, None)
            raise
        if self.process_group is not None:
            grads, losses = _mean_over_ranks(grads, losses, self.process_group)
        ok = torch.isfinite(losses).all()
        self._update(grads / self.q, ok)
        self.last_record = StepRecord(
            step=self.step_count, seeds=seeds, grads=grads.float(), lr=self.param_groups[0]["lr"],
            eps=self.eps, weight_decay=self.param_groups[0]["weight_decay"],
            distribution=self.distribution, estimator=self.estimator,
            group_lrs=tuple(g["lr"] for g in self.param_groups),
            group_weight_decays=tuple(g["weight_decay"] for g in self.param_groups), finite=ok,
            rounding_seed=(noise.rounding_seed(self.base_seed, self.step_count)
                           if self.stochastic_rounding and not self.capturable else None))
        self.step_count += 1
        if self.capturable:
            self._step_t.add_(1)
        else:
            self._prefetch_seeds(devices)
        mean = losses.mean().float()
        if self.nonfinite == "raise" and not bool(ok):  # the step's one host sync
            raise FloatingPointError(nonfinite_mod.message(self.step_count - 1, losses))
        if self.nonfinite == "skip":
            self._warnings.add(self.step_count - 1, ok, losses)
            self._warnings.warn_arrived()
        return mean

    # -- state ------------------------------------------------------------------------------

    def __getstate__(self) -> dict:
        """All the optimizer for copy.deepcopy and pickle (torch.optim keeps only defaults,
        state and groups, which loses q, eps, the seed and the step), less what is tied to
        the params' storage or a device queue, which the copy makes again on its first step."""
        state = dict(self.__dict__)
        for transient in ("_step_groups", "_seeds", "_displacement", "_pass_index"):
            state.pop(transient, None)
        state.update(_plans={}, _layout=None, _constants={}, _prefetched=None, _codes={},
                     _tables={}, _warnings=nonfinite_mod.DeferredWarnings())
        return state

    def state_dict(self) -> dict:
        sd = super().state_dict()
        step = int(self._step_t) if self.capturable else self.step_count  # replays advance _step_t
        sd["zo"] = {"base_seed": self.base_seed, "step": step, "q": self.q,
                    "eps": self.eps, "distribution": self.distribution,
                    "estimator": self.estimator}
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        zo = state_dict.pop("zo", None)
        if zo is None:
            raise ValueError("this state_dict has no 'zo' entry; it was not saved by ZOOptimizer")
        super().load_state_dict(state_dict)
        _warn_on_other_settings(zo, {"q": self.q, "eps": self.eps, "distribution": self.distribution,
                                     "estimator": self.estimator})
        self.base_seed = noise.check_seed(int(zo["base_seed"]))
        self.step_count = int(zo["step"])
        if self.capturable:
            self._step_t.fill_(self.step_count)
