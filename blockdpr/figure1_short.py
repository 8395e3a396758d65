"""Named presets of python -m blockdpr.reproduce, with the predicted time and the report of the short Figure 1a.

`--preset figure1-short` is the paper's Figure 1a at sparsity 0.9 on a 30-epoch schedule: 3 trials
(seeds 0-2) each of DPR, final structure + re-init, final structure + original init, static random
structure, dense, and the compressed baseline (gmp) with 8 fine-tuning epochs (its 48-epoch
schedule scaled by 8 / 48); no stop-epoch sweep. Runs go to runs/figure1-short/, the report to
results/figure1-short/. A preset only sets defaults: every flag given on the command line wins.

- `apply_preset(parser, argv)`: sets the defaults of the preset named by `--preset NAME` in argv.
- `predict_seconds(runs, images_per_second)`: training time of a plan at a throughput.
- `measure_throughput(opts)`: aggregate training images/s of this machine, timed on the real
  training step (blockdpr.engine.Engine) of the plan's first process (its trials stacked);
  `cached_throughput(opts)` keeps it in <root>/throughput.json, keyed by device and step settings,
  so a second dry run is instant. `prediction_text(runs, opts)` is what the dry run prints.
- `write_report(rows, out_dir)`: figure1-short.md (table, Figure 1a, published values, orderings).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import matrix, results
from .config import group_settings
from .runinfo import atomic_write_json, atomic_write_text, device_info, git_info
from .setup import resolve_device

PRESETS: dict[str, dict] = {
    "figure1-short": dict(sparsities=[0.9], trials=3, first_seed=0, epochs=30, gmp_epochs=8,
                          conditions=["dpr", "reinit", "orig-init", "static", "dense", "gmp"],
                          root=Path("runs") / "figure1-short"),
}
CIFAR10_TRAIN_IMAGES, CIFAR10_TEST_IMAGES = 50_000, 10_000
TARGET_IMAGES_PER_SECOND = 100_000  # issue 15: aggregate over stacked trials on one H200
BUDGET_SECONDS = 9 * 60  # issue 15: the short Figure 1a within one 10-minute GPU command
# The paper's ordering in Figure 1a (highest accuracy first); each neighbouring pair is checked.
ORDERING = ("dpr", "orig-init", "reinit", "static")
SHORT_NAMES = {"dpr": "DPR", "orig-init": "orig-init", "reinit": "reinit", "static": "static"}
# Steps timed by measure_throughput (after warm-up ones), and the per-trial batch on a CPU, where a
# WRN-28-2 step at batch 100 takes seconds.
TIMED_STEPS = {"cuda": (20, 100), "cpu": (1, 2)}  # device type -> (warm-up steps, timed steps)
CPU_BATCH = 4


# ---- presets --------------------------------------------------------------------------------
def add_preset_argument(group) -> None:
    """Add --preset NAME to a parser or argument group (apply_preset gives it effect)."""
    group.add_argument("--preset", choices=sorted(PRESETS), default=None,
                       help="a named set of defaults (explicit flags override them): " + "; ".join(
                           f"{name}: " + " ".join(f"--{k.replace('_', '-')} {_flag_text(v)}" for k, v in values.items())
                           for name, values in PRESETS.items()))


def _flag_text(value) -> str:
    return ",".join(map(str, value)) if isinstance(value, list) else str(value)


def apply_preset(parser: argparse.ArgumentParser, argv: list[str] | None = None) -> str | None:
    """Make the preset named by `--preset NAME` in argv (default sys.argv[1:]) the parser's
    defaults, so that flags given explicitly still override it. Returns NAME, or None without
    --preset. An unknown NAME is a parser error naming the known ones."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--preset", default=None)
    known, _ = pre.parse_known_args(sys.argv[1:] if argv is None else argv)
    if known.preset is None:
        return None
    if known.preset not in PRESETS:
        parser.error(f"--preset {known.preset!r} is not a preset: choose from {', '.join(sorted(PRESETS))}")
    parser.set_defaults(**PRESETS[known.preset])
    return known.preset


