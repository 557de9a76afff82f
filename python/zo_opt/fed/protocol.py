"""The federated ZO protocol without Flower: seeds, replies, validation, replay, catch-up.

Everything here is plain Python/torch so that it is unit-tested without ``flwr``; the Flower
apps (``server_app``, ``client_app``) only move these values in ``ConfigRecord``s.

Round ``r`` (1-based) of a run with base seed ``B``:

* client ``c`` (its ``partition-id``) trains ``T`` local ZO steps from the global model of
  version ``r - 1`` with ``ZOOptimizer(seed=client_seed(B, r, c))``, so direction ``i`` of
  local step ``t`` has seed ``noise.direction_seed(client_seed(B, r, c), t, i)``;
* it sends back ``T*q`` seeds (uint64) and ``T*q`` projected gradients (float32): 12 bytes
  per direction (FedKSeed-style), never weights;
* the server checks every reply (:func:`validate_reply`), turns the accepted ones into one
  list of ``(seed, coeff)`` pairs with ``coeff = -lr * g / q / K`` (``K`` accepted clients:
  the replay is the mean of the clients' local ZO-SGD updates, i.e. FedAvg of their local
  models up to float rounding), and applies it with one ``zo_update_`` (:func:`apply_round`);
* a client that holds version ``v`` catches up to version ``r - 1`` by applying the stored
  ``(seeds, coeffs)`` of rounds ``v+1 .. r-1`` with the same :func:`apply_round`: the same
  float32 coefficients, the same kernels, so the weights are bit-identical to the server's
  (checked with :func:`params_hash` on both sides).

Server-side Adam (``server_opt="adam"``, FedAdam of Reddi et al. 2021, as the old Flower
server had): the round's replay is first materialised as a dense pseudo-gradient ``delta``
(``zo_update_`` into a zero buffer), then ``m, v`` are updated and
``theta += lr_s * m_hat / (sqrt(v_hat) + tau)``. Memory cost: three extra float32 buffers the
size of the trained parameters on the server (delta, m, v; 3x the model) and two (m, v) on
every client that catches up by replay, which must apply the same Adam to stay identical.
"""
from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch

from .. import noise
from ..functional import zo_update_

# Domain tag mixed into the base seed so that round/client seeds never coincide with the
# direction seeds of a plain ZOOptimizer run that uses the same base seed.
FED_TAG = 0x5A4F_4645_445F_5244  # "ZOFED_RD"
SERVER_OPTS = ("sgd", "adam")


def client_seed(base_seed: int, round_: int, client_id: int) -> int:
    """Base seed of client ``client_id``'s ZOOptimizer in round ``round_``.

    ``noise.direction_seed(base_seed ^ FED_TAG, round_, client_id)``: a SplitMix64 chain, a
    pure function of its inputs, so the server re-derives every seed a client claims.
    """
    return noise.direction_seed(noise.check_seed(base_seed) ^ FED_TAG, round_, client_id)


def expected_seeds(base_seed: int, round_: int, client_id: int, steps: int, q: int) -> list[int]:
    """The ``steps * q`` direction seeds client ``client_id`` must use in ``round_`` (step-major)."""
    s = client_seed(base_seed, round_, client_id)
    return [noise.direction_seed(s, t, i) for t in range(steps) for i in range(q)]


# ------------------------------------------------------------------ wire encoding
def seeds_to_bytes(seeds: Sequence[int]) -> bytes:
    return np.asarray([noise.check_seed(int(s)) for s in seeds], dtype="<u8").tobytes()


def seeds_from_bytes(b: bytes) -> list[int]:
    if len(b) % 8:
        raise ValueError(f"seed bytes: {len(b)} is not a multiple of 8")
    return [int(x) for x in np.frombuffer(b, dtype="<u8")]


def floats_to_bytes(values) -> bytes:
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu", torch.float32).numpy()
    return np.asarray(values, dtype="<f4").tobytes()


def floats_from_bytes(b: bytes) -> torch.Tensor:
    if len(b) % 4:
        raise ValueError(f"float32 bytes: {len(b)} is not a multiple of 4")
    return torch.from_numpy(np.frombuffer(b, dtype="<f4").copy())


