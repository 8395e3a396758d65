"""A run directory: what it holds, when a run may start in it, and its JSON files.

Every file is written atomically (blockdpr.runinfo), in an order that keeps the directory
consistent after a kill at any instruction:

- init_weights.pt (DPR runs), then config.json, then an empty metrics.jsonl: a directory without
  config.json holds no run yet (the same command starts it anew, rewriting init_weights.pt), one
  with config.json and no last.pt is a run that never checkpointed (--resume starts it from the
  beginning with its own settings);
- at an epoch end: best.pt and epochE.pt before last.pt, so last.pt never points past a best.pt
  that was not written; metrics.jsonl is rewritten whole from the records that last.pt carries,
  so a torn or deleted metrics.jsonl is rebuilt on resume;
- final_masks.pt / final_dense.pt, then summary.json last (its presence means the run is done).

Temp files of interrupted writes are removed when the next process opens the directory.
"""

from __future__ import annotations

import json
from pathlib import Path

from .config import ConfigError, RunConfig
from .runinfo import atomic_write_json, atomic_write_text, remove_stale_temps
from .source_runs import source_run_errors

# The files a run writes (epochE.pt snapshots besides); --overwrite deletes exactly these.
RUN_FILES = ("config.json", "metrics.jsonl", "last.pt", "best.pt", "init_weights.pt", "final_masks.pt",
             "final_dense.pt", "summary.json")


def holds_run(out: Path) -> bool:
    """Whether `out` holds (part of) a run."""
    return any((out / name).exists() for name in ("config.json", "last.pt", "summary.json"))


def run_dir_errors(config: RunConfig) -> list[str]:
    """Why a run of `config` cannot start in its directory (empty: it can)."""
    out = config.out
    if out.exists() and not out.is_dir():
        return [f"--out {out} is a file, not a run directory"]
    if config.resume:
        if not holds_run(out):
            return [f"--resume: no run in {out} (no config.json or last.pt)"]
    elif holds_run(out) and not config.overwrite:
        return [f"{out} already holds a run: pass --resume to continue it, --overwrite to start anew, or choose another --out"]
    return source_run_errors(config)


def open_run_dir(config: RunConfig) -> None:
    """Create the directory, remove temp files of interrupted writes, and with --overwrite the old run's files."""
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(out)
    if config.overwrite and not config.resume:
        for path in [*(out / name for name in RUN_FILES), *out.glob("epoch*.pt")]:
            path.unlink(missing_ok=True)


def saved_config(out: Path) -> RunConfig:
    """The settings stored in `out`/config.json, or ConfigError saying what is wrong with it."""
    path = out / "config.json"
    try:
        obj = json.loads(path.read_text())
        if not isinstance(obj, dict):
            raise ValueError(f"expected a JSON object, found {type(obj).__name__}")
        return RunConfig.from_json(obj)
    except FileNotFoundError:
        if (out / "last.pt").is_file():
            raise ConfigError([f"--resume: {path} (the run's settings) is missing, so the checkpoint {out / 'last.pt'} "
                               "cannot be resumed: restore config.json, or start anew with --overwrite"]) from None
        raise ConfigError([f"--resume: {path} is missing: this directory holds no resumable run"]) from None
    except (OSError, ValueError, TypeError) as e:
        raise ConfigError([f"{path} is unreadable or garbled ({e}): restore it, or start a new run in another --out"]) from None


def write_config(out: Path, config: RunConfig, extra: dict) -> None:
    """config.json: every setting at the top level, plus `extra` (provenance, data, parameter counts...)."""
    atomic_write_json(out / "config.json", {**config.to_json(), **extra})


def write_metrics(out: Path, records: list[dict]) -> None:
    """metrics.jsonl: one JSON line per finished epoch, rewritten whole and atomically."""
    atomic_write_text(out / "metrics.jsonl", "".join(json.dumps(r) + "\n" for r in records))


def write_summary(out: Path, summary: dict) -> None:
    atomic_write_json(out / "summary.json", summary)
