"""Named presets of python -m blockdpr.reproduce, the dry run's measured time, and a preset's report.

`--preset figure1-short` is the paper's Figure 1a at sparsity 0.9 on a 30-epoch schedule (for a
GPU): 3 trials (seeds 0-2) each of DPR, final structure + re-init, final structure + original
init, static random structure, dense, and the compressed baseline (gmp) with 8 fine-tuning epochs
(its 48-epoch schedule scaled by 8 / 48); no stop-epoch sweep. `--preset figure1-cpu` is Figure 1a
at a scale a 2-core CPU trains: WRN-10-1, 10,000 training images, all test images, 12 epochs, 3
trials each of DPR, reinit, orig-init, static and dense. Runs go to runs/<preset>/, the report to
results/<preset>/. A preset only sets defaults: every flag given on the command line wins.

- `apply_preset(parser, argv)`: sets the defaults of the preset named by `--preset NAME` in argv.
- `predict_seconds(runs, images_per_second)`: training time of a plan at a throughput.
- `measure(opts, trials)`: what one process of `trials` stacked runs of the plan costs on this
  machine (set-up, training step, reallocation, evaluation per test image), timed on the real
  training engine (blockdpr.engine.Engine) at the plan's batch size, writing nothing;
  `prediction(runs, opts)`: the plan's time from those, process by process as reproduce starts
  them; `prediction_text(runs, opts)` is what the dry run prints.
- `write_report(rows, out_dir, preset, roots)`: figure1.md (tables, every run, orderings, where the
  numbers came from), figure1.csv and the figures.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

from . import matrix, results
from .cli import ArgumentParser
from .config import group_settings
from .runinfo import atomic_write_text, device_info
from .setup import resolve_device

PRESETS: dict[str, dict] = {
    "figure1-short": dict(sparsities=[0.9], trials=3, first_seed=0, epochs=30, gmp_epochs=8,
                          conditions=["dpr", "reinit", "orig-init", "static", "dense", "gmp"],
                          root=Path("runs") / "figure1-short"),
    "figure1-cpu": dict(sparsities=[0.9], trials=3, first_seed=0, epochs=12, depth=10, width=1, train_subset=10_000,
                        device="cpu", conditions=["dpr", "reinit", "orig-init", "static", "dense"],
                        root=Path("runs") / "figure1-cpu"),
    # The rules comparison (blockdpr/rules_matrix.py): 48 runs; the short variant is sized, from the
    # issue-15 target rate rather than a GPU measurement, to fit one 10-minute GPU command.
    "rules": dict(rules=["dsr", "set", "rigl", "static"], sparsities=[0.9, 0.8], trials=3, first_seed=0, epochs=30,
                  root=Path("runs") / "rules"),
    "rules-short": dict(rules=["dsr", "set", "rigl", "static"], sparsities=[0.9, 0.8], trials=3, first_seed=0,
                        epochs=10, train_subset=10_000, root=Path("runs") / "rules-short"),
}
CIFAR10_TRAIN_IMAGES, CIFAR10_TEST_IMAGES = 50_000, 10_000
TARGET_IMAGES_PER_SECOND = 100_000  # issue 15: aggregate over stacked trials on one H200
# The paper's ordering in Figure 1a (highest accuracy first); each neighbouring pair is checked.
ORDERING = ("dpr", "orig-init", "reinit", "static")
SHORT_NAMES = {"dpr": "DPR", "orig-init": "orig-init", "reinit": "reinit", "static": "static"}
# Steps timed by `measure` (after warm-up ones) and test images evaluated: enough for a stable mean.
TIMED_STEPS = {"cuda": (20, 100), "cpu": (3, 20)}  # device type -> (warm-up steps, timed steps)
EVAL_IMAGES = 1000


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
    pre = ArgumentParser(prog=parser.prog, add_help=False)
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


# ---- measured time -------------------------------------------------------------------------
def _timed_runs(opts: argparse.Namespace, trials: int, like: matrix.Run | None = None) -> list[matrix.Run]:
    """`trials` runs of one process as reproduce packs it (runs without dependencies that share the
    group settings of `like`, by default the plan's first such run), repeated if the plan has fewer."""
    free = [r for r in matrix.plan(opts) if not r.depends]
    if not free:
        raise ValueError("the plan has no run without dependencies to time")
    first = group_settings(matrix.trial_config(like or free[0], opts))
    if not any(group_settings(matrix.trial_config(r, opts)) == first for r in free):  # e.g. reinit: timed as DPR
        first = group_settings(matrix.trial_config(free[0], opts))
    together = sorted((r for r in free if group_settings(matrix.trial_config(r, opts)) == first),
                      key=lambda r: r.condition != "dpr")  # DPR first: it also reallocates
    return [dataclasses.replace(together[i % len(together)], seed=i) for i in range(trials)]


def _step_configs(opts: argparse.Namespace, runs: list[matrix.Run], images: int, test_images: int):
    """The runs' validated RunConfigs as reproduce builds them (batch size included), on `images`
    training and `test_images` test images (the engine that times them writes nothing: their run
    directories are not touched)."""
    configs = []
    for run in runs:
        config = matrix.trial_config(run, opts)
        configs.append(dataclasses.replace(config, train_subset=images, test_subset=test_images,
                                           no_progress=True, snapshot_epochs=()).check())
    return configs


def device_name(opts: argparse.Namespace) -> str:
    """The GPU's name, or 'CPU <arch> x<cores>'."""
    info = device_info(resolve_device(opts.device))
    return info["gpu_name"] or f"CPU {info['cpu']} x{info['cpu_count']}"


def measure(opts: argparse.Namespace, trials: int, steps: int | None = None, warmup: int | None = None,
            like: matrix.Run | None = None) -> dict:
    """Seconds that one process of `trials` stacked runs of the plan takes, measured on opts.device.

    Builds the real training engine (blockdpr.engine.Engine: data, stacked model, DPR objects,
    optimizer; no run directory, no console) for `trials` of the plan's first process's runs, at the
    plan's batch size: `setup` is that construction (data loading included), `step` the mean of `steps` training steps after `warmup` (defaults: TIMED_STEPS by
    device type), `reallocation` one reallocation of its DPR trials (0 without), `eval_image` the
    evaluation's seconds per test image of all trials. Returns those with "trials", "batch_size",
    "steps" and "device"."""
    from .engine import Engine  # the training engine is only needed to measure

    device = resolve_device(opts.device)
    default_warmup, default_steps = TIMED_STEPS.get(device.type, TIMED_STEPS["cuda"])
    warmup = default_warmup if warmup is None else warmup
    steps = default_steps if steps is None else steps
    runs = _timed_runs(opts, trials, like)
    batch = matrix.train_setting(opts, "batch_size")
    test_images = min(opts.test_subset or CIFAR10_TEST_IMAGES, EVAL_IMAGES)
    started = time.perf_counter()
    configs = _step_configs(opts, runs, batch * (warmup + steps), test_images)
    c = configs[0]
    model = f"WRN-{c.depth}-{c.width}" + (f" block {c.block_size}" if c.granularity == "block" else "")
    engine = Engine(configs)
    setup = time.perf_counter() - started
    engine.start_epoch(0)
    for step in range(warmup):
        engine.step(step)
    _synchronize(device)
    started = time.perf_counter()
    for step in range(warmup, warmup + steps):
        engine.step(step)
    _synchronize(device)
    step_seconds = (time.perf_counter() - started) / steps
    dpr = [t for t, d in enumerate(engine.dprs) if d is not None and d.dynamic]
    started = time.perf_counter()
    if dpr:
        engine.reallocate(dpr)
        _synchronize(device)
    realloc_seconds = time.perf_counter() - started
    engine.evaluate()  # warm-up (and capture)
    started = time.perf_counter()
    engine.evaluate()
    eval_image = (time.perf_counter() - started) / test_images
    return {"setup": setup, "step": step_seconds, "reallocation": realloc_seconds, "eval_image": eval_image,
            "trials": trials, "batch_size": batch, "steps": steps, "device": device_name(opts), "model": model}


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def process_seconds(measured: dict, epochs: int, opts: argparse.Namespace) -> float:
    """Predicted seconds of one process that trains `epochs` epochs of measured["trials"] runs
    (with the most reallocations any sparsity's DPR plans)."""
    per_epoch = (matrix.iterations_per_epoch(opts) * measured["step"]
                 + (opts.test_subset or CIFAR10_TEST_IMAGES) * measured["eval_image"])
    reallocations = max((r.reallocations for r in opts.reallocation.values()), default=0) * epochs / opts.epochs
    return measured["setup"] + epochs * per_epoch + reallocations * measured["reallocation"]


def prediction(runs: list[matrix.Run], opts: argparse.Namespace) -> tuple[float, list[dict]]:
    """(predicted seconds of the plan's unfinished runs, the measurements): the processes as
    reproduce will start them (matrix.jobs, wave by wave), each timed by a measurement of its
    number of trials."""
    waves = [[r for r in runs if not r.depends and r.status() != "done"],
             [r for r in runs if r.depends and r.status() != "done"]]
    processes = [job for wave in waves for job in matrix.jobs(wave, opts.trials_per_process, opts)]
    measured = {}  # (group settings, trials) -> measurement: one per kind of process (model, granularity, ...)
    for job in processes:
        key = (tuple(group_settings(matrix.trial_config(job[0], opts)).items()), len(job))
        if key not in measured:
            measured[key] = measure(opts, len(job), like=job[0])
    seconds = sum(process_seconds(measured[(tuple(group_settings(matrix.trial_config(job[0], opts)).items()), len(job))],
                                  max(matrix.run_epochs(r) for r in job), opts) for job in processes)
    return seconds, list(measured.values())


def prediction_text(runs: list[matrix.Run], opts: argparse.Namespace) -> str:
    """What the dry run prints: training images left, the predicted time on this machine and what it
    was measured on."""
    per_epoch = opts.train_subset or CIFAR10_TRAIN_IMAGES
    images = plan_images(runs, per_epoch)
    if not images:
        return "training images to do: none (every planned run is finished)"
    seconds, measured = prediction(runs, opts)
    lines = [f"training images to do: {images:,} ({images // per_epoch:,} run-epochs x {per_epoch:,})",
             f"predicted time on this machine: {duration(seconds)} (training, evaluation of "
             f"{opts.test_subset or CIFAR10_TEST_IMAGES:,} test images an epoch, process set-up), measured now on "
             f"{measured[0]['device']} at batch {measured[0]['batch_size']}:"]
    for m in measured:
        lines.append(f"  {m['model']}, {m['trials']} trial(s) a process: {m['trials'] * m['batch_size'] / m['step']:,.0f} training img/s "
                     f"({m['steps']} steps), {m['trials'] / m['eval_image']:,.0f} test img/s, set-up {m['setup']:.1f} s")
    target = predict_seconds(runs, TARGET_IMAGES_PER_SECOND, per_epoch)
    lines.append(f"on one H200 at the {TARGET_IMAGES_PER_SECOND:,} img/s aggregate of issue 15 the training would take "
                 f"{duration(target)}")
    return "\n".join(lines)


# ---- the report -----------------------------------------------------------------------------
def compare(a: dict | None, b: dict | None, name_a: str, name_b: str) -> str:
    """'A > B: yes (93.10 +- 0.20 vs 92.50 +- 0.10, +0.60 points, n=3 each)' for two aggregate rows
    (mean, std, n), checked against their spread: yes when the intervals mean +- std are apart with
    A above, no (reversed) when apart with B above, otherwise not resolved at this scale."""
    head = f"{name_a} > {name_b}:"
    missing = [name for name, row in ((name_a, a), (name_b, b)) if row is None]
    if missing:
        return f"{head} not measured (no finished {' or '.join(missing)} run)"
    diff = a["mean"] - b["mean"]
    n = f"n={a['n']} each" if a["n"] == b["n"] else f"n={a['n']} and {b['n']}"
    values = f"{results.fmt(a['mean'], a['std'])} vs {results.fmt(b['mean'], b['std'])}, {diff:+.2f} points, {n}"
    if a["std"] is None or b["std"] is None:
        return f"{head} not resolved ({values}: one trial gives no spread)"
    if a["mean"] - a["std"] > b["mean"] + b["std"]:
        verdict = "yes"
    elif b["mean"] - b["std"] > a["mean"] + a["std"]:
        verdict = "no (reversed)"
    else:
        verdict = "not resolved at this scale (the mean +- std intervals overlap)"
    return f"{head} {verdict} ({values})"


def orderings(rows: list[dict], sparsity: float) -> list[str]:
    """Each neighbouring pair of ORDERING compared (`compare`) at one sparsity, rows of one setting."""
    by_condition = {r["condition"]: r for r in rows if r["sparsity"] == sparsity}
    return [compare(by_condition.get(a), by_condition.get(b), SHORT_NAMES[a], SHORT_NAMES[b])
            for a, b in zip(ORDERING, ORDERING[1:])]


def sessions(roots: list[Path]) -> tuple[str | None, float, bool]:
    """(the last command, the wall seconds of every finished command, whether one is unfinished)
    from the roots' sessions.jsonl (written by reproduce for each command that trains)."""
    command, seconds, open_starts = None, 0.0, 0
    for root in roots:
        path = root / "sessions.jsonl"
        for line in (path.read_text().splitlines() if path.is_file() else []):
            record = json.loads(line)
            command = record["command"]
            if record["event"] == "start":
                open_starts += 1
            else:
                open_starts -= 1
                seconds += record.get("seconds", 0.0)
    return command, seconds, open_starts > 0


def _values(rows: list[dict], key: str, form: str = "{}") -> str:
    """The distinct values of one provenance field over `rows`, joined ('?' if none recorded)."""
    return ", ".join(sorted({form.format(m) for r in rows for m in r["provenance"][key]})) or "?"


def write_report(rows: list[dict], out_dir: Path, preset: str, roots: list[Path]) -> Path:
    """figure1.csv, the figures (results.write_figures) and figure1.md: per setting the table, the
    DPR runs' reallocation, every run, the orderings DPR > orig-init > reinit > static checked
    against their spread, and where the numbers came from (model, epochs, images, data, device,
    torch, commit, wall time, command from sessions.jsonl). rows: results.aggregate's, with
    "provenance" (results.provenance_sets)."""
    results.write_table(rows, out_dir)
    results.write_figures(rows, out_dir)
    command, seconds, running = sessions(roots)
    groups = results.settings(rows)
    lines = [f"# Figure 1a at a reduced scale (`--preset {preset}`)", "",
             "Every number below was produced by the command it names; the paper's 200-epoch WRN-28-2 values appear "
             "only in their own, labelled column.", ""]
    for group in groups:
        title = results.setting_title(group)
        first = group[0]
        lines += [f"## {title}", "",
                  f"- model {first['model']}, {first['schedule']} epochs, {first['train_images'] or '?':,} training "
                  f"images, {_values(group, 'test_images', '{:,}')} test images, data {', '.join(sorted({d for r in group for d in r['data']}))}",
                  f"- device: {_values(group, 'device')}; torch {_values(group, 'torch')}; commit {_values(group, 'commit')}",
                  f"- command: `{command or 'python -m blockdpr.reproduce --preset ' + preset}`",
                  f"- wall time: {duration(seconds) if seconds else 'not recorded'}"
                  + (" (a command is still running or was killed)" if running else ""), "",
                  "### Test accuracy (%)", "", *results.markdown_table(group), "", *results.table_notes(group), ""]
        dynamic = [r for r in group if r["condition"] == "dpr"]
        for r in dynamic:
            moved = "" if r["moved_fraction"] is None else f", moving {r['moved_fraction']:.2f}x its active units in total"
            lines += [f"DPR at sparsity {r['sparsity']} made {r['reallocations']:.0f} reallocations per run on average"
                      f"{moved} (issue 24 asks for >= 40 and >= 1x).", ""]
        lines += ["### Every run", "", *results.per_run_table(group), "",
                  "### Orderings (the paper: DPR > orig-init > reinit > static)", ""]
        for sparsity in sorted({r["sparsity"] for r in group if r["sparsity"] is not None}, reverse=True):
            lines += [f"Sparsity {sparsity}:", ""] + [f"- {text}" for text in orderings(group, sparsity)] + [""]
        lines += ["A comparison holds (yes) when the intervals mean +- std (sample std over trials) of the two "
                  "conditions are apart; otherwise it is not resolved at this scale.", ""]
    figure = "figure1a.png" if len(groups) == 1 else "figure1a-*.png"
    lines += [f"![Figure 1a]({figure})", ""]
    return atomic_write_text(out_dir / "figure1.md", "\n".join(lines))
