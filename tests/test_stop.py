"""Stopping a run: signals (checkpoint, one line, resume exactly), time-interval checkpoints,
divergence (NaN / inf) and progress lines without a terminal (CPU, tiny WRN)."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from blockdpr import loop
from blockdpr.sparsity import DPRConfig, Reallocator
from blockdpr.train import main
from tiny import TINY, assert_runs_match

REPO = Path(__file__).resolve().parent.parent


def flags(tiny_cifar):
    return [*TINY, "--data", str(tiny_cifar), "--train-subset", "100", "--test-subset", "20", "--epochs", "2",
            "--realloc-periods", "0:2", "--target-pruned", "100"]


@pytest.mark.parametrize("sig, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_a_signal_mid_epoch_checkpoints_exits_with_one_line_and_resumes_exactly(sig, code, tmp_path, tiny_cifar):
    run_flags = flags(tiny_cifar)
    main([*run_flags, "--out", str(tmp_path / "ref")])
    out = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "blockdpr.train", *run_flags, "--out", str(out), "--progress-seconds", "0"],
                            cwd=REPO, env={**os.environ, "PYTHONUNBUFFERED": "1"}, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stderr:  # progress lines: one per step
        lines.append(line)
        if "epoch 1/2 step 2/5" in line:
            proc.send_signal(sig)
            break
    rest = proc.stderr.read()
    proc.wait(timeout=120)
    assert proc.returncode == code, "".join(lines) + rest
    assert "Traceback" not in rest
    assert f"continue with python -m blockdpr.train --out {out} --resume" in rest
    assert not (out / "summary.json").exists()
    step = torch.load(out / "last.pt", weights_only=True)["progress"]["step_in_epoch"]
    assert 2 <= step < 5, "checkpointed mid-epoch, at the next step"
    main(["--out", str(out), "--resume"])
    assert_runs_match(out, tmp_path / "ref")


def test_checkpoints_come_on_a_time_interval(tmp_path, tiny_cifar, monkeypatch):
    written = []
    real = loop.save_checkpoint
    monkeypatch.setattr(loop, "save_checkpoint", lambda state, path: written.append(
        (Path(path).name, state["progress"]["step_in_epoch"])) or real(state, path))
    main([*flags(tiny_cifar), "--epochs", "1", "--out", str(tmp_path / "r"), "--checkpoint-minutes", "1e-9"])
    assert [w for w in written if w[0] == "last.pt"] == [("last.pt", s) for s in (1, 2, 3, 4)] + [("last.pt", 0)]
    assert written.index(("best.pt", 0)) < written.index(("last.pt", 0)), "best.pt is written before last.pt"


@pytest.mark.parametrize("mode", ["dpr", "static"])
def test_a_diverged_run_stops_with_an_error_and_no_summary(mode, tmp_path, tiny_cifar, capsys):
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main([*flags(tiny_cifar), "--epochs", "1", "--mode", mode, "--lr", "1e30", "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 1 and "training diverged" in err and "Traceback" not in err
    assert not (out / "summary.json").exists()


def test_reallocation_refuses_non_finite_weights():
    realloc = Reallocator([4, 4], DPRConfig(2, 0.1, 0.5), seed=0)
    scores = torch.tensor([1.0, 0.1, 2.0, 0.2, float("nan"), 1.0, 0.1, 3.0])
    mask = torch.ones(8, dtype=torch.bool)
    with pytest.raises(FloatingPointError, match="non-finite"):
        realloc.reallocate(scores, mask, step=1)
    assert realloc.threshold == 0.5, "nothing changes"
    state = realloc.state_dict()
    other = Reallocator([4, 4], DPRConfig(2, 0.1, 0.001), seed=0)
    other.load_state_dict(state)
    assert other.threshold == 0.5


def test_progress_lines_without_a_terminal_and_the_run_directory(tmp_path, tiny_cifar, capsys):
    out = tmp_path / "r"
    summary = main([*flags(tiny_cifar), "--epochs", "1", "--out", str(out), "--progress-seconds", "0"])
    err = capsys.readouterr().err
    assert f"run directory: {out}" in err
    steps = [line for line in err.splitlines() if line.startswith("epoch 1/1 step ")]
    assert len(steps) == 5 and all("img/s  ETA epoch " in s and " run " in s for s in steps)
    assert summary["run_dir"] == str(out)
