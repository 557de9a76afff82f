"""Data-parallel ZO over torch.distributed (gloo, 2 processes on loopback): ranks share the
directions, exchange only O(q) floats a step, and stay bit-identical."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from zo_opt import ZOOptimizer

STEPS, Q, N, D = 5, 4, 32, 40


def data():
    """float64, so that comparing with one process is not swamped by the float32 rounding of
    the losses, which the finite difference amplifies by 1/eps."""
    gen = torch.Generator().manual_seed(0)
    X = torch.randn(2 * N, D, generator=gen, dtype=torch.float64)
    return X, X @ torch.randn(D, generator=gen, dtype=torch.float64)


def train(w, X, y, opt):
    for _ in range(STEPS):
        opt.step(lambda: ((X @ w - y) ** 2).mean())
    return w


def worker(rank, port, out, seed):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    sent = []
    all_reduce = dist.all_reduce

    def counting_all_reduce(tensor, *args, **kwargs):
        sent.append(tensor.numel() * tensor.element_size())
        return all_reduce(tensor, *args, **kwargs)

    dist.all_reduce = counting_all_reduce
    X, y = data()
    shard = slice(rank * N, (rank + 1) * N)
    w = torch.zeros(D, dtype=torch.float64)
    opt = ZOOptimizer([w], lr=0.05, q=Q, seed=seed)  # the default group is picked up
    train(w, X[shard], y[shard], opt)
    torch.save({"w": w, "bytes": sent, "seed": opt.base_seed}, f"{out}/rank{rank}.pt")
    dist.destroy_process_group()


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_two_ranks(tmp_path, seed):
    mp.start_processes(worker, args=(free_port(), str(tmp_path), seed), nprocs=2,
                       start_method="spawn", join=True)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]


@pytest.mark.slow
def test_ranks_agree_and_match_one_process_on_the_whole_batch(tmp_path):
    ranks = run_two_ranks(tmp_path, seed=123)
    assert torch.equal(ranks[0]["w"], ranks[1]["w"])
    X, y = data()
    w = torch.zeros(D, dtype=torch.float64)
    train(w, X, y, ZOOptimizer([w], lr=0.05, q=Q, seed=123))
    torch.testing.assert_close(ranks[0]["w"], w, rtol=0, atol=1e-7)  # g_i are applied in float32
    assert not torch.equal(w, torch.zeros(D, dtype=torch.float64))
    # per step: q projected gradients + 2q losses (float64); nothing the size of the model
    assert ranks[0]["bytes"] == [3 * Q * 8] * STEPS


@pytest.mark.slow
def test_unseeded_ranks_share_rank_zeros_seed(tmp_path):
    ranks = run_two_ranks(tmp_path, seed=None)
    assert ranks[0]["seed"] == ranks[1]["seed"]
    assert torch.equal(ranks[0]["w"], ranks[1]["w"])
