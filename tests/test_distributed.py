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
    # Together, as zo-train does (parallel.teardown): in one CI run of 11-30, rank 1 aborted in
    # gloo's teardown ("terminate called without an active exception") after both had saved.
    dist.barrier()
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


# -- zo-train's launch checks (zo_opt.train.parallel.setup), before any process group -----------

@pytest.fixture
def no_group(monkeypatch):
    """setup() must refuse before joining: a rank that cannot run would otherwise fail deep in
    the rendezvous or NCCL, or leave its peers waiting on it."""
    def joined(*args, **kwargs):
        raise AssertionError("init_process_group called before the launch was checked")
    monkeypatch.setattr(dist, "init_process_group", joined)
    for var in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)


def test_world_size_without_torchrun_names_the_launcher(monkeypatch, no_group):
    from zo_opt.train import parallel

    monkeypatch.setenv("WORLD_SIZE", "2")  # left over from another launcher, say
    with pytest.raises(SystemExit) as e:
        parallel.setup("cpu")
    assert "WORLD_SIZE=2" in str(e.value) and "RANK" in str(e.value), e.value
    assert "torchrun --nproc_per_node" in str(e.value) and "unset WORLD_SIZE" in str(e.value)


def test_more_ranks_on_a_node_than_gpus_names_nproc_per_node(monkeypatch, no_group):
    from zo_opt.train import parallel

    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    with pytest.raises(SystemExit) as e:
        parallel.setup("auto")
    assert "local rank 1" in str(e.value) and "1 CUDA device" in str(e.value), e.value
    assert "--nproc_per_node 1" in str(e.value) and "--device cpu" in str(e.value)
