"""The training CLI's settings: validation before anything is written, --help, list flags, escaping,
default run directories, and resume with the run's own settings (CPU, tiny WRN)."""

import errno
import json
import os

import pytest
import torch

from blockdpr import runinfo
from blockdpr.config import RunConfig
from blockdpr.trial import RunState, restore_best
from blockdpr.train import build_parser, configs_from_argv, main
from tiny import TINY, assert_runs_match

BAD = [
    (["--lr", "-0.1"], "--lr must be finite and >= 0"),
    (["--lr", "nan"], "--lr must be finite and >= 0"),
    (["--momentum", "-0.5"], "--momentum must be in [0, 1)"),
    (["--weight-decay", "-1"], "--weight-decay must be finite and >= 0"),
    (["--target-pruned", "0"], "--target-pruned must be positive"),
    (["--tolerance", "1.5"], "--tolerance must be in [0, 1)"),
    (["--initial-threshold", "0"], "--initial-threshold must be finite and > 0"),
    (["--initial-threshold", "nan"], "--initial-threshold must be finite and > 0"),
    (["--depth", "11"], "--depth must be 6n + 4"),
    (["--width", "0"], "--width must be positive"),
    (["--device", "bogus"], "--device must be auto, cpu, cuda or cuda:N"),
    (["--lr-gamma", "-1"], "--lr-gamma must be finite and > 0"),
    (["--lr-schedule", "0:0.1,5:-0.01"], "--lr-schedule must be learning rates that are finite and >= 0"),
    (["--lr-schedule", "3:0.1"], "--lr-schedule: epochs must start at 0"),
    (["--checkpoint-every", "-1"], "--checkpoint-every must be >= 0"),
    (["--stop-after", "-1"], "--stop-after must be >= 0"),
    (["--dpr-stop-epoch", "-1"], "--dpr-stop-epoch must be >= 0"),
    (["--block-size", "7"], "--block-size 7 has no meaning in element mode"),
    (["--granularity", "block", "--block-size", "7"], "--block-size must be one of"),
    (["--cuda-graph"], "--cuda-graph needs a CUDA device"),
    (["--sparsity", "1.5"], "--sparsity must be in (0, 1)"),
    (["--mode", "reinit"], "needs --structure-from"),
    (["--mode", "gmp", "--dense-from", "d", "--gmp-steps", "30"], "--mode gmp prunes until epoch 60, beyond --epochs 48"),
]


@pytest.mark.parametrize("flags, message", BAD, ids=[" ".join(f) for f, _ in BAD])
def test_bad_settings_exit_2_naming_the_flag_before_writing_anything(flags, message, tmp_path, capsys):
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--out", str(out), *flags])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert message in err
    assert "Traceback" not in err
    assert not out.exists(), "nothing may be written before the settings are checked"


def test_every_error_gets_its_own_line(tmp_path, capsys):
    with pytest.raises(SystemExit):
        main([*TINY, "--out", str(tmp_path / "r"), "--lr", "-1", "--momentum", "2", "--width", "0"])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 3
    for flag in ("--lr ", "--momentum ", "--width "):
        assert sum(flag in e for e in errors) == 1, flag


