"""The matrix of runs of python -m blockdpr.reproduce: the paper's schedule, the planned runs, where each stands.

- `Schedule.scaled_from_paper(epochs, stop_epochs, gmp_epochs, iterations_per_epoch)`: the paper's
  200-epoch schedule (and gmp's 48-epoch one) scaled to `epochs` (`scaled_epoch`, rounded half up);
  the reallocation periods and DPR stop as blockdpr/sparsity/schedule.py derives them.
- `reallocation_schedule(opts, sparsity)`: the periods and N_p of the DPR runs at one sparsity.
- `Run`: one planned run directory of blockdpr.train; `plan(opts)`: every run of the matrix, in
  dependency order; `trial_config(run, opts)`: its validated RunConfig.
- `progress_key(run)`, `run_epochs(run)`: where a run stands (its checkpoint) and what it has left.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig, group_settings
from .sparsity import schedule as realloc
from .sparsity.schedule import PAPER_EPOCHS, scaled_epoch
from .train import piecewise

PAPER_MILESTONES = (60, 120, 160)
# The stop-epoch sweep of Figure 1b/c (our choice of points between 10 and 180; a flag).
PAPER_STOP_EPOCHS = (10, 20, 40, 60, 80, 100, 120, 140, 160, 180)
GMP_PAPER_EPOCHS, GMP_PAPER_STEPS, GMP_PAPER_INTERVAL = 48, 20, 2
GMP_PAPER_LR = ((0, 0.0), (1, 0.02), (25, 0.004), (35, 0.0008))

CONDITIONS = ("dpr", "reinit", "orig-init", "static", "stop", "gmp", "dense")


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
    def scaled_from_paper(cls, epochs: int, stop_epochs=PAPER_STOP_EPOCHS, gmp_epochs: int | None = None,
                          iterations_per_epoch: int = realloc.PAPER_ITERATIONS_PER_EPOCH) -> "Schedule":
        s = epochs / PAPER_EPOCHS
        dpr_stop = realloc.scaled_dpr_stop(epochs)
        stops = tuple(sorted({min(max(1, scaled_epoch(e, s)), epochs) for e in stop_epochs} - {dpr_stop}))
        g = gmp_epochs or GMP_PAPER_EPOCHS
        gs = g / GMP_PAPER_EPOCHS
        span = max(1, min(g, scaled_epoch(GMP_PAPER_STEPS * GMP_PAPER_INTERVAL, gs)))  # epochs with prunings
        steps = min(GMP_PAPER_STEPS, span)
        interval = max(1, span // steps)
        gmp_lr = [(0, GMP_PAPER_LR[0][1])] + [(max(1, scaled_epoch(e, gs)), v) for e, v in GMP_PAPER_LR[1:]]
        return cls(
            epochs=epochs,
            milestones=tuple(sorted({max(1, scaled_epoch(m, s)) for m in PAPER_MILESTONES if scaled_epoch(m, s) < epochs})),
            realloc_periods=piecewise_text(realloc.scaled_periods(epochs, iterations_per_epoch)),
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


def train_setting(opts: argparse.Namespace, name: str):
    """A blockdpr.train setting of every run: from --train-args if given there, else from opts."""
    return opts.train_overrides.get(name, getattr(opts, name, None))


def iterations_per_epoch(opts: argparse.Namespace) -> int:
    """Training steps an epoch of every run (the last batch may be short)."""
    images = opts.train_subset or realloc.PAPER_ITERATIONS_PER_EPOCH * 100
    return math.ceil(images / train_setting(opts, "batch_size"))


def reallocation_schedule(opts: argparse.Namespace, sparsity: float) -> realloc.ReallocationSchedule:
    """The reallocation periods, DPR stop and N_p of the DPR runs at `sparsity` (sparsity/schedule.py):
    N_p from --target-pruned if given, else --pruned-fraction (default: the paper's) of the active units."""
    block = train_setting(opts, "block_size") if train_setting(opts, "granularity") == "block" else None
    active = realloc.active_units(opts.depth, opts.width, sparsity, block)
    return realloc.derive(active, iterations_per_epoch(opts), opts.epochs, opts.pruned_fraction, opts.target_pruned,
                          sparsity)


def plan(opts: argparse.Namespace) -> list[Run]:
    """Every run of the matrix, in an order that respects the dependencies (with --rules: the rules
    comparison of blockdpr/rules_matrix.py instead of Figure 1)."""
    if getattr(opts, "rules", None):
        from .rules_matrix import plan_rules
        return plan_rules(opts)
    sched: Schedule = opts.schedule
    root: Path = opts.root
    seeds = range(opts.first_seed, opts.first_seed + opts.trials)
    base = dict(epochs=sched.epochs, lr_milestones=tuple(sched.milestones),
                realloc_periods=piecewise(sched.realloc_periods, int))
    gmp_settings = dict(epochs=sched.gmp_epochs, gmp_steps=sched.gmp_steps, gmp_interval=sched.gmp_interval,
                        lr_schedule=piecewise(sched.gmp_lr))
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
        sp = dict(sparsity=s, target_pruned=reallocation_schedule(opts, s).target_pruned)  # one N_p: trials stack
        for seed in seeds:
            dpr = root / run_name("dpr", s, seed, None)
            if wanted & {"dpr", "reinit", "orig-init", "stop"}:
                add("dpr", s, seed, sched.dpr_stop, dict(mode="dpr", **sp, **base, dpr_stop_epoch=sched.dpr_stop,
                                                          **snapshots))
            if "static" in wanted:
                add("static", s, seed, None, dict(mode="static", **sp, **base))
            if "stop" in wanted:  # with fork: continued from the DPR run's checkpoint after epoch E (see reproduce.fork_stop_run)
                for e in sched.stop_epochs:
                    add("stop", s, seed, e, dict(mode="dpr", **sp, **base, dpr_stop_epoch=e), [dpr] if fork else [])
    # Wave 2: built on a finished run of wave 1.
    for s in opts.sparsities:
        sp = dict(sparsity=s, target_pruned=reallocation_schedule(opts, s).target_pruned)
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
    names = ("device", "depth", "width", "batch_size", "data", "train_subset", "test_subset", "amp", "compile", "cuda_graph",
             "no_progress")
    return {name: getattr(opts, name) for name in names}


def trial_config(run: Run, opts: argparse.Namespace) -> RunConfig:
    """The validated blockdpr.train config of one run (resume if it has a checkpoint); --train-args last."""
    config = RunConfig(**{**shared_settings(opts), **run.settings, **opts.train_overrides},
                       seed=run.seed, out=run.out, resume=run.status() == "partial")
    errors = config.errors()
    if errors:
        raise ConfigError([f"invalid training settings for {run.out}: {e}" for e in errors])
    return config.resolved()


def progress_key(run: Run) -> tuple:
    """Where a run stands, for grouping: runs trained together must be at the same point."""
    if run.status() == "new":
        return ("new",)
    try:
        p = load_checkpoint(run.out / "last.pt")["progress"]
    except CheckpointError as e:
        raise SystemExit(f"{run.out}: {e}") from None
    return ("at", p["epoch"], p["step_in_epoch"], p["global_step"])


def run_epochs(run: Run) -> int:
    """Epochs a run still has to train (from its checkpoint if it has one)."""
    total = run.settings["epochs"]
    if run.status() == "done":
        return 0
    if run.status() == "partial":
        return max(0, total - progress_key(run)[1])
    return total - run.stop_epoch if run.condition == "stop" and run.depends else total  # forked: see reproduce.fork_stop_run


def jobs(pending: list[Run], per_process: int, opts: argparse.Namespace) -> list[list[Run]]:
    """Group runs that can train together: the same shared settings (config.group_settings: the
    schedule and everything else but mode, sparsity, seed, DPR stop epoch and the structure or
    dense model they start from; gmp only with gmp) and the same progress; at most per_process each.
    Fuller processes train faster: one H200 trained 8 stacked trials 2.7x as fast as one."""
    groups: dict[tuple, list[Run]] = {}
    for run in pending:
        key = (progress_key(run), tuple(group_settings(trial_config(run, opts)).items()))
        groups.setdefault(key, []).append(run)
    return [g[i:i + per_process] for g in groups.values() for i in range(0, len(g), per_process)]
