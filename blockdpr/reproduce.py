"""The paper's Figure 1 in one command: python -m blockdpr.reproduce --help

Plans the matrix of runs (for each sparsity: DPR, DPR with the final structure and a new random
init (reinit), ... with its original init (orig-init), a static random structure, DPR stopped
after E epochs for several E, the compressed baseline (gmp: a trained dense model pruned
gradually, Zhu & Gupta); and the dense reference), runs what is missing, skips what is done and
resumes what was interrupted (each run is a run directory of blockdpr.train), in dependency
order (reinit / orig-init after their DPR run, gmp after its dense run). Trials of one mode that
are at the same point are trained together in one process (--trials-per-process), as one
stacked model (blockdpr/stacked.py). Then it aggregates the run directories into a table
(mean +- std over trials, n) and the figures (--results).

Trial k of every condition uses seed k (--first-seed + k): DPR, its stopped variants, static
and orig-init of one seed start from the same initial values (reinit draws new ones), and
gmp trial k prunes dense trial k.

Shorter schedules: --epochs E scales every epoch of the paper's 200-epoch schedule by E / 200,
rounded half up: the lr milestones 60, 120, 160, the reallocation-period epochs 0, 25, 80, 140,
the DPR stop epoch 190 and the stop-epoch sweep. gmp keeps its own 48-epoch fine-tuning schedule
(20 prunings, one every 2 epochs) unless --gmp-epochs is given, which scales it by
gmp_epochs / 48 in the same way.
"""

from __future__ import annotations

import argparse
import csv
import dataclasses
import json
import math
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import figure1_short as presets
from . import train as train_lib
from .checkpoint import CheckpointError, load_checkpoint
from .cli import HelpFormatter, add_list_argument, escape
from .config import ConfigError, RunConfig
from .run_dir import saved_config
from .runinfo import atomic_write, atomic_write_json, atomic_write_text

console = Console(stderr=True, soft_wrap=True)

PAPER_EPOCHS = 200
PAPER_MILESTONES = (60, 120, 160)
PAPER_REALLOC_PERIODS = ((0, 100), (25, 200), (80, 400), (140, 800))
PAPER_DPR_STOP = 190
# The stop-epoch sweep of Figure 1b/c (our choice of points between 10 and 180; a flag).
PAPER_STOP_EPOCHS = (10, 20, 40, 60, 80, 100, 120, 140, 160, 180)
GMP_PAPER_EPOCHS, GMP_PAPER_STEPS, GMP_PAPER_INTERVAL = 48, 20, 2
GMP_PAPER_LR = ((0, 0.0), (1, 0.02), (25, 0.004), (35, 0.0008))

CONDITIONS = ("dpr", "reinit", "orig-init", "static", "stop", "gmp", "dense")
LABELS = {"dense": "dense", "dpr": "DPR", "reinit": "final structure + random re-init",
          "orig-init": "final structure + original init", "static": "static random structure",
          "gmp": "compressed (gradual pruning)", "stop": "DPR stopped at epoch E"}
# What the DSR authors published for WRN-28-2 on CIFAR-10 (mean +- std of 5 runs; dense: mean).
PUBLISHED = {("dense", None): (94.70, None), ("dpr", 0.9): (93.59, 0.17), ("dpr", 0.8): (94.40, 0.11),
             ("static", 0.9): (92.04, 0.31), ("static", 0.8): (93.48, 0.11),
             ("gmp", 0.9): (93.75, 0.08), ("gmp", 0.8): (94.13, 0.13)}


def scaled(epoch: int, scale: float) -> int:
    """An epoch of the paper's schedule on a schedule `scale` times as long (rounded half up)."""
    return int(math.floor(epoch * scale + 0.5))


def piecewise_text(pairs) -> str:
    """'epoch:value,...' with the first value kept where scaled epochs collide."""
    seen: dict[int, object] = {}
    for e, v in pairs:
        seen.setdefault(e, v)
    return ",".join(f"{e}:{v:g}" if isinstance(v, float) else f"{e}:{v}" for e, v in sorted(seen.items()))