def test_out_naming_a_file_is_refused(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("mine")
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--out", str(target)])
    assert e.value.code == 2 and "is a file, not a run directory" in capsys.readouterr().err
    assert target.read_text() == "mine"


def test_error_text_keeps_brackets_and_survives_markup_in_paths(tmp_path, capsys):
    source = tmp_path / "[/x]" / "[n, 3072]"
    with pytest.raises(SystemExit) as e:
        main([*TINY, "--out", str(tmp_path / "r"), "--mode", "reinit", "--structure-from", str(source)])
    assert e.value.code == 2
    assert f"{source} is not a finished run" in capsys.readouterr().err


def test_help_shows_each_default_once_and_list_flags_take_commas_and_spaces():
    text = build_parser().format_help()
    entries = text.split("\n  --")[1:]
    assert len(entries) > 30
    for entry in entries:
        assert entry.lower().count("(default") <= 1, entry
    assert "(default: 0.1)" in next(e for e in entries if e.startswith("lr LR"))
    assert "(default: 10.0)" in next(e for e in entries if e.startswith("checkpoint-minutes"))
    spaced, _ = configs_from_argv(["--seeds", "0", "1", "--out", "r{seed}", "--lr-milestones", "3", "5"])
    commas, _ = configs_from_argv(["--seeds", "0,1", "--out", "r{seed}", "--lr-milestones", "3,5"])
    assert spaced == commas and [c.seed for c in spaced] == [0, 1] and spaced[0].lr_milestones == (3, 5)


def test_default_run_directories_name_granularity_and_block_size():
    assert str(RunConfig().resolved().out) == "runs/dpr-element-s0.9-seed0"
    assert str(RunConfig(granularity="block", block_size=16, seed=2).resolved().out) == "runs/dpr-block16-s0.9-seed2"
    assert str(RunConfig(mode="dense").resolved().out) == "runs/dense-seed0"


def small(tiny_cifar):
    return [*TINY, "--data", str(tiny_cifar), "--train-subset", "40", "--test-subset", "20", "--epochs", "2",
            "--realloc-periods", "0:1", "--target-pruned", "100"]


def test_bare_resume_restores_the_runs_settings_and_refuses_contradictions(tmp_path, tiny_cifar, capsys):
    flags = [*small(tiny_cifar), "--lr", "0.05", "--sparsity", "0.8", "--snapshot-epochs", "1"]
    main([*flags, "--out", str(tmp_path / "ref")])
    cut = tmp_path / "cut"
    assert main([*flags, "--out", str(cut), "--stop-after", "0"]) is None
    config = (cut / "config.json").read_bytes()
    capsys.readouterr()
    with pytest.raises(SystemExit) as e:
        main(["--out", str(cut), "--resume", "--lr", "0.1", "--test-subset", "10", "--sparsity", "0.8"])
    err = capsys.readouterr().err
    assert e.value.code == 2
    assert "--lr: the run has 0.05, the command line gives 0.1" in err
    assert "--test-subset: the run has 20, the command line gives 10" in err
    assert "--sparsity" not in err, "a flag that agrees with the run is fine"
    assert (cut / "config.json").read_bytes() == config
    main(["--out", str(cut), "--resume", "--no-progress"])  # nothing but the directory
    assert_runs_match(cut, tmp_path / "ref")
    assert (cut / "epoch1.pt").is_file(), "the run's --snapshot-epochs are kept"


def test_a_directory_holding_a_run_needs_resume_or_overwrite(tmp_path, tiny_cifar, capsys):
    flags = [*small(tiny_cifar), "--epochs", "1", "--out", str(tmp_path / "a")]
    main(flags)
    with pytest.raises(SystemExit) as e:
        main([*flags, "--mode", "static"])
    assert e.value.code == 2 and "already holds a run: pass --resume" in capsys.readouterr().err
    summary = main([*flags, "--mode", "static", "--overwrite"])
    assert summary["mode"] == "static"
    assert not (tmp_path / "a" / "init_weights.pt").exists(), "--overwrite removes the old run's files"


def test_a_garbled_config_is_a_clear_error_on_resume(tmp_path, tiny_cifar, capsys):
    out = tmp_path / "r"
    main([*small(tiny_cifar), "--out", str(out), "--stop-after", "0"])
    (out / "config.json").write_text('{"mode": "dpr", ')
    with pytest.raises(SystemExit) as e:
        main(["--out", str(out), "--resume"])
    assert e.value.code == 2 and "config.json is unreadable or garbled" in capsys.readouterr().err


def test_a_full_disk_at_the_first_save_is_one_line(tmp_path, tiny_cifar, capsys, monkeypatch):
    def full(fd):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(runinfo.os, "fsync", full)
    out = tmp_path / "r"
    with pytest.raises(SystemExit) as e:
        main([*small(tiny_cifar), "--out", str(out)])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "No space left on device" in err and "Traceback" not in err
    assert list(out.iterdir()) == [], "an interrupted write leaves no temp file"


class FullFile:
    """A binary file on a disk with 1000 bytes free: a write past them raises ENOSPC (as the OS does)."""

    def __init__(self, f):
        self.f, self.free = f, 1000

    def write(self, data):
        if len(data) > self.free:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.free -= len(data)
        return self.f.write(data)

    def __getattr__(self, name):
        return getattr(self.f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.f.close()


def fill_disk_at(monkeypatch, name: str, nth: int) -> None:
    """The disk is full from the nth atomic write of `name` on (torch.save turns that ENOSPC into a
    RuntimeError 'unexpected pos', chained to the OSError)."""
    real_mkstemp, real_fdopen, full, seen = runinfo.tempfile.mkstemp, runinfo.os.fdopen, set(), []

    def mkstemp(prefix, suffix, dir):
        fd, tmp = real_mkstemp(prefix=prefix, suffix=suffix, dir=dir)
        if prefix == f".{name}.":
            seen.append(fd)
            if len(seen) >= nth:
                full.add(fd)
        return fd, tmp
    monkeypatch.setattr(runinfo.tempfile, "mkstemp", mkstemp)
    monkeypatch.setattr(runinfo.os, "fdopen", lambda fd, mode: FullFile(real_fdopen(fd, mode)) if fd in full else real_fdopen(fd, mode))


@pytest.mark.parametrize("name, nth, resumable", [
    ("init_weights.pt", 1, False), ("config.json", 1, False), ("best.pt", 1, True), ("last.pt", 2, True),
])
def test_a_full_disk_is_one_error_line_naming_the_file_and_a_hint(name, nth, resumable, tmp_path, tiny_cifar, capsys,
                                                                  monkeypatch):
    out = tmp_path / "r"
    fill_disk_at(monkeypatch, name, nth)
    with pytest.raises(SystemExit) as e:
        main([*small(tiny_cifar), "--out", str(out)])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert e.value.code == 2 and "Traceback" not in err, err
    assert errors == [f"error: cannot write {out / name}: No space left on device"], err
    hint = err.splitlines()[-1]
    assert hint.startswith("free some space") and ("--resume" in hint) == resumable, hint
    assert not list(out.glob(".*.tmp")), "no temp file is left"
    monkeypatch.undo()
    if name == "last.pt":  # the earlier files are intact: the run resumes from epoch 1's checkpoint
        assert torch.load(out / "last.pt", weights_only=True)["progress"]["epoch"] == 1
        json.loads((out / "config.json").read_text())
    if resumable:
        main(["--out", str(out), "--resume"])
        assert (out / "summary.json").is_file()


@pytest.mark.parametrize("damage", ["torn", "deleted"])
def test_metrics_and_temp_files_are_repaired_on_resume(damage, tmp_path, tiny_cifar):
    """A kill after the epoch-1 checkpoint, with metrics.jsonl torn or lost and a temp file left; a lost best.pt."""
    flags = small(tiny_cifar)
    ref = tmp_path / "ref"
    main([*flags, "--out", str(ref), "--snapshot-epochs", "1"])
    ref_last = runinfo.json.loads((ref / "config.json").read_text())
    cut = tmp_path / "cut"
    cut.mkdir()
    runinfo.atomic_write_json(cut / "config.json", {**ref_last, "out": str(cut), "snapshot_epochs": []})
    (cut / "last.pt").write_bytes((ref / "epoch1.pt").read_bytes())
    (cut / "init_weights.pt").write_bytes((ref / "init_weights.pt").read_bytes())
    if damage == "torn":
        (cut / "metrics.jsonl").write_text((ref / "metrics.jsonl").read_text()[:40])
    stale = cut / ".last.pt.abc123.tmp"
    stale.write_bytes(b"half a checkpoint")
    main(["--out", str(cut), "--resume"])
    assert not stale.exists()
    assert_runs_match(cut, ref)
    rows = [json.loads(line) for line in (cut / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    lost = tmp_path / "lost"  # best.pt lost after the epoch-1 checkpoint: last.pt of that epoch is the same
    lost.mkdir()
    (lost / "last.pt").write_bytes((ref / "epoch1.pt").read_bytes())
    state = RunState(**torch.load(lost / "last.pt", weights_only=True)["progress"])
    assert state.best_epoch == 0
    restore_best(lost, state)
    assert (lost / "best.pt").read_bytes() == (lost / "last.pt").read_bytes()