# ---- planned time ---------------------------------------------------------------------------
def plan_images(runs: list[matrix.Run], images_per_epoch: int = CIFAR10_TRAIN_IMAGES) -> int:
    """Training images the runs still have to train (every planned one, for a fresh root)."""
    return sum(matrix.run_epochs(r) for r in runs) * images_per_epoch


def predict_seconds(runs: list[matrix.Run], images_per_second: float,
                    images_per_epoch: int = CIFAR10_TRAIN_IMAGES) -> float:
    """Seconds of training left in `runs` at an aggregate throughput (evaluation not counted)."""
    if not images_per_second > 0:
        raise ValueError(f"images_per_second must be positive, got {images_per_second!r}")
    return plan_images(runs, images_per_epoch) / images_per_second


def duration(seconds: float) -> str:
    """'4.0 min', '2.5 h' or '3.1 days'."""
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h" if seconds < 2 * 86400 else f"{seconds / 86400:.1f} days"


# ---- measured throughput --------------------------------------------------------------------
def _timed_trials(opts: argparse.Namespace, trials: int | None) -> list[matrix.Run]:
    """The runs whose step is timed: the plan's first process as reproduce packs it from new runs (those
    sharing the first run's group settings; for the preset DPR, static and dense: 9 trials), at most
    `trials` of them."""
    free = [r for r in matrix.plan(opts) if not r.depends]
    if not free:
        raise ValueError("the plan has no run without dependencies to time")
    first = group_settings(matrix.trial_config(free[0], opts))
    together = [r for r in free if group_settings(matrix.trial_config(r, opts)) == first]
    return together[:min(opts.trials_per_process, trials or opts.trials_per_process)]


def _step_configs(opts: argparse.Namespace, runs: list[matrix.Run], images: int, batch: int):
    """The runs' validated RunConfigs (as reproduce builds them), on `images` training images (the
    engine that times them writes nothing: their run directories are not touched)."""
    configs = []
    for run in runs:
        config = matrix.trial_config(run, opts)
        configs.append(dataclasses.replace(config, batch_size=batch, train_subset=images, test_subset=batch,
                                           no_progress=True, snapshot_epochs=()).check())
    return configs


def timed_batch(opts: argparse.Namespace) -> int:
    """The per-trial batch of the timed steps: --batch-size, at most CPU_BATCH on a CPU."""
    return opts.batch_size if resolve_device(opts.device).type != "cpu" else min(opts.batch_size, CPU_BATCH)


def device_name(opts: argparse.Namespace) -> str:
    """The GPU's name, or 'CPU <arch> x<cores>'."""
    info = device_info(resolve_device(opts.device))
    return info["gpu_name"] or f"CPU {info['cpu']} x{info['cpu_count']}"


def throughput_key(opts: argparse.Namespace, trials: int, batch: int) -> str:
    """What a measurement depends on: device, model, trials x batch, precision, step options, and the
    code (git commit, torch version): a new commit is measured again."""
    o = opts.train_overrides
    options = [name for name in ("compile", "cuda_graph", "channels_last")
               if o.get(name, getattr(opts, name, False))]
    precision = "bf16" if o.get("amp", opts.amp) else "fp32"
    commit = (git_info()["commit"] or "no git")[:12]
    return (f"{device_name(opts)} | WRN-{opts.depth}-{opts.width} | {trials} trials x batch {batch} | {precision}"
            + "".join(f" | {name}" for name in options) + f" | {commit} | torch {torch.__version__}")


