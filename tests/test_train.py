"""The training CLI end to end on a tiny WRN and a tiny synthetic CIFAR-10 (python batches)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from blockdpr.sparsity import initial_keep_count
from blockdpr.train import main
from tiny import TINY, metric_rows

REPO = Path(__file__).resolve().parent.parent
def run(tmp_path: Path, name: str, *flags: str) -> tuple[Path, dict]:
    out = tmp_path / name
    summary = main([*TINY, "--out", str(out), *flags])
    return out, summary


def test_help_lists_the_flags():
    out = subprocess.run([sys.executable, "-m", "blockdpr.train", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0
    for flag in ("--granularity", "--mode", "--sparsity", "--dpr-stop-epoch", "--keep-momentum", "--resume", "--compile"):
        assert flag in out.stdout


@pytest.mark.parametrize("flags, message", [
    (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--mode", "reinit"], "needs --structure-from"),
    (["--mode", "gmp"], "needs --dense-from"),
    (["--lr-schedule", "3:0.1"], "must start at 0"),
])
def test_bad_flags_are_named(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_all_modes_run_and_depend_on_each_other(tmp_path, tiny_cifar):
    data = ["--data", str(tiny_cifar), "--epochs", "2"]
    dpr, s = run(tmp_path, "dpr", *data, "--realloc-periods", "0:2", "--target-pruned", "300")
    config = json.loads((dpr / "config.json").read_text())
    assert config["dataset"]["description"] == "CIFAR-10 (official python batches)"
    assert config["parameters"]["sparse_tensor_sparsity"] == pytest.approx(0.9, abs=1e-3)
    rows = metric_rows(dpr)
    assert [r["epoch"] for r in rows] == [0, 1]
    assert all(r["weights_moved"] > 0 for r in rows), "DPR must move weights"
    masks = torch.load(dpr / "final_masks.pt", weights_only=True)
    model_sizes = [m.numel() for m in masks.values()]
    assert s["nonzero_sparse_weights"] == sum(initial_keep_count(n, 0.9) for n in model_sizes)

    static, _ = run(tmp_path, "static", *data)
    assert all(r["weights_moved"] == 0 for r in metric_rows(static))
    for mode in ("reinit", "orig-init"):
        out, _ = run(tmp_path, mode, *data, "--mode", mode, "--structure-from", str(dpr))
        final = torch.load(out / "final_masks.pt", weights_only=True)
        assert all(torch.equal(final[k], masks[k]) for k in masks), f"{mode} must keep the DPR run's final structure"

    dense, s_dense = run(tmp_path, "dense", *data, "--mode", "dense")
    assert s_dense["nonzero_sparse_weights"] is None
    gmp, s_gmp = run(tmp_path, "gmp", *data, "--mode", "gmp", "--dense-from", str(dense),
                     "--epochs", "3", "--gmp-steps", "3", "--gmp-interval", "1")
    assert s_gmp["nonzero_sparse_weights"] == sum(initial_keep_count(n, 0.9) for n in model_sizes)
    assert [r["lr"] for r in metric_rows(gmp)] == [0.0, 0.02, 0.02]


def test_orig_init_requires_a_finished_run(tmp_path, tiny_cifar, capsys):
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--data", str(tiny_cifar), "--out", str(tmp_path / "x"), "--mode", "orig-init",
              "--structure-from", str(tmp_path / "missing")])
    assert e.value.code == 2 and "not a finished run" in capsys.readouterr().err
    assert not (tmp_path / "x").exists(), "nothing is written before the settings are checked"


def test_existing_run_needs_resume_and_incompatible_checkpoint_is_refused(tmp_path, tiny_cifar, capsys):
    data = ["--data", str(tiny_cifar), "--epochs", "1"]
    out, _ = run(tmp_path, "a", *data)
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "a", *data)
    assert e.value.code == 2 and "already holds a run" in capsys.readouterr().err
    (out / "summary.json").unlink()
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "a", *data, "--resume", "--sparsity", "0.8")
    assert e.value.code == 2
    assert "--sparsity: the run has 0.9, the command line gives 0.8" in capsys.readouterr().err


def test_sigkill_mid_epoch_then_resume_matches_an_uninterrupted_run(tmp_path, tiny_cifar):
    flags = [*TINY, "--data", str(tiny_cifar), "--epochs", "3", "--realloc-periods", "0:3", "--target-pruned", "300",
             "--checkpoint-every", "3"]
    reference = tmp_path / "reference"
    main([*flags, "--out", str(reference)])

    killed = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "blockdpr.train", *flags, "--out", str(killed)],
                            cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while not (killed / "last.pt").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (killed / "summary.json").exists(), "the run finished before it could be killed"

    main([*flags, "--out", str(killed), "--resume"])
    assert metric_rows(killed) == metric_rows(reference)
    a = torch.load(killed / "last.pt", weights_only=True)
    b = torch.load(reference / "last.pt", weights_only=True)
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