@dataclass
class TrainReply:
    """What a client sends back after a round (``to_config``/``from_config``: the wire form)."""

    round: int
    client_id: int
    steps: int
    q: int
    lr: float
    eps: float
    distribution: str
    seeds: list[int]
    grads: torch.Tensor  # float32, steps*q, step-major
    train_loss: float = float("nan")

    def to_config(self) -> dict:
        return {"round": int(self.round), "client-id": int(self.client_id), "steps": int(self.steps),
                "q": int(self.q), "lr": float(self.lr), "eps": float(self.eps),
                "distribution": str(self.distribution), "seeds": seeds_to_bytes(self.seeds),
                "grads": floats_to_bytes(self.grads), "train-loss": float(self.train_loss)}

    @classmethod
    def from_config(cls, cfg) -> "TrainReply":
        """Raises ``ValueError`` with the reason when a field is missing or of the wrong type."""
        def get(key, types):
            if key not in cfg:
                raise ValueError(f"missing field {key!r}")
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, types):
                raise ValueError(f"field {key!r} has type {type(value).__name__}")
            return value

        return cls(round=get("round", int), client_id=get("client-id", int), steps=get("steps", int),
                   q=get("q", int), lr=float(get("lr", (int, float))), eps=float(get("eps", (int, float))),
                   distribution=get("distribution", str), seeds=seeds_from_bytes(get("seeds", bytes)),
                   grads=floats_from_bytes(get("grads", bytes)),
                   train_loss=float(get("train-loss", (int, float)) if "train-loss" in cfg else math.nan))


# ------------------------------------------------------------------ faults (a test hook)
def _nan_grad(cfg: dict, round_: int) -> None:
    g = floats_from_bytes(cfg["grads"])
    g[0] = math.nan
    cfg["grads"] = floats_to_bytes(g)


def _stale_round(cfg: dict, round_: int) -> None:
    cfg["round"] = round_ - 1


def _flipped_seed(cfg: dict, round_: int) -> None:
    s = seeds_from_bytes(cfg["seeds"])
    s[-1] ^= 1
    cfg["seeds"] = seeds_to_bytes(s)


def _short_grads(cfg: dict, round_: int) -> None:
    cfg["grads"] = cfg["grads"][:-4]


# Each corrupts a reply's wire form (``TrainReply.to_config()``, in place) in one way the server
# must refuse: a client's node-config ``fault="ROUND:KIND"`` and ``run.py --fault`` name them.
FAULTS = {"nan": _nan_grad, "stale": _stale_round, "seeds": _flipped_seed, "short": _short_grads}


# ------------------------------------------------------------------ validation
@dataclass(frozen=True)
class RoundSpec:
    """What the server expects from every reply in one round."""

    round: int
    base_seed: int
    num_clients: int
    steps: int
    q: int
    lr: float
    eps: float
    distribution: str
    max_abs_grad: float = 0.0  # 0: no bound beyond finiteness


