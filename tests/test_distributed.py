"""Data-parallel helpers over two gloo processes on the CPU."""

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from blockdpr.distributed import Distributed


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, port: int, results) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank))
    d = Distributed.from_env("cpu")
    try:
        p = torch.nn.Parameter(torch.zeros(3))
        p.grad = torch.full((3,), float(rank + 1))
        d.average_gradients_([p])
        results[f"grad{rank}"] = p.grad.tolist()
        results[f"shard{rank}"] = d.shard(torch.arange(5)).tolist()
        d.check_replicas([torch.ones(4)], "same")
        try:
            d.check_replicas([torch.tensor([1.0, float(rank)])], "weights")
            results[f"diverged{rank}"] = "not detected"
        except RuntimeError as e:
            results[f"diverged{rank}"] = str(e)
    finally:
        d.close()


@pytest.mark.skipif(not dist.is_gloo_available(), reason="gloo backend not built into this torch")
def test_average_shard_and_divergence_check_over_two_ranks():
    with mp.Manager() as manager:
        results = manager.dict()
        mp.spawn(_worker, args=(_free_port(), results), nprocs=2, join=True)
        results = dict(results)
    assert results["grad0"] == results["grad1"] == [1.5, 1.5, 1.5]
    assert results["shard0"] == [0, 1, 2] and results["shard1"] == [3, 4]
    assert "ranks diverged: weights" in results["diverged0"]
    assert "ranks diverged: weights" in results["diverged1"]


def test_single_process_is_a_no_op():
    d = Distributed.from_env("cpu")
    assert not d.enabled and d.is_main
    p = torch.nn.Parameter(torch.zeros(2))
    p.grad = torch.ones(2)
    d.average_gradients_([p])
    d.check_replicas([p], "weights")
    assert p.grad.tolist() == [1.0, 1.0]
    assert d.shard(torch.arange(4)).tolist() == [0, 1, 2, 3]
