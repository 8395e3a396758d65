"""What a user reads about progress: epochs numbered from 1 everywhere (bars, lines, stop, resume)
and a run ETA from the first steps on (CPU, tiny WRN)."""

import io
import re
import signal

from rich.console import Console

from blockdpr import progress
from blockdpr.progress import ProgressReporter
from blockdpr.signals import Stopped
from blockdpr.train import main
from tiny import TINY


def test_the_run_eta_is_estimated_during_the_first_epoch(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress, "perf_counter", lambda: now[0])
    console = Console(file=io.StringIO(), force_terminal=True, width=200)
    reporter = ProgressReporter(console, epochs=200, steps_per_epoch=500, images_per_step=100, bars=True, interval=30)
    with reporter:
        reporter.start_epoch(0, 0)
        for done in range(1, 11):
            now[0] += 2.0  # 2 s per step
            reporter.step(0, done)
        run, epoch = (reporter.bars.tasks[i].fields["eta"] for i in (0, 1))
        assert run == progress.clock((200 * 500 - 10) * 2.0) and epoch == progress.clock(490 * 2.0)
        reporter.end_epoch()


def test_a_stop_names_the_epoch_from_1():
    mid = str(Stopped(signal.SIGINT, ["r"], epoch=0, step=2, epochs=200))
    assert "epoch 1/200, step 2" in mid and "epoch 0" not in mid
    assert "end of epoch 3/200" in str(Stopped(signal.SIGTERM, ["r"], epoch=3, step=0, epochs=200))


def test_stop_and_resume_lines_count_epochs_as_the_bars_do(tmp_path, tiny_cifar, capsys):
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "40", "--test-subset", "20", "--epochs", "2",
             "--progress-seconds", "0"]
    out = tmp_path / "r"
    capsys.readouterr()
    main([*flags, "--out", str(out), "--stop-after", "0"])
    main(["--out", str(out), "--resume", "--progress-seconds", "0"])
    err = capsys.readouterr().err
    assert "stopped at epoch 1/2, step 1" in err, err
    assert "resumed" in err and "at epoch 1/2, step 1" in err, err
    assert "epoch 1/2 step 2/2" in err and "epoch 2/2 step 2/2" in err
    assert not re.search(r"\bepoch\s+0(?![:\d])", err), err  # "ETA epoch 0:00:03" is a time