def validate_reply(reply: TrainReply, spec: RoundSpec, seen: set[int] | None = None) -> str | None:
    """``None`` if the reply is acceptable, else the reason it is rejected (one line).

    Checks, in order: the round (stale or future), the client id (range, duplicates in this
    round), the shape (steps, q, lengths of seeds and grads), the hyperparameters the replay
    depends on (lr, eps, distribution), the values (finite, optionally bounded), and that
    every seed is the one the round's derivation gives this client.
    """
    if reply.round != spec.round:
        kind = "stale" if reply.round < spec.round else "future"
        return f"{kind} round: reply for round {reply.round}, current round is {spec.round}"
    if not 0 <= reply.client_id < spec.num_clients:
        return f"client id {reply.client_id} outside [0, {spec.num_clients})"
    if seen is not None and reply.client_id in seen:
        return f"client id {reply.client_id} already replied in round {spec.round}"
    if reply.steps != spec.steps or reply.q != spec.q:
        return f"shape: {reply.steps} steps x q={reply.q}, expected {spec.steps} x {spec.q}"
    n = spec.steps * spec.q
    if len(reply.seeds) != n:
        return f"wrong length: {len(reply.seeds)} seeds, expected {n}"
    if reply.grads.numel() != n:
        return f"wrong length: {reply.grads.numel()} projected gradients, expected {n}"
    if not math.isclose(reply.lr, spec.lr, rel_tol=1e-6, abs_tol=0.0):
        return f"lr {reply.lr!r} differs from the run's {spec.lr!r}"
    if not math.isclose(reply.eps, spec.eps, rel_tol=1e-6, abs_tol=0.0):
        return f"eps {reply.eps!r} differs from the run's {spec.eps!r}"
    if reply.distribution != spec.distribution:
        return f"distribution {reply.distribution!r} differs from the run's {spec.distribution!r}"
    finite = torch.isfinite(reply.grads)
    if not bool(finite.all()):
        return f"non-finite projected gradients at {torch.nonzero(~finite).flatten().tolist()[:8]}"
    if spec.max_abs_grad > 0 and float(reply.grads.abs().max()) > spec.max_abs_grad:
        return f"projected gradient {float(reply.grads.abs().max()):.4g} above max-abs-grad {spec.max_abs_grad:g}"
    expected = expected_seeds(spec.base_seed, spec.round, reply.client_id, spec.steps, spec.q)
    if reply.seeds != expected:
        bad = next(k for k, (a, b) in enumerate(zip(reply.seeds, expected)) if a != b)
        return (f"seed {bad} (step {bad // spec.q}, direction {bad % spec.q}) does not match the "
                f"derivation for round {spec.round}, client {reply.client_id}")
    return None


def judge_reply(reply: TrainReply, node: int, claimed: dict[int, int], spec: RoundSpec,
                seen: set[int]) -> str | None:
    """``validate_reply`` for the reply of ``node``, which must keep the client id it was
    accepted with (``claimed``: node -> client id). An accepted reply records its node's claim
    and its client id in ``seen``; a rejected one records nothing, so that a node whose first
    reply was refused (a client id out of range, say) is not held to that id for the run."""
    if claimed.get(node, reply.client_id) != reply.client_id:
        return f"node claimed client id {claimed[node]} before, now {reply.client_id}"
    reason = validate_reply(reply, spec, seen)
    if reason is None:
        claimed[node] = reply.client_id
        seen.add(reply.client_id)
    return reason


# ------------------------------------------------------------------ aggregation and replay
@dataclass
class RoundUpdate:
    """The accepted records of one round, ready to replay: ``theta += sum coeffs[k] z(seeds[k])``."""

    version: int  # the global model version this update produces (= the round)
    seeds: list[int]
    coeffs: torch.Tensor  # float32
    clients: list[int] = field(default_factory=list)

    def to_config(self) -> dict:
        return {"version": self.version, "seeds": seeds_to_bytes(self.seeds),
                "coeffs": floats_to_bytes(self.coeffs)}

    @classmethod
    def from_config(cls, version: int, seeds: bytes, coeffs: bytes) -> "RoundUpdate":
        out = cls(version, seeds_from_bytes(seeds), floats_from_bytes(coeffs))
        if len(out.seeds) != out.coeffs.numel():
            raise ValueError(f"round update {version}: {len(out.seeds)} seeds, {out.coeffs.numel()} coeffs")
        return out


def aggregate(version: int, replies: Sequence[TrainReply]) -> RoundUpdate:
    """Accepted replies -> one update: the mean over clients of each local ZO-SGD trajectory.

    A client's local model after its steps is ``theta + sum_t,i (-lr g_ti / q) z_ti`` (ZO-SGD
    without momentum or weight decay is a sum of directions), so the mean over ``K`` clients
    is ``theta + sum (-lr g / q / K) z``: FedAvg of the local models, from scalars only.
    Coefficients are computed in float64 and stored in float32, and those float32 values are
    what both the server and catching-up clients apply.
    """
    replies = sorted(replies, key=lambda r: r.client_id)
    seeds, coeffs = [], []
    k = len(replies)
    for r in replies:
        seeds.extend(r.seeds)
        coeffs.append(r.grads.to(torch.float64) * (-r.lr / r.q / k))
    c = torch.cat(coeffs).to(torch.float32) if coeffs else torch.zeros(0)
    return RoundUpdate(version, seeds, c, [r.client_id for r in replies])


