"""A tiny synthetic CIFAR-10 (python batches) and the flags of a tiny WRN, shared by the CLI tests."""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

TINY = ["--depth", "10", "--width", "1", "--batch-size", "20", "--no-progress", "--device", "cpu"]


def write_tiny_cifar(root: Path, n_train: int = 40, n_test: int = 60) -> Path:
    """cifar-10-batches-py with 5 x n_train training and n_test test images whose class shows in colour."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)

    def batch(n, offset):
        labels = [(i + offset) % 10 for i in range(n)]
        data = rng.integers(0, 60, size=(n, 3, 32, 32), dtype=np.uint8)
        for i, y in enumerate(labels):
            data[i, y % 3] += np.uint8(20 * y)
        return {b"data": data.reshape(n, 3072), b"labels": labels}

    for i in range(1, 6):
        (root / f"data_batch_{i}").write_bytes(pickle.dumps(batch(n_train, i), protocol=4))
    (root / "test_batch").write_bytes(pickle.dumps(batch(n_test, 0), protocol=4))
    return root


def metric_rows(out: Path) -> list[dict]:
    """A run's metrics.jsonl without the wall-clock fields (which differ between equal runs)."""
    result = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    for r in result:
        for k in ("seconds", "images_per_s", "trials_in_process"):
            r.pop(k, None)
    return result


def assert_runs_match(a: Path, b: Path) -> None:
    """Two run directories hold the same metrics, weights, masks, momentum and H (to 1e-9)."""
    ra, rb = metric_rows(a), metric_rows(b)
    assert len(ra) == len(rb)
    for x, y in zip(ra, rb):
        assert x.keys() == y.keys()
        for k in x:
            if isinstance(x[k], float):
                assert x[k] == pytest.approx(y[k], rel=1e-9, abs=1e-9), k
            else:
                assert x[k] == y[k], k
    ca, cb = (torch.load(d / "last.pt", weights_only=True) for d in (a, b))
    for k in ca["model"]:
        torch.testing.assert_close(ca["model"][k], cb["model"][k], rtol=1e-9, atol=1e-9, msg=k)
    if ca["masks"] is not None:
        assert all(torch.equal(ca["masks"][k], cb["masks"][k]) for k in ca["masks"])
    for i, s in ca["optimizer"]["state"].items():
        torch.testing.assert_close(s["momentum_buffer"], cb["optimizer"]["state"][i]["momentum_buffer"], rtol=1e-9, atol=1e-9)
    assert ca["reallocator"] == cb["reallocator"]
