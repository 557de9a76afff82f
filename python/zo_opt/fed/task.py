"""The learning task of the federated apps: the GPT-2 model and corpus of ``zo_opt.train``,
a client's data partition, local ZO training, and evaluation. No ``flwr`` here.

All settings come from the run config (``[tool.flwr.app.config]``, see ``app.DEFAULTS``),
which the server and every client see identically, so they build the same initial model.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .. import ZOOptimizer
from . import protocol


@dataclass(frozen=True)
class FedConfig:
    rounds: int = 3
    num_clients: int = 2
    base_seed: int = 0
    local_steps: int = 4
    q: int = 4
    lr: float = 1e-3
    eps: float = 1e-3
    distribution: str = "gaussian"
    batch_size: int = 4
    block_size: int = 64
    dataset: str = "kjv"
    max_samples: int = 0  # 0: every document
    model_size: str = "20M"
    model_path: str = ""  # a local Hugging Face GPT-2 folder; overrides model_size
    init_seed: int = 0
    server_opt: str = "sgd"
    server_lr: float = 1.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.99
    adam_tau: float = 1e-3
    max_abs_grad: float = 0.0
    eval_blocks: int = 16
    backend: str = "auto"
    cache_dir: str = ""
    out_dir: str = ""
    round_timeout: float = 600.0
    threads: int = 0  # torch threads per process (0: torch's default)
    device: str = "cpu"

    @classmethod
    def from_run_config(cls, run_config) -> "FedConfig":
        """Hyphenated run-config keys (``local-steps``) -> fields; unknown keys are ignored."""
        kwargs = {}
        for name, f in cls.__dataclass_fields__.items():
            key = name.replace("_", "-")
            if key in run_config:
                kwargs[name] = type(f.default)(run_config[key])
        return cls(**kwargs)

    def check(self) -> None:
        """Raises ValueError naming the first setting out of range, as its ``--flag``. Without it a
        bad value failed inside every client each round: all replies rejected, nothing trained,
        and the run still ended with exit code 0."""
        from ..backends import NAMES
        from ..noise import DISTRIBUTIONS
        from ..train.model import CONFIGS

        def bad(name, why):
            raise ValueError(f"--{name.replace('_', '-')} {getattr(self, name)!r}: {why}")

        for name in ("rounds", "num_clients", "local_steps", "q", "batch_size", "lr", "eps", "server_lr",
                     "round_timeout"):
            if not getattr(self, name) > 0:
                bad(name, "must be > 0")
        for name in ("max_samples", "eval_blocks", "threads", "max_abs_grad", "base_seed", "init_seed"):
            if not getattr(self, name) >= 0:
                bad(name, "must be >= 0")
        if self.block_size < 2:
            bad("block_size", "must be >= 2")
        for name, choices in (("distribution", DISTRIBUTIONS), ("server_opt", protocol.SERVER_OPTS),
                              ("backend", NAMES), ("model_size", tuple(CONFIGS))):
            if getattr(self, name) not in choices:
                bad(name, f"choose one of {', '.join(choices)}")

    def server_opt_spec(self) -> protocol.ServerOpt:
        return protocol.ServerOpt(self.server_opt, self.server_lr, self.adam_beta1, self.adam_beta2,
                                  self.adam_tau)

    def round_spec(self, round_: int) -> protocol.RoundSpec:
        return protocol.RoundSpec(round_, self.base_seed, self.num_clients, self.local_steps, self.q,
                                  self.lr, self.eps, self.distribution, self.max_abs_grad)


def setup_threads(cfg: FedConfig) -> None:
    if cfg.threads > 0:
        torch.set_num_threads(cfg.threads)


def build_model(cfg: FedConfig):
    """The initial global model (version 0): the same weights in every process."""
    from ..train.model import build_model as build

    if cfg.model_path:
        model = build(model_name_or_path=cfg.model_path)
    else:
        model = build(cfg.model_size, seed=cfg.init_seed)
    model.to(cfg.device).eval()  # ZO forwards run in eval mode (no dropout)
    return model


def trained_params(model) -> list[torch.nn.Parameter]:
    """Every parameter, tied ones once, in ``named_parameters`` order (the noise order)."""
    return [p for _, p in model.named_parameters()]


def load_blocks(cfg: FedConfig) -> dict:
    from ..train import data

    return data.load_blocks(cfg.dataset, block_size=cfg.block_size, max_samples=cfg.max_samples or None,
                            cache_dir=cfg.cache_dir or None, log=lambda *_: None)


def partition(blocks: torch.Tensor, client_id: int, num_clients: int) -> torch.Tensor:
    """Client ``c`` holds training blocks ``c, c + n, c + 2n, ...`` (disjoint, IID)."""
    return blocks[client_id::num_clients]


def local_train(model, blocks: torch.Tensor, cfg: FedConfig, round_: int, client_id: int):
    """``cfg.local_steps`` ZO-SGD steps from the current weights; returns the TrainReply.

    Step ``t`` of round ``r`` uses draw ``(r - 1) * local_steps + t`` of the client's batch
    stream (no repeats across rounds until an epoch ends). A step skipped for a non-finite
    loss (nothing applied) is reported with zero projected gradients, which replays as the
    same no-op.
    """
    from ..train.data import BatchStream

    params = trained_params(model)
    stream = BatchStream(blocks, cfg.batch_size, seed=cfg.base_seed, name=f"fed-client-{client_id}")
    opt = ZOOptimizer(params, lr=cfg.lr, q=cfg.q, eps=cfg.eps, distribution=cfg.distribution,
                      seed=protocol.client_seed(cfg.base_seed, round_, client_id), backend=cfg.backend,
                      nonfinite="skip")
    seeds, grads, losses = [], [], []
    for t in range(cfg.local_steps):
        x = stream.batch((round_ - 1) * cfg.local_steps + t).to(cfg.device)
        losses.append(float(opt.step(lambda: model(input_ids=x, labels=x).loss)))
        rec = opt.last_record
        seeds.extend(rec.seeds)
        g = rec.grads.detach().cpu().float()
        grads.append(g if bool(rec.finite) else torch.zeros_like(g))
    return protocol.TrainReply(round=round_, client_id=client_id, steps=cfg.local_steps, q=cfg.q,
                               lr=cfg.lr, eps=cfg.eps, distribution=cfg.distribution, seeds=seeds,
                               grads=torch.cat(grads), train_loss=sum(losses) / len(losses))


def evaluate(model, blocks: torch.Tensor, cfg: FedConfig, batch_size: int = 16) -> float:
    """Mean next-token cross-entropy (``zo_opt.train``'s evaluation)."""
    from ..train.train import evaluate as ev

    return ev(model, blocks, torch.device(cfg.device), batch_size)