@dataclass(frozen=True)
class Schedule:
    """The training schedule of every run of the matrix."""

    epochs: int
    milestones: tuple[int, ...]
    realloc_periods: str
    dpr_stop: int
    stop_epochs: tuple[int, ...]
    gmp_epochs: int
    gmp_steps: int
    gmp_interval: int
    gmp_lr: str

    @classmethod
    def scaled_from_paper(cls, epochs: int, stop_epochs=PAPER_STOP_EPOCHS, gmp_epochs: int | None = None) -> "Schedule":
        s = epochs / PAPER_EPOCHS
        dpr_stop = min(epochs, max(1, scaled(PAPER_DPR_STOP, s)))
        stops = tuple(sorted({min(max(1, scaled(e, s)), epochs) for e in stop_epochs} - {dpr_stop}))
        g = gmp_epochs or GMP_PAPER_EPOCHS
        gs = g / GMP_PAPER_EPOCHS
        span = max(1, min(g, scaled(GMP_PAPER_STEPS * GMP_PAPER_INTERVAL, gs)))  # epochs with prunings
        steps = min(GMP_PAPER_STEPS, span)
        interval = max(1, span // steps)
        gmp_lr = [(0, GMP_PAPER_LR[0][1])] + [(max(1, scaled(e, gs)), v) for e, v in GMP_PAPER_LR[1:]]
        return cls(
            epochs=epochs,
            milestones=tuple(sorted({max(1, scaled(m, s)) for m in PAPER_MILESTONES if scaled(m, s) < epochs})),
            realloc_periods=piecewise_text([(scaled(e, s), p) for e, p in PAPER_REALLOC_PERIODS]),
            dpr_stop=dpr_stop, stop_epochs=stops,
            gmp_epochs=g, gmp_steps=steps, gmp_interval=interval, gmp_lr=piecewise_text(gmp_lr),
        )


@dataclass
class Run:
    """One planned run: a run directory of blockdpr.train."""

    condition: str  # one of CONDITIONS
    sparsity: float | None  # None for dense
    seed: int
    stop_epoch: int | None  # DPR runs: the epoch after which the structure is frozen
    out: Path
    settings: dict  # its RunConfig settings (besides the shared ones, seed and out)
    depends: list[Path] = field(default_factory=list)  # run directories that must be finished first

    @property
    def mode(self) -> str:
        return {"stop": "dpr"}.get(self.condition, self.condition)

    def status(self) -> str:
        """done (summary.json), partial (a checkpoint) or new."""
        if (self.out / "summary.json").is_file():
            return "done"
        return "partial" if (self.out / "last.pt").is_file() else "new"


def run_name(condition: str, sparsity: float | None, seed: int, stop: int | None) -> str:
    if condition == "dense":
        return f"dense-seed{seed}"
    if condition == "stop":
        return f"dpr-stop{stop}-s{sparsity}-seed{seed}"
    return f"{condition}-s{sparsity}-seed{seed}"


def plan(opts: argparse.Namespace) -> list[Run]:
    """Every run of the matrix, in an order that respects the dependencies."""
    sched: Schedule = opts.schedule
    root: Path = opts.root
    seeds = range(opts.first_seed, opts.first_seed + opts.trials)
    base = dict(epochs=sched.epochs, lr_milestones=tuple(sched.milestones),
                realloc_periods=train_lib.piecewise(sched.realloc_periods, int))
    gmp_settings = dict(epochs=sched.gmp_epochs, gmp_steps=sched.gmp_steps, gmp_interval=sched.gmp_interval,
                        lr_schedule=train_lib.piecewise(sched.gmp_lr))
    wanted = set(opts.conditions)
    runs: list[Run] = []

    def add(condition, sparsity, seed, stop, settings, depends=()):
        out = root / run_name(condition, sparsity, seed, stop)
        runs.append(Run(condition, sparsity, seed, stop, out, settings, list(depends)))

    # Wave 1: no dependencies.
    if wanted & {"dense", "gmp"}:
        for seed in seeds:
            add("dense", None, seed, None, dict(mode="dense", **base))
    fork = "stop" in wanted and opts.fork and sched.stop_epochs
    snapshots = dict(snapshot_epochs=tuple(sched.stop_epochs)) if fork else {}
    for s in opts.sparsities:
        sp = dict(sparsity=s)
        for seed in seeds:
            dpr = root / run_name("dpr", s, seed, None)
            if wanted & {"dpr", "reinit", "orig-init", "stop"}:
                add("dpr", s, seed, sched.dpr_stop, dict(mode="dpr", **sp, **base, dpr_stop_epoch=sched.dpr_stop, **snapshots))
            if "static" in wanted:
                add("static", s, seed, None, dict(mode="static", **sp, **base))
            if "stop" in wanted:  # with fork: continued from the DPR run's checkpoint after epoch E (see fork_stop_run)
                for e in sched.stop_epochs:
                    add("stop", s, seed, e, dict(mode="dpr", **sp, **base, dpr_stop_epoch=e), [dpr] if fork else [])
    # Wave 2: built on a finished run of wave 1.
    for s in opts.sparsities:
        sp = dict(sparsity=s)
        for seed in seeds:
            dpr = root / run_name("dpr", s, seed, None)
            for mode in ("reinit", "orig-init"):
                if mode in wanted:
                    add(mode, s, seed, None, dict(mode=mode, **sp, **base, structure_from=dpr), [dpr])
            if "gmp" in wanted:
                dense = root / run_name("dense", None, seed, None)
                add("gmp", s, seed, None, dict(mode="gmp", **sp, **gmp_settings, dense_from=dense), [dense])
    # Within a wave: what others depend on first (dense, DPR), then by condition, sparsity, stop epoch, seed.
    order = {c: i for i, c in enumerate(("dense", "dpr", "static", "stop", "reinit", "orig-init", "gmp"))}
    return sorted(runs, key=lambda r: (bool(r.depends), order[r.condition], -(r.sparsity or 0), r.stop_epoch or 0, r.seed))


def shared_settings(opts: argparse.Namespace) -> dict:
    """RunConfig settings every run gets from this command line."""
    names = ("device", "depth", "width", "batch_size", "data", "train_subset", "test_subset", "amp", "compile", "no_progress")
    return {name: getattr(opts, name) for name in names}


def trial_config(run: Run, opts: argparse.Namespace) -> RunConfig:
    """The validated blockdpr.train config of one run (resume if it has a checkpoint); --train-args last."""
    config = RunConfig(**{**shared_settings(opts), **run.settings, **opts.train_overrides},
                       seed=run.seed, out=run.out, resume=run.status() == "partial")
    errors = config.errors()
    if errors:
        raise ConfigError([f"invalid training settings for {run.out}: {e}" for e in errors])
    return config.resolved()


def check_existing(run: Run, args: RunConfig) -> None:
    """A run directory that already holds a run must hold this run (not one with other settings)."""
    config_file = run.out / "config.json"
    if run.status() == "new" or not config_file.is_file():
        return
    config = saved_config(run.out).to_json()  # ConfigError if garbled
    keys = ("mode", "sparsity", "seed", "epochs", "depth", "width", "batch_size", "train_subset", "dpr_stop_epoch")
    different = [f"{k}: {config.get(k)!r} there, {getattr(args, k)!r} planned" for k in keys
                 if k in config and config.get(k) != getattr(args, k) and not (k == "sparsity" and args.mode == "dense")]
    if different:
        raise SystemExit(f"{run.out} holds a run with other settings ({'; '.join(different)}): "
                         "use another --root, or remove that directory")


def progress_key(run: Run) -> tuple:
    """Where a run stands, for grouping: runs trained together must be at the same point."""
    if run.status() == "new":
        return ("new",)
    try:
        p = load_checkpoint(run.out / "last.pt")["progress"]
    except CheckpointError as e:
        raise SystemExit(f"{run.out}: {e}") from None
    return ("at", p["epoch"], p["step_in_epoch"], p["global_step"])


def jobs(pending: list[Run], per_process: int) -> list[list[Run]]:
    """Group runs that can train together: same mode, same progress; at most per_process each.
    (Sparsity and DPR stop epoch may differ between the trials of one process.)"""
    groups: dict[tuple, list[Run]] = {}
    for run in pending:
        groups.setdefault((run.mode, progress_key(run)), []).append(run)
    return [g[i:i + per_process] for g in groups.values() for i in range(0, len(g), per_process)]


def fork_stop_run(run: Run) -> bool:
    """Start a new DPR-stopped-at-E run from its DPR run's checkpoint after epoch E.

    Up to epoch E the two are the same run (same seed: same initial values, data order and
    reallocations), so the stop-E run is that checkpoint continued without reallocation: this
    saves E of its epochs. The directory gets the DPR run's config (with this stop epoch), its
    metrics of epochs < E, its init_weights.pt and the checkpoint as last.pt (written last: its
    presence makes the run resumable). Returns False when there is nothing to fork from."""
    if run.condition != "stop" or not run.depends or run.status() != "new":
        return False
    dpr = run.depends[0]
    snapshot = dpr / f"epoch{run.stop_epoch}.pt"
    if not snapshot.is_file():
        return False
    run.out.mkdir(parents=True, exist_ok=True)
    config = json.loads((dpr / "config.json").read_text())
    config.update(dpr_stop_epoch=run.stop_epoch, out=str(run.out), snapshot_epochs=[], forked_from=str(snapshot))
    atomic_write_json(run.out / "config.json", config)
    lines = [line for line in (dpr / "metrics.jsonl").read_text().splitlines() if json.loads(line)["epoch"] < run.stop_epoch]
    atomic_write_text(run.out / "metrics.jsonl", "".join(line + "\n" for line in lines))
    for source, name in ((dpr / "init_weights.pt", "init_weights.pt"), (snapshot, "last.pt")):  # last.pt last
        if source.is_file():
            with open(source, "rb") as f:
                atomic_write(run.out / name, lambda out: shutil.copyfileobj(f, out))
    return True


def run_epochs(run: Run) -> int:
    """Epochs a run still has to train (from its checkpoint if it has one)."""
    total = run.settings["epochs"]
    if run.status() == "done":
        return 0
    if run.status() == "partial":
        return max(0, total - progress_key(run)[1])
    return total - run.stop_epoch if run.condition == "stop" and run.depends else total  # forked: see fork_stop_run


def show_plan(runs: list[Run], opts: argparse.Namespace) -> None:
    table = Table(title=f"plan: {len(runs)} runs")
    for col in ("run directory", "status", "depends on"):
        table.add_column(col)
    for run in runs:
        table.add_row(str(run.out), run.status(), ", ".join(d.name for d in run.depends))
    console.print(table)
    epochs = sum(run_epochs(r) for r in runs)
    images = epochs * (opts.train_subset or 50_000)
    console.print(f"to do: {sum(r.status() != 'done' for r in runs)} runs, {epochs:,} run-epochs = {images:,} training images")


def execute(opts: argparse.Namespace) -> bool:
    """Run what is missing, wave by wave. Returns True when every planned run is finished."""
    runs = plan(opts)
    started = time.perf_counter()
    show_plan(runs, opts)
    if opts.dry_run:
        console.print(presets.prediction_text(runs, opts))
        return all(r.status() == "done" for r in runs)
    for run in runs:
        check_existing(run, trial_config(run, opts))
    waves = [[r for r in runs if not r.depends], [r for r in runs if r.depends]]
    launched = 0
    for wave in waves:
        for run in wave:
            if all((d / "summary.json").is_file() for d in run.depends) and fork_stop_run(run):
                console.print(f"{run.out.name}: continues {run.depends[0].name} from epoch {run.stop_epoch}")
        pending = [r for r in wave if r.status() != "done"]
        for job in jobs(pending, opts.trials_per_process):
            blocked = [d for r in job for d in r.depends if not (d / "summary.json").is_file()]
            if blocked:
                console.print(f"[yellow]skipped[/yellow] {', '.join(r.out.name for r in job)}: waiting for "
                              f"{', '.join(sorted({d.name for d in blocked}))}")
                continue
            configs = [trial_config(r, opts) for r in job]
            if opts.time_limit is not None:
                left = opts.time_limit - (time.perf_counter() - started)
                if left <= 0 and launched:  # the first process always starts (and trains at least one step)
                    console.print("[yellow]--time-limit reached[/yellow]: run the same command again to continue")
                    return False
                configs = [dataclasses.replace(c, stop_after=max(left, 0.0)) for c in configs]
            launched += 1
            console.print(f"[bold]training {len(job)} run(s) together:[/bold] {', '.join(r.out.name for r in job)}")
            train_lib.train_trials(configs)
    return all(r.status() == "done" for r in runs)


# ---- aggregation ----------------------------------------------------------------------------
def classify(summary: dict, dpr_stop: int | None = None) -> tuple[str, float | None, int | None]:
    """(condition, sparsity, stop epoch) of a finished run from its summary.json.

    A DPR run is the full DPR condition when it stopped reallocating at or after the DPR stop of
    its schedule (dpr_stop, default: 190 scaled to its epochs), otherwise a point of the sweep."""
    mode = summary["mode"]
    if mode == "dense":
        return "dense", None, None
    sparsity = round(float(summary["sparsity"]), 6)
    if mode == "dpr":
        stop = summary.get("dpr_stop_epoch")
        full = dpr_stop if dpr_stop is not None else Schedule.scaled_from_paper(summary["epochs"]).dpr_stop
        stop = min(stop, summary["epochs"]) if stop is not None else summary["epochs"]
        return ("dpr", sparsity, stop) if stop >= full else ("stop", sparsity, stop)
    return mode, sparsity, None


def schedule_epochs(run_dir: Path, summary: dict) -> int:
    """The length of the schedule a run belongs to: its epochs, or for gmp those of its dense run."""
    if summary["mode"] != "gmp":
        return summary["epochs"]
    try:
        dense = Path(json.loads((run_dir / "config.json").read_text())["dense_from"])
        return json.loads((dense / "summary.json").read_text())["epochs"]
    except (OSError, KeyError, TypeError, ValueError):
        return summary["epochs"]


def collect(dirs: list[Path]) -> list[dict]:
    """Every finished run (summary.json) in or below `dirs`, with its condition."""
    found = {}
    for d in dirs:
        if not d.exists():
            raise SystemExit(f"no such directory: {d}")
        for path in sorted([d / "summary.json"] if (d / "summary.json").is_file() else d.rglob("summary.json")):
            summary = json.loads(path.read_text())
            condition, sparsity, stop = classify(summary)
            found[path.parent.resolve()] = {**summary, "condition": condition, "sparsity": sparsity, "stop": stop,
                                           "schedule": schedule_epochs(path.parent, summary), "run_dir": str(path.parent)}
    return list(found.values())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (condition, sparsity, stop epoch, schedule): final test accuracy in %, mean, std, n.
    schedule: the epochs of the runs (gmp: of the dense runs it pruned; its own epochs are `epochs`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["condition"], r["sparsity"], r["stop"], r["schedule"]), []).append(r)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows = []
    for (condition, sparsity, stop, schedule), members in sorted(
            groups.items(), key=lambda kv: (kv[0][3], order[kv[0][0]], -(kv[0][1] or 0), kv[0][2] or 0)):
        mean, std = mean_std([100 * m["final_test_acc"] for m in members])
        paper = PUBLISHED.get((condition, sparsity if condition != "dense" else None))
        rows.append({"condition": condition, "label": LABELS[condition], "sparsity": sparsity, "stop_epoch": stop,
                     "schedule": schedule, "epochs": sorted({m["epochs"] for m in members}), "n": len(members), "mean": mean, "std": std,
                     "seeds": sorted(m["seed"] for m in members),
                     "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None,
                     "data": sorted({m.get("data", "?") for m in members})})
    return rows


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else "")


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """figure1.csv (every row) and figure1.md (the table for the results page)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "figure1.csv", out_dir / "figure1.md"
    fields = ["condition", "sparsity", "stop_epoch", "schedule", "epochs", "n", "mean", "std", "paper_mean", "paper_std", "seeds", "data"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]) for k in fields})
    lines = ["| condition | sparsity | DPR stopped after epoch | schedule (epochs) | test accuracy % (mean +- std) | n | published (DSR paper, 200 epochs) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {'' if r['sparsity'] is None else r['sparsity']} | "
                     f"{'' if r['stop_epoch'] is None else r['stop_epoch']} | {r['schedule']}"
                     f"{' + ' + '/'.join(map(str, r['epochs'])) + ' fine-tuning' if r['condition'] == 'gmp' else ''} | "
                     f"{fmt(r['mean'], r['std'])} | "
                     f"{r['n']} | {fmt(r['paper_mean'], r['paper_std'])} |")
    data = sorted({d for r in rows for d in r["data"]})
    lines += ["", f"Final test accuracy after the last epoch; std is the sample standard deviation over trials (n - 1). "
                  f"Data: {', '.join(data) or '?'}."]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_figures(rows: list[dict], out_dir: Path) -> list[Path]:
    """figure1a.png (bars per condition and sparsity) and one stop-epoch panel per sparsity
    (figure1b.png for the first sparsity, figure1c.png for the second, ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    schedules = sorted({r["schedule"] for r in rows})
    for epochs in schedules:
        suffix = "" if len(schedules) == 1 else f"-e{epochs}"
        sel = [r for r in rows if r["schedule"] == epochs]
        sparsities = sorted({r["sparsity"] for r in sel if r["sparsity"] is not None}, reverse=True)

        # Figure 1a: bars per condition, one group per sparsity; dense as a line.
        bar_conditions = [c for c in ("dpr", "reinit", "orig-init", "static", "gmp")
                          if any(r["condition"] == c for r in sel)]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(bar_conditions))
        for i, c in enumerate(bar_conditions):
            xs, ys, es = [], [], []
            for j, s in enumerate(sparsities):
                match = [r for r in sel if r["condition"] == c and r["sparsity"] == s]
                if match:
                    xs.append(j + (i - (len(bar_conditions) - 1) / 2) * width)
                    ys.append(match[0]["mean"])
                    es.append(match[0]["std"] or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=LABELS[c])
            published = [(x, PUBLISHED[(c, s)][0]) for x, s in zip(xs, [s for s in sparsities if any(
                r["condition"] == c and r["sparsity"] == s for r in sel)]) if (c, s) in PUBLISHED]
            if published:
                ax.scatter(*zip(*published), marker="_", s=200, color="k", zorder=3,
                           label="published (DSR paper)" if c == "dpr" else None)
        for r in sel:
            if r["condition"] == "dense":
                ax.axhline(r["mean"], color="k", ls="--", lw=1, label=f"dense ({r['mean']:.2f})")
        ax.set_xticks(range(len(sparsities)), [f"sparsity {s}" for s in sparsities])
        ax.set_ylabel("test accuracy (%)")
        values = [r["mean"] - (r["std"] or 0) for r in sel] + [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
        if values:
            top = [r["mean"] + (r["std"] or 0) for r in sel] + [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
            ax.set_ylim(max(0.0, min(values) - 2), min(100.0, max(top) + 1.5))
        ax.set_title(f"Figure 1a: {epochs}-epoch schedule, mean +- std over trials")
        ax.legend(fontsize=7, loc="best")
        save(fig, f"figure1a{suffix}.png")

        # Figure 1b, 1c: accuracy against the epoch at which DPR stopped; gmp and static as bands.
        for letter, s in zip("bcdefgh", sparsities):
            points = sorted((r for r in sel if r["sparsity"] == s and r["condition"] in ("stop", "dpr")),
                            key=lambda r: r["stop_epoch"])
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.errorbar([r["stop_epoch"] for r in points], [r["mean"] for r in points],
                        yerr=[r["std"] or 0.0 for r in points], marker="o", capsize=3, label="DPR stopped after epoch E")
            for c, color in (("gmp", "tab:green"), ("static", "tab:red")):
                for r in (r for r in sel if r["condition"] == c and r["sparsity"] == s):
                    lo, hi = r["mean"] - (r["std"] or 0.0), r["mean"] + (r["std"] or 0.0)
                    ax.axhspan(lo, hi, color=color, alpha=0.25)
                    ax.axhline(r["mean"], color=color, lw=1, label=f"{LABELS[c]} ({fmt(r['mean'], r['std'])})")
            ax.set_xlabel("epoch at which DPR stopped (E)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Figure 1{letter}: sparsity {s}, {epochs} epochs")
            ax.legend(fontsize=7, loc="lower right")
            save(fig, f"figure1{letter}{suffix}.png")
    return written


def report(dirs: list[Path], out_dir: Path) -> list[dict]:
    runs = collect(dirs)
    if not runs:
        raise SystemExit(f"no finished runs (summary.json) in {', '.join(map(str, dirs))}")
    rows = aggregate(runs)
    csv_path, md_path = write_table(rows, out_dir)
    figures = write_figures(rows, out_dir)
    console.print(md_path.read_text())
    console.print(f"wrote {csv_path}, {md_path}, " + ", ".join(str(p) for p in figures))
    return rows


# ---- throughput ---------------------------------------------------------------------------------
def benchmark(opts: argparse.Namespace) -> list[dict]:
    """Aggregate training images/s of element-mode DPR with T trials in one process, for each T of
    --bench-trials, in this process (same device, same session). Each measurement trains
    --bench-epochs epochs on --bench-images images and reads the last epoch's images/s
    (training steps, reallocations included; evaluation excluded) times T."""
    results = []
    with tempfile.TemporaryDirectory(prefix="blockdpr-bench-") as tmp:
        for T in opts.bench_trials:
            settings = {**shared_settings(opts), "train_subset": opts.bench_images,
                        "test_subset": min(opts.bench_images, 1000)}
            trials = [RunConfig(**settings, mode="dpr", sparsity=0.9, epochs=opts.bench_epochs, seed=s,
                                out=Path(tmp) / f"T{T}-seed{s}").check() for s in range(T)]
            train_lib.train_trials(trials)
            last = json.loads((trials[0].out / "metrics.jsonl").read_text().splitlines()[-1])
            config = json.loads((trials[0].out / "config.json").read_text())
            results.append({"trials": T, "aggregate_images_per_s": T * last["images_per_s"],
                            "per_trial_images_per_s": last["images_per_s"], "device": config["device_name"],
                            "amp": opts.amp, "compile": opts.compile, "batch_size": opts.batch_size,
                            "model": f"WRN-{opts.depth}-{opts.width}", "torch": config["provenance"]["versions"]["torch"]})
    base = results[0]["aggregate_images_per_s"]
    table = Table(title=f"element-mode DPR WRN-{opts.depth}-{opts.width}, sparsity 0.9, on {results[0]['device']}")
    for col in ("trials per process", "aggregate img/s", "per trial img/s", f"vs T={results[0]['trials']}"):
        table.add_column(col, justify="right")
    for r in results:
        table.add_row(str(r["trials"]), f"{r['aggregate_images_per_s']:,.0f}", f"{r['per_trial_images_per_s']:,.0f}",
                      f"{r['aggregate_images_per_s'] / base:.2f}x")
    Console().print(table)
    if opts.bench_out is not None:
        atomic_write_json(opts.bench_out, results)
        console.print(f"wrote {opts.bench_out}")
    return results


# ---- command line ------------------------------------------------------------------------------
def condition_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [v for v in values if v not in CONDITIONS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown condition(s) {unknown}: choose from {', '.join(CONDITIONS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blockdpr.reproduce",
        description="Reproduce Figure 1 of Mostafa & Wang (DPR on WRN-28-2, CIFAR-10): plan and run the matrix of "
                    "runs (skipping finished ones, resuming interrupted ones), then write the table and figures.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("matrix (paper defaults)")
    presets.add_preset_argument(g)
    add_list_argument(g, "--sparsities", type=float, default=[0.9, 0.8], metavar="S,S")
    g.add_argument("--trials", type=int, default=5, help="trials (seeds) per condition")
    g.add_argument("--first-seed", type=int, default=0, help="trial k uses seed first-seed + k")
    g.add_argument("--conditions", type=condition_list, default=list(CONDITIONS),
                   help=f"subset of {','.join(CONDITIONS)} (stop: the stop-epoch sweep); dependencies are added")
    g.add_argument("--epochs", type=int, default=PAPER_EPOCHS,
                   help="epochs of every run but gmp; the paper's schedule is scaled by epochs / 200 (e.g. --epochs 30)")
    add_list_argument(g, "--stop-epochs", type=int, default=list(PAPER_STOP_EPOCHS),
                   help="the stop-epoch sweep in epochs of the 200-epoch schedule (scaled with --epochs)")
    g.add_argument("--gmp-epochs", type=int, default=None,
                   help=f"gmp fine-tuning epochs (default: the paper's {GMP_PAPER_EPOCHS}, whatever --epochs; "
                        "other values scale its pruning and lr schedule)")

    g = p.add_argument_group("execution")
    g.add_argument("--root", type=Path, default=None, help="directory of the run directories (default runs/figure1-e<epochs>)")
    g.add_argument("--results", type=Path, default=None,
                   help="where the table and figures are written (default results/<name of --root, or of the first "
                        "--aggregate-only DIR>)")
    g.add_argument("--trials-per-process", type=int, default=10,
                   help="most runs trained together in one process (one stacked model; see --benchmark)")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop (checkpointed) after SECONDS; the same command continues later")
    g.add_argument("--no-fork", dest="fork", action="store_false",
                   help="train each DPR-stopped-at-E run from scratch instead of continuing its DPR run's checkpoint "
                        "after epoch E (the same run up to E: forking saves E epochs of each)")
    g.add_argument("--dry-run", action="store_true", help="print the plan and the status of each run, run nothing")
    g.add_argument("--aggregate-only", nargs="*", type=Path, default=None, metavar="DIR",
                   help="only aggregate finished runs in DIR(s) (default: --root) into the table and figures")

    g = p.add_argument_group("training (passed to every run)")
    g.add_argument("--data", type=Path, default=None, help="CIFAR-10 source (default: the bundled JPEG q75 zip)")
    g.add_argument("--device", default="auto")
    g.add_argument("--depth", type=int, default=28)
    g.add_argument("--width", type=int, default=2)
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--train-subset", type=int, default=None, metavar="N", help="smoke runs: first N training images")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="smoke runs: first N test images")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (the paper trains in fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile each process's model")
    g.add_argument("--no-progress", action="store_true")
    g.add_argument("--train-args", type=shlex.split, default=[], metavar="'FLAGS'",
                   help="more blockdpr.train flags for every run, after the planned ones (so they override them), "
                        "e.g. '--keep-momentum' or '--realloc-periods 0:50'")

    g = p.add_argument_group("throughput")
    g.add_argument("--benchmark", action="store_true",
                   help="measure aggregate training img/s of element-mode DPR for each --bench-trials, then exit")
    add_list_argument(g, "--bench-trials", type=int, default=[1, 4, 8, 16],
                   help="trials per process to measure (the first is the baseline)")
    g.add_argument("--bench-images", type=int, default=10_000, help="training images per epoch in the benchmark")
    g.add_argument("--bench-epochs", type=int, default=2, help="epochs per measurement (the last one is reported)")
    g.add_argument("--bench-out", type=Path, default=None, help="also write the measurements as JSON here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    presets.apply_preset(parser, argv)
    opts = parser.parse_args(argv)
    errors = []
    if opts.trials < 1:
        errors.append("--trials must be >= 1")
    if opts.epochs < 1:
        errors.append("--epochs must be >= 1")
    if opts.trials_per_process < 1:
        errors.append("--trials-per-process must be >= 1")
    if opts.gmp_epochs is not None and opts.gmp_epochs < 1:
        errors.append("--gmp-epochs must be >= 1")
    bad = [s for s in opts.sparsities if not 0 < s < 1]
    if bad:
        errors.append(f"--sparsities must be in (0, 1), got {bad}")
    if any(e < 1 for e in opts.stop_epochs):
        errors.append("--stop-epochs must be >= 1")
    if opts.benchmark and (not opts.bench_trials or min(opts.bench_trials) < 1 or opts.bench_images < 1 or opts.bench_epochs < 1):
        errors.append("--bench-trials, --bench-images and --bench-epochs must be positive")
    if errors:
        parser.error("; ".join(errors))
    try:
        (extra,), given = train_lib.configs_from_argv(opts.train_args)
    except ConfigError as e:
        parser.error(f"--train-args: {'; '.join(e.errors)}")
    per_run = {"seed", "out", "resume"}
    if given & per_run:
        parser.error(f"--train-args cannot set {sorted(given & per_run)}: reproduce sets them for each run")
    opts.train_overrides = {k: getattr(extra, k) for k in given}
    conditions = set(opts.conditions)
    if conditions & {"reinit", "orig-init"}:
        conditions.add("dpr")
    if "gmp" in conditions:
        conditions.add("dense")
    opts.conditions = [c for c in CONDITIONS if c in conditions]
    opts.schedule = Schedule.scaled_from_paper(opts.epochs, opts.stop_epochs, opts.gmp_epochs)
    if opts.root is None:
        opts.root = Path("runs") / f"figure1-e{opts.epochs}"
    if opts.results is None:
        opts.results = Path("results") / (opts.aggregate_only[0] if opts.aggregate_only else opts.root).resolve().name
    return opts


def main(argv: list[str] | None = None) -> int:
    """The CLI in-process: 0 when every planned run is finished, 3 when some are not (errors exit
    as blockdpr.train's do: 2 for bad settings or run directories, 1 for a diverged run, 128 + N
    for signal N)."""
    try:
        return run_main(argv)
    except (ConfigError, CheckpointError, train_lib.DataError, OSError) as e:
        raise train_lib.error_exit(e.errors if isinstance(e, ConfigError) else [str(e)], 2) from None
    except train_lib.Diverged as e:
        raise train_lib.error_exit([f"training diverged: {e}"], 1) from None
    except train_lib.Stopped as e:
        console.print(escape(f"{e}: run the same command again to continue"), highlight=False)
        raise SystemExit(128 + e.signum) from None


def run_main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.benchmark:
        benchmark(opts)
        return 0
    if opts.aggregate_only is not None:
        rows = report(opts.aggregate_only or [opts.root], opts.results)
        if opts.preset:
            presets.write_report(rows, opts.results)
        return 0
    s = opts.schedule
    console.print(f"schedule: {s.epochs} epochs, lr x0.2 at {list(s.milestones)}, realloc periods {s.realloc_periods}, "
                  f"DPR stop {s.dpr_stop}, stop sweep {list(s.stop_epochs)}; gmp {s.gmp_epochs} epochs, {s.gmp_steps} "
                  f"prunings every {s.gmp_interval}, lr {s.gmp_lr}")
    complete = execute(opts)
    if opts.dry_run:
        return 0
    if any(opts.root.rglob("summary.json")):
        rows = report([opts.root], opts.results)
        if opts.preset:
            presets.write_report(rows, opts.results)
    if not complete:
        console.print("[yellow]not every run is finished[/yellow]: run the same command again to continue")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