@dataclass
class ServerOpt:
    """How a round's update is applied (identical on the server and on catching-up clients)."""

    name: str = "sgd"
    lr: float = 1.0  # server learning rate: sgd scales the replay, adam's step size
    beta1: float = 0.9
    beta2: float = 0.99
    tau: float = 1e-3  # FedAdam's adaptivity (epsilon)

    def __post_init__(self):
        if self.name not in SERVER_OPTS:
            raise ValueError(f"Invalid server optimizer {self.name!r}; choose one of {SERVER_OPTS}")


def new_opt_state(params: Sequence[torch.Tensor], opt: ServerOpt) -> dict:
    if opt.name == "adam":  # m and v: 2x the parameters (plus a transient delta per round)
        return {"m": [torch.zeros_like(p) for p in params], "v": [torch.zeros_like(p) for p in params],
                "t": 0}
    return {}


@torch.no_grad()
def apply_round(params: Sequence[torch.Tensor], update: RoundUpdate, opt: ServerOpt, state: dict, *,
                distribution: str = "gaussian", backend: str = "auto") -> None:
    """Applies one round's update in place: one ``zo_update_`` pass (sgd), or a pass into a
    zero ``delta`` followed by FedAdam (adam). Deterministic: the same call on the same
    backend gives bit-identical parameters in any process."""
    params = list(params)
    if not update.seeds:
        return
    if opt.name == "sgd":
        coeffs = update.coeffs if opt.lr == 1.0 else (update.coeffs.double() * opt.lr).float()
        zo_update_(params, update.seeds, coeffs, distribution=distribution, backend=backend)
        return
    delta = [torch.zeros_like(p) for p in params]
    zo_update_(delta, update.seeds, update.coeffs, distribution=distribution, backend=backend)
    state["t"] += 1
    t, b1, b2 = state["t"], opt.beta1, opt.beta2
    torch._foreach_mul_(state["m"], b1)
    torch._foreach_add_(state["m"], delta, alpha=1 - b1)
    torch._foreach_mul_(state["v"], b2)
    torch._foreach_addcmul_(state["v"], delta, delta, value=1 - b2)
    step = opt.lr / (1 - b1 ** t)
    denom = torch._foreach_sqrt(state["v"])
    torch._foreach_div_(denom, math.sqrt(1 - b2 ** t))
    torch._foreach_add_(denom, opt.tau)
    torch._foreach_addcdiv_(params, state["m"], denom, value=step)


def params_hash(params: Sequence[torch.Tensor]) -> str:
    """sha256 of the parameters' bytes (dtype, shape and values): equal iff bit-identical."""
    h = hashlib.sha256()
    for p in params:
        t = p.detach().contiguous().cpu()
        h.update(f"{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class History:
    """The server's log of applied updates: what a client at version ``v`` needs."""

    def __init__(self, initial_hash: str):
        self.updates: list[RoundUpdate] = []
        self.hashes: list[str] = [initial_hash]  # hashes[v]: the global model of version v

    @property
    def version(self) -> int:
        return len(self.updates)

    def append(self, update: RoundUpdate, new_hash: str) -> None:
        if update.version != self.version + 1:
            raise ValueError(f"update for version {update.version} after version {self.version}")
        self.updates.append(update)
        self.hashes.append(new_hash)

    def since(self, version: int) -> list[RoundUpdate]:
        """The updates that bring version ``version`` to the current one."""
        if not 0 <= version <= self.version:
            raise ValueError(f"version {version} outside [0, {self.version}]")
        return self.updates[version:]


def catchup_to_config(updates: Sequence[RoundUpdate]) -> dict:
    return {"catchup-versions": [u.version for u in updates],
            "catchup-seeds": [seeds_to_bytes(u.seeds) for u in updates],
            "catchup-coeffs": [floats_to_bytes(u.coeffs) for u in updates]}


def catchup_from_config(cfg) -> list[RoundUpdate]:
    versions = list(cfg.get("catchup-versions", []))
    seeds, coeffs = list(cfg.get("catchup-seeds", [])), list(cfg.get("catchup-coeffs", []))
    if not len(versions) == len(seeds) == len(coeffs):
        raise ValueError("catch-up lists of different lengths")
    return [RoundUpdate.from_config(v, s, c) for v, s, c in zip(versions, seeds, coeffs)]