def measure_throughput(opts: argparse.Namespace, trials: int | None = None, steps: int | None = None,
                       warmup: int | None = None) -> dict:
    """Aggregate training images/s of the plan's first process (its trials stacked), on opts.device.

    Builds the real training engine (blockdpr.engine.Engine: data, stacked model, DPR objects,
    optimizer; no run directory) for up to `trials` of the plan's first process's runs, runs `warmup` steps, then
    times `steps` steps (defaults: TIMED_STEPS by device type). On a CPU the per-trial batch is at
    most CPU_BATCH. Training steps only: no reallocation falls in so few steps, no evaluation.
    Returns {"images_per_second", "trials", "batch_size", "steps", "seconds", "device", "key",
    "measured_utc"}."""
    from .engine import Engine  # the training engine is only needed to measure

    device = resolve_device(opts.device)
    runs = _timed_trials(opts, trials)
    default_warmup, default_steps = TIMED_STEPS.get(device.type, TIMED_STEPS["cuda"])
    warmup = default_warmup if warmup is None else warmup
    steps = default_steps if steps is None else steps
    batch = timed_batch(opts)
    engine = Engine(_step_configs(opts, runs, batch * (warmup + steps), batch))
    engine.start_epoch(0)
    for step in range(warmup):
        engine.step(step)
    _synchronize(device)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        engine.step(step)
    _synchronize(device)
    seconds = time.perf_counter() - started
    return {"images_per_second": len(runs) * batch * steps / seconds, "trials": len(runs), "batch_size": batch,
            "steps": steps, "seconds": seconds, "device": device_name(opts),
            "key": throughput_key(opts, len(runs), batch),
            "measured_utc": datetime.now(timezone.utc).isoformat(timespec="seconds")}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cached_throughput(opts: argparse.Namespace, trials: int | None = None) -> tuple[dict, bool]:
    """(measurement, whether it came from the cache): <root>/throughput.json holds one measurement
    per throughput_key; a missing one is measured (measure_throughput) and added."""
    path = opts.root / "throughput.json"
    runs = _timed_trials(opts, trials)
    key = throughput_key(opts, len(runs), timed_batch(opts))
    try:
        cache = json.loads(path.read_text()) if path.is_file() else {}
    except ValueError:  # a garbled cache is measured again and rewritten
        cache = {}
    if key in cache:
        return cache[key], True
    results.console.print(f"measuring this machine's training throughput ({key}) ...", highlight=False)
    measured = measure_throughput(opts, trials)
    atomic_write_json(path, {**cache, key: measured})
    return measured, False


def prediction_text(runs: list[matrix.Run], opts: argparse.Namespace) -> str:
    """What the dry run prints: training images left, and the time at the target throughput and at
    this machine's measured one."""
    per_epoch = opts.train_subset or CIFAR10_TRAIN_IMAGES
    images = plan_images(runs, per_epoch)
    run_epochs = images // per_epoch
    if not images:
        return "training images to do: none (every planned run is finished)"
    target = predict_seconds(runs, TARGET_IMAGES_PER_SECOND, per_epoch)
    measured, cached = cached_throughput(opts)
    ips = measured["images_per_second"]
    rate = f"{ips:,.0f}" if ips >= 100 else f"{ips:.3g}"
    return "\n".join([
        f"training images to do: {images:,} ({run_epochs:,} run-epochs x {per_epoch:,})",
        f"predicted training time at the target {TARGET_IMAGES_PER_SECOND:,} img/s aggregate: {duration(target)} "
        f"({'within' if target <= BUDGET_SECONDS else 'over'} the {BUDGET_SECONDS // 60}-minute budget)",
        f"predicted training time on this machine: {duration(images / ips)} at {rate} img/s "
        f"aggregate, measured {'earlier (cached in ' + str(opts.root / 'throughput.json') + ')' if cached else 'now'} "
        f"on {measured['device']}: {measured['trials']} stacked trials x batch {measured['batch_size']}, "
        f"{measured['steps']} training steps",
        f"(training steps only: the evaluation of {run_epochs * (opts.test_subset or CIFAR10_TEST_IMAGES):,} test "
        "images (forward only), reallocations and process start-ups are not counted)",
    ])


