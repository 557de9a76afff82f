"""Federated zeroth-order training on Flower (``pip install zo-opt[fed]``), FedKSeed-style.

Clients train locally with :class:`zo_opt.ZOOptimizer` from round seeds derived from a shared
base seed, the round and the client id, and send back only their step records (seeds and
projected gradients: 12 bytes per direction); the server validates each reply, replays the
accepted ones on the global model with ``zo_update_`` (one pass per round, optionally followed
by server-side Adam) and sends each client the records it lacks, never weights.

* :mod:`zo_opt.fed.protocol`: seeds, wire encoding, validation, aggregation, replay (no flwr).
* :mod:`zo_opt.fed.task`: model, data partitions, local training (reuses ``zo_opt.train``).
* :mod:`zo_opt.fed.server_app`, :mod:`zo_opt.fed.client_app`: the Flower ``ServerApp`` and
  ``ClientApp`` (import flwr).
* :mod:`zo_opt.fed.app`: writes the Flower app directory (``pyproject.toml``).
* :mod:`zo_opt.fed.run`: ``python -m zo_opt.fed.run``, a real run on loopback with Flower's
  deployment engine (SuperLink, one SuperNode per client, ``flwr run``).
"""
from .protocol import (RoundSpec, RoundUpdate, ServerOpt, TrainReply, aggregate, apply_round, client_seed,
                       expected_seeds, params_hash, validate_reply)

__all__ = ["RoundSpec", "RoundUpdate", "ServerOpt", "TrainReply", "aggregate", "apply_round", "client_seed",
           "expected_seeds", "params_hash", "validate_reply"]
