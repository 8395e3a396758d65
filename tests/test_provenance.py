"""Provenance records a command that re-runs: `python -m package.module ...` (blockdpr/runinfo.py),
and for a training run the flags that reproduce its settings (RunConfig.to_argv)."""

import dataclasses
import json
import shlex
import sys
import types
from pathlib import Path

import pytest

from blockdpr import runinfo
from blockdpr.config import RunConfig
from blockdpr.train import configs_from_argv, main
from tiny import TINY

NOT_REPRODUCED = ("resume", "overwrite", "stop_after")


def comparable(config: RunConfig) -> RunConfig:
    return dataclasses.replace(config.resolved(), **{k: getattr(RunConfig(), k) for k in NOT_REPRODUCED})


def test_a_module_run_with_python_m_is_recorded_as_one(monkeypatch):
    monkeypatch.setattr(sys, "argv", ["/somewhere/clone/bench/memory.py", "--json", "a b.json"])
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=types.SimpleNamespace(name="bench.memory")))
    assert runinfo.provenance("cpu")["command"] == "python -m bench.memory --json 'a b.json'"
    assert runinfo.provenance("cpu", ["-m", "bench.aot", "--x"])["command"] == "python -m bench.aot --x"
    monkeypatch.setitem(sys.modules, "__main__", types.SimpleNamespace(__spec__=None))
    monkeypatch.setattr(sys, "argv", ["tool.py", "-v"])
    assert runinfo.provenance("cpu")["command"] == "python tool.py -v"


@pytest.mark.parametrize("config", [
    RunConfig(),
    RunConfig(mode="gmp", dense_from=Path("runs/d 0"), gmp_steps=3, epochs=10, out=Path("x/y"), channels_last=False),
    RunConfig(granularity="block", block_size=16, lr=0.05, lr_milestones=(3, 5), snapshot_epochs=(2, 4),
              realloc_periods=((0, 5), (3, 7)), keep_momentum=False, amp=True, train_subset=100, seed=4),
    RunConfig(lr_schedule=((0, 0.1), (2, 0.01)), no_progress=True, data=Path("d/c.zip"), dpr_stop_epoch=3,
              channels_last=True, stop_after=5.0, resume=True),
], ids=["default", "gmp", "block", "schedule"])
def test_the_flags_of_a_config_rebuild_it(config):
    argv = config.to_argv()
    rebuilt, _ = configs_from_argv(argv)
    assert comparable(rebuilt[0]) == comparable(config), argv


def test_a_run_records_a_command_that_reruns_it(tmp_path, tiny_cifar):
    out = tmp_path / "r"
    main([*TINY, "--data", str(tiny_cifar), "--train-subset", "40", "--test-subset", "20", "--epochs", "1",
          "--lr", "0.05", "--out", str(out), "--stop-after", "0"])
    saved = json.loads((out / "config.json").read_text())
    command = shlex.split(saved["provenance"]["command"])
    assert command[:3] == ["python", "-m", "blockdpr.train"]
    rebuilt, _ = configs_from_argv(command[3:])
    assert comparable(rebuilt[0]) == comparable(RunConfig.from_json(saved))
    assert "--stop-after" not in command