# ---- the report -----------------------------------------------------------------------------
def compare(a: dict | None, b: dict | None, name_a: str, name_b: str) -> str:
    """'A > B: yes (+0.42 points, 2 SE = 0.30, n=3 each)' for two aggregate rows (mean, std, n).

    yes: the difference of means exceeds twice its standard error sqrt(s_a^2 / n_a + s_b^2 / n_b);
    no (reversed): it is below minus that; otherwise not resolved at this n."""
    head = f"{name_a} > {name_b}:"
    missing = [name for name, row in ((name_a, a), (name_b, b)) if row is None]
    if missing:
        return f"{head} not measured (no finished {' or '.join(missing)} run)"
    diff = a["mean"] - b["mean"]
    n = f"n={a['n']} each" if a["n"] == b["n"] else f"n={a['n']} and {b['n']}"
    if a["std"] is None or b["std"] is None:
        return f"{head} not resolved ({diff:+.2f} points, {n}: one trial gives no spread)"
    two_se = 2 * math.sqrt(a["std"] ** 2 / a["n"] + b["std"] ** 2 / b["n"])
    verdict = "yes" if diff > two_se else "no (reversed)" if diff < -two_se else "not resolved"
    return f"{head} {verdict} ({diff:+.2f} points, 2 SE = {two_se:.2f}, {n})"


def orderings(rows: list[dict], sparsity: float, schedule: int) -> list[str]:
    """Each neighbouring pair of ORDERING compared (`compare`) at one sparsity and schedule."""
    by_condition = {r["condition"]: r for r in rows if r["sparsity"] == sparsity and r["schedule"] == schedule}
    return [compare(by_condition.get(a), by_condition.get(b), SHORT_NAMES[a], SHORT_NAMES[b])
            for a, b in zip(ORDERING, ORDERING[1:])]


def write_report(rows: list[dict], out_dir: Path) -> Path:
    """figure1.md / .csv and figure1a.png (results.write_table, write_figures), and figure1-short.md
    assembling them with the published values and the orderings. rows: results.aggregate's."""
    _, table = results.write_table(rows, out_dir)
    results.write_figures(rows, out_dir)
    schedules = sorted({r["schedule"] for r in rows})
    data = ", ".join(sorted({d for r in rows for d in r["data"]}))
    lines = [f"# Figure 1a, short schedule: {data}", "",
             "Made by `python -m blockdpr.reproduce --preset figure1-short` (runs in `runs/figure1-short/`); "
             "the same command continues an interrupted matrix and rewrites this page.", "",
             "## Test accuracy (%)", "", table.read_text().rstrip(), "",
             f"Ours: {', '.join(map(str, schedules))}-epoch schedule on {data}. "
             "Published: the DSR paper's (Mostafa & Wang) numbers, 200 epochs on lossless CIFAR-10, mean +- std of "
             "5 runs. The absolute values are therefore not comparable; compare our conditions with each other "
             "and with our own dense run.", "",
             "![Figure 1a](figure1a.png)", "",
             "## Orderings (the paper: DPR > orig-init > reinit > static)", ""]
    for schedule in schedules:
        for sparsity in sorted({r["sparsity"] for r in rows if r["sparsity"] is not None and r["schedule"] == schedule},
                               reverse=True):
            lines.append(f"Sparsity {sparsity}, {schedule} epochs:")
            lines += [""] + [f"- {text}" for text in orderings(rows, sparsity, schedule)] + [""]
    lines.append("A comparison holds (yes) when the difference of the mean accuracies exceeds twice its standard "
                 "error, sqrt(s_a^2 / n_a + s_b^2 / n_b); no (reversed) when it is below minus that; otherwise the "
                 "difference is not resolved by this many trials.")
    return atomic_write_text(out_dir / "figure1-short.md", "\n".join(lines) + "\n")
