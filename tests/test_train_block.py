"""Block mode through the training CLI: modes, exact resume, checkpoints, errors, and torchrun with gloo."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdpr.models import WideResNet
from blockdpr.train import main
from tiny import TINY, assert_runs_match

REPO = Path(__file__).resolve().parent.parent
BLOCK = ["--granularity", "block", "--block-size", "16"]
DPR = ["--realloc-periods", "0:3", "--target-pruned", "3", "--initial-threshold", "0.05"]


def test_block_dpr_conserves_blocks_exports_dense_and_feeds_reinit(tmp_path, tiny_cifar):
    data = ["--data", str(tiny_cifar), "--epochs", "2"]
    out = tmp_path / "dpr"
    summary = main([*TINY, *BLOCK, *DPR, *data, "--out", str(out)])
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(r["weights_moved"] for r in rows) > 0, "blocks must move"
    config = json.loads((out / "config.json").read_text())
    assert config["layers_kept_dense"] == []
    masks = torch.load(out / "final_masks.pt", weights_only=True)
    assert all(m.dtype == torch.bool and m.dim() == 2 for m in masks.values()), "block masks are block grids"
    kept = sum(max(1, int(0.1 * m.numel() + 0.1)) for m in masks.values()) * 16 * 16
    assert summary["nonzero_sparse_weights"] == kept == sum(int(m.sum()) for m in masks.values()) * 256
    assert config["parameters"]["nonzero_parameters"] - config["parameters"]["total_parameters"] \
        == kept - config["parameters"]["sparse_tensor_parameters"]

    dense = WideResNet(10, 1)
    dense.load_state_dict(torch.load(out / "final_dense.pt", weights_only=True))  # a plain dense state_dict
    weight = dense.group3[0].conv2.weight
    assert 0 < torch.count_nonzero(weight) < weight.numel()

    reinit = tmp_path / "reinit"
    main([*TINY, *BLOCK, *data, "--mode", "reinit", "--structure-from", str(out), "--out", str(reinit)])
    final = torch.load(reinit / "final_masks.pt", weights_only=True)
    assert all(torch.equal(final[k], masks[k]) for k in masks)


def test_block_gmp_prunes_blocks_to_the_target(tmp_path, tiny_cifar):
    data = ["--data", str(tiny_cifar)]
    dense = tmp_path / "dense"
    main([*TINY, *data, "--mode", "dense", "--epochs", "1", "--out", str(dense)])
    summary = main([*TINY, *BLOCK, *data, "--mode", "gmp", "--dense-from", str(dense), "--epochs", "2",
                    "--gmp-steps", "2", "--gmp-interval", "1", "--sparsity", "0.5", "--out", str(tmp_path / "gmp")])
    masks = torch.load(tmp_path / "gmp" / "final_masks.pt", weights_only=True)
    assert summary["nonzero_sparse_weights"] == sum(max(1, int(0.5 * m.numel() + 0.1)) for m in masks.values()) * 256


def test_block_run_stopped_mid_epoch_resumes_exactly(tmp_path, tiny_cifar):
    flags = [*TINY, *BLOCK, *DPR, "--data", str(tiny_cifar), "--epochs", "2"]
    main([*flags, "--out", str(tmp_path / "reference")])
    assert main([*flags, "--out", str(tmp_path / "stopped"), "--stop-after", "0"]) is None
    assert not (tmp_path / "stopped" / "summary.json").exists()
    main([*flags, "--out", str(tmp_path / "stopped"), "--resume"])
    assert_runs_match(tmp_path / "stopped", tmp_path / "reference")


def test_block_mode_errors_are_clear(tmp_path, tiny_cifar, capsys):
    out = tmp_path / "run"
    main([*TINY, *BLOCK, "--data", str(tiny_cifar), "--epochs", "1", "--out", str(out), "--stop-after", "0"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data", str(tiny_cifar), "--epochs", "1", "--out", str(out), "--resume", "--granularity", "element"])
    assert e.value.code == 2
    assert "--granularity: the run has 'block', the command line gives 'element'" in capsys.readouterr().err
    for flags, message in ((["--block-size", "24"], "--block-size must be one of"),
                           (["--keep-momentum"], "--keep-momentum has no meaning in block mode"),
                           (["--seeds", "0,1", "--out", "x{seed}"], "one trial per process")):
        with pytest.raises(SystemExit):
            main([*TINY, "--granularity", "block", *flags])
        assert message in capsys.readouterr().err


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.skipif(not torch.distributed.is_gloo_available(), reason="gloo backend not built into this torch")
def test_torchrun_two_ranks_keep_identical_structures(tmp_path, tiny_cifar):
    """Two gloo ranks on the CPU: the run checks after every reallocation that both ranks hold the
    same block structure (and the same parameters at the end), and fails if they diverge."""
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-port", str(_free_port()),
           "-m", "blockdpr.train", *TINY, *BLOCK, *DPR, "--data", str(tiny_cifar), "--epochs", "2", "--out", str(out)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    config = json.loads((out / "config.json").read_text())
    assert config["world_size"] == 2
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and rows[-1]["reallocations"] > 0
    assert (out / "summary.json").is_file()
