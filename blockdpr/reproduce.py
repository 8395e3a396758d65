"""The paper's Figure 1 in one command: python -m blockdpr.reproduce --help

Plans the matrix of runs (for each sparsity: DPR, DPR with the final structure and a new random
init (reinit), ... with its original init (orig-init), a static random structure, DPR stopped
after E epochs for several E, the compressed baseline (gmp: a trained dense model pruned
gradually, Zhu & Gupta); and the dense reference), runs what is missing, skips what is done and
resumes what was interrupted (each run is a run directory of blockdpr.train), in dependency
order (reinit / orig-init after their DPR run, gmp after its dense run). Runs on the same
schedule that are at the same point are trained together in one process (--trials-per-process),
as one stacked model (blockdpr/stacked.py), whatever their condition (gmp only with gmp runs).
Then it aggregates the run directories into a table (mean +- std over trials, n) and the
figures (--results).

Trial k of every condition uses seed k (--first-seed + k): DPR, its stopped variants, static
and orig-init of one seed start from the same initial values (reinit draws new ones), and
gmp trial k prunes dense trial k.

Shorter schedules: --epochs E scales every epoch of the paper's 200-epoch schedule by E / 200,
rounded half up: the lr milestones 60, 120, 160, the reallocation-period epochs 0, 25, 80, 140,
the DPR stop epoch 190 and the stop-epoch sweep. gmp keeps its own 48-epoch fine-tuning schedule
(20 prunings, one every 2 epochs) unless --gmp-epochs is given, which scales it by
gmp_epochs / 48 in the same way. DPR's periods (in iterations) and N_p follow from the run's
length and model size (blockdpr/sparsity/schedule.py), so a shortened run keeps the paper's
amount of reallocation; the plan prints how many reallocations each DPR run will make.

Output: the table and figures go into --root (runs/...), or for a preset in its own root into
the tracked results/<preset>/; --dry-run measures this machine and writes nothing.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

from . import figure1_short as presets
from . import train as train_lib
from .checkpoint import CheckpointError
from .cli import ArgumentParser, HelpFormatter, add_list_argument, escape
from .config import ConfigError, RunConfig
from .matrix import (CONDITIONS, GMP_PAPER_EPOCHS, PAPER_EPOCHS, PAPER_STOP_EPOCHS, Run, Schedule, iterations_per_epoch,
                     jobs, plan, reallocation_schedule, run_epochs, shared_settings, trial_config)
from .results import ReportError, console, report
from .rules_matrix import BLOCK as RULES_BLOCK, RULES, aggregate_rules, write_rules_report
from .run_dir import saved_config
from .setup import resolve_device
from .runinfo import atomic_write, atomic_write_json, atomic_write_text


# ---- execution ----------------------------------------------------------------------------------
def check_existing(run: Run, args: RunConfig) -> None:
    """A run directory that already holds a run must hold this run (not one with other settings)."""
    config_file = run.out / "config.json"
    if run.status() == "new" or not config_file.is_file():
        return
    config = saved_config(run.out).to_json()  # ConfigError if garbled
    keys = ("mode", "sparsity", "seed", "epochs", "depth", "width", "batch_size", "train_subset", "dpr_stop_epoch",
            "target_pruned")
    different = [f"{k}: {config.get(k)!r} there, {getattr(args, k)!r} planned" for k in keys
                 if k in config and config.get(k) != getattr(args, k) and not (k == "sparsity" and args.mode == "dense")]
    if different:
        raise SystemExit(f"{run.out} holds a run with other settings ({'; '.join(different)}): "
                         "use another --root, or remove that directory")



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
    record_session(opts, started=True)
    try:
        return train_waves(runs, opts, started)
    finally:
        record_session(opts, started=False, seconds=time.perf_counter() - started)


def command_text(opts: argparse.Namespace) -> str:
    return shlex.join(["python", "-m", "blockdpr.reproduce", *opts.argv])


def record_session(opts: argparse.Namespace, started: bool, seconds: float | None = None) -> None:
    """Append this command's start or end to <root>/sessions.jsonl (the report's command and wall time)."""
    from datetime import datetime, timezone

    record = {"event": "start" if started else "end", "utc": datetime.now(timezone.utc).isoformat(timespec="seconds"),
              "command": command_text(opts)}
    if seconds is not None:
        record["seconds"] = round(seconds, 1)
    opts.root.mkdir(parents=True, exist_ok=True)
    with open(opts.root / "sessions.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")


def train_waves(runs: list[Run], opts: argparse.Namespace, started: float) -> bool:
    """Train the runs that are not finished, wave by wave (dependencies first). Returns True when every
    planned run is finished."""
    waves = [[r for r in runs if not r.depends], [r for r in runs if r.depends]]
    launched = 0
    for wave in waves:
        for run in wave:
            if all((d / "summary.json").is_file() for d in run.depends) and fork_stop_run(run):
                console.print(f"{run.out.name}: continues {run.depends[0].name} from epoch {run.stop_epoch}")
        pending = [r for r in wave if r.status() != "done"]
        for job in jobs(pending, opts.trials_per_process, opts):
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
# Default --trials-per-process by device type. One H200 trained 8 stacked trials 2.7x as fast as
# one; a 2-core CPU trains WRN-10-1 faster one trial at a time (README, "Reproducing Figure 1").
TRIALS_PER_PROCESS = {"cuda": 10, "cpu": 1}


def rule_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [v for v in values if v not in RULES]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"expected rules from {','.join(RULES)}, got {text!r}")
    return values


def condition_list(text: str) -> list[str]:
    values = [x.strip() for x in text.split(",") if x.strip()]
    unknown = [v for v in values if v not in CONDITIONS]
    if unknown or not values:
        raise argparse.ArgumentTypeError(f"unknown condition(s) {unknown}: choose from {', '.join(CONDITIONS)}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(
        prog="python -m blockdpr.reproduce",
        description="Reproduce Figure 1 of Mostafa & Wang (DPR on WRN-28-2, CIFAR-10): plan and run the matrix of "
                    "runs (skipping finished ones, resuming interrupted ones), then write the table and figures.",
        formatter_class=HelpFormatter,
    )
    g = p.add_argument_group("matrix (paper defaults)")
    presets.add_preset_argument(g)
    add_list_argument(g, "--sparsities", type=float, default=[0.9, 0.8], metavar="S,S",
                      help="sparsities of the sparse tensors, each in (0, 1) (default: 0.9,0.8)")
    g.add_argument("--trials", type=int, default=5, help="trials (seeds) per condition")
    g.add_argument("--first-seed", type=int, default=0, help="trial k uses seed first-seed + k")
    g.add_argument("--conditions", type=condition_list, default=list(CONDITIONS), metavar="C,C",
                   help=f"conditions to run, from {','.join(CONDITIONS)} (stop: the stop-epoch sweep); what they "
                        f"depend on is added (default: all of them)")
    g.add_argument("--rules", type=rule_list, default=None, metavar="R,R",
                   help="plan the rules comparison instead of Figure 1: each of these rules (from "
                        f"{','.join(RULES)}) at each sparsity and seed, in element mode (--width) and block mode "
                        f"(block {RULES_BLOCK}, --block-width); blockdpr/rules_matrix.py (default: Figure 1)")
    g.add_argument("--block-width", type=int, default=4,
                   help="with --rules: the WRN width of the block-mode runs (4: every group of WRN-28-4 has "
                        f"2 or more block rows of {RULES_BLOCK} channels)")
    g.add_argument("--epochs", type=int, default=PAPER_EPOCHS,
                   help="epochs of every run but gmp; the paper's schedule is scaled by epochs / 200 (e.g. --epochs 30)")
    add_list_argument(g, "--stop-epochs", type=int, default=list(PAPER_STOP_EPOCHS), metavar="E,E",
                      help="the stop-epoch sweep in epochs of the 200-epoch schedule, scaled with --epochs (default: "
                           + ",".join(map(str, PAPER_STOP_EPOCHS)) + ")")
    g.add_argument("--pruned-fraction", type=float, default=None, metavar="F",
                   help="DPR's N_p (units pruned per reallocation) as a fraction of the active units (default: the "
                        "paper's, 20,000 of WRN-28-2's active weights at the run's sparsity: 0.138 at 0.9)")
    g.add_argument("--target-pruned", type=int, default=None, metavar="N",
                   help="DPR's N_p as an absolute count of units instead (must be below the active units)")
    g.add_argument("--gmp-epochs", type=int, default=None, metavar="E",
                   help=f"gmp fine-tuning epochs (default: the paper's {GMP_PAPER_EPOCHS}, whatever --epochs; "
                        "other values scale its pruning and lr schedule)")

    g = p.add_argument_group("execution")
    g.add_argument("--root", type=Path, default=None, metavar="DIR",
                   help="directory of the run directories (default: runs/figure1-e<epochs>, or the preset's)")
    g.add_argument("--results", type=Path, default=None, metavar="DIR",
                   help="where the table and figures are written (default: results/<preset> for a preset in its own "
                        "root, else --root, or the first --aggregate-only DIR)")
    g.add_argument("--trials-per-process", type=int, default=None, metavar="T",
                   help="most runs trained together in one process (one stacked model; see --benchmark) (default: "
                        + ", ".join(f"{n} on {device}" for device, n in TRIALS_PER_PROCESS.items())
                        + ", as measured: see the README)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads of the training (torch.set_num_threads) (default: torch's, one per core). On a "
                        "CPU shared with other jobs 1 is several times faster than oversubscribed cores")
    g.add_argument("--time-limit", type=float, default=None, metavar="SECONDS",
                   help="stop (checkpointed) after SECONDS; the same command continues later")
    g.add_argument("--no-fork", dest="fork", action="store_false",
                   help="train each DPR-stopped-at-E run from scratch instead of continuing its DPR run's checkpoint "
                        "after epoch E (the same run up to E: forking saves E epochs of each)")
    g.add_argument("--dry-run", action="store_true",
                   help="print the plan and its predicted time (measured on this machine), train and write nothing")
    g.add_argument("--aggregate-only", nargs="*", type=Path, default=None, metavar="DIR",
                   help="only aggregate finished runs in DIR(s) (default: --root) into the table and figures")

    g = p.add_argument_group("training (passed to every run)")
    g.add_argument("--data", type=Path, default=None, metavar="PATH",
                   help="CIFAR-10 source (default: the bundled data/cifar10-jpeg-q75.zip)")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto (CUDA if available)")
    g.add_argument("--depth", type=int, default=28, help="WRN depth, 6n + 4 (10, 16, 22, 28, ...)")
    g.add_argument("--width", type=int, default=2, help="WRN width multiplier")
    g.add_argument("--batch-size", type=int, default=100, help="training batch per run")
    g.add_argument("--train-subset", type=int, default=None, metavar="N",
                   help="train on the first N training images (default: all 50,000)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N",
                   help="evaluate on the first N test images (default: all 10,000)")
    g.add_argument("--amp", action="store_true", help="bf16 autocast (the paper trains in fp32)")
    g.add_argument("--compile", action="store_true", help="torch.compile each process's model")
    g.add_argument("--cuda-graph", action="store_true",
                   help="capture each process's training step and evaluation as CUDA graphs (CUDA only; not with --compile)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (a line per epoch only)")
    g.add_argument("--train-args", type=shlex.split, default=[], metavar="'FLAGS'",
                   help="more blockdpr.train flags for every run, after the planned ones (so they override them), "
                        "e.g. '--keep-momentum' or '--realloc-periods 0:50' (default: none)")

    g = p.add_argument_group("throughput")
    g.add_argument("--benchmark", action="store_true",
                   help="measure aggregate training img/s of element-mode DPR for each --bench-trials, then exit")
    add_list_argument(g, "--bench-trials", type=int, default=[1, 4, 8, 16], metavar="T,T",
                      help="trials per process to measure, the first is the baseline (default: 1,4,8,16)")
    g.add_argument("--bench-images", type=int, default=10_000, metavar="N", help="training images per epoch in the benchmark")
    g.add_argument("--bench-epochs", type=int, default=2, metavar="E", help="epochs per measurement (the last one is reported)")
    g.add_argument("--bench-out", type=Path, default=None, metavar="PATH", help="also write the measurements as JSON here")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    presets.apply_preset(parser, argv)
    opts = parser.parse_args(argv)
    opts.argv = list(sys.argv[1:] if argv is None else argv)
    errors = []
    if opts.trials < 1:
        errors.append("--trials must be >= 1")
    if opts.epochs < 1:
        errors.append("--epochs must be >= 1")
    if opts.trials_per_process is None:
        opts.trials_per_process = TRIALS_PER_PROCESS.get(resolve_device(opts.device).type, 1)
    if opts.trials_per_process < 1:
        errors.append("--trials-per-process must be >= 1")
    if opts.threads is not None and opts.threads < 1:
        errors.append("--threads must be >= 1")
    if opts.pruned_fraction is not None and not 0 < opts.pruned_fraction < 1:
        errors.append(f"--pruned-fraction must be in (0, 1), got {opts.pruned_fraction}")
    if opts.pruned_fraction is not None and opts.target_pruned is not None:
        errors.append("--pruned-fraction and --target-pruned exclude each other (give N_p one way)")
    if opts.target_pruned is not None and opts.target_pruned < 1:
        errors.append(f"--target-pruned must be >= 1, got {opts.target_pruned}")
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
    opts.schedule = Schedule.scaled_from_paper(opts.epochs, opts.stop_epochs, opts.gmp_epochs, iterations_per_epoch(opts))
    try:
        opts.reallocation = {s: reallocation_schedule(opts, s) for s in opts.sparsities}
    except ValueError as e:  # an absolute N_p at or above the active units
        parser.error(str(e))
    if opts.root is None:
        opts.root = Path("runs") / f"figure1-e{opts.epochs}"
    if opts.results is None:  # only a preset, in its own root, writes to the tracked results/
        own_root = opts.preset and opts.root == presets.PRESETS[opts.preset]["root"]
        opts.results = Path("results") / opts.preset if own_root else (
            opts.aggregate_only[0] if opts.aggregate_only else opts.root)
    return opts


def main(argv: list[str] | None = None) -> int:
    """The CLI in-process: 0 when every planned run is finished, 3 when some are not (errors exit
    as blockdpr.train's do: 2 for bad settings or run directories, 1 for a diverged run, 128 + N
    for signal N)."""
    try:
        return run_main(argv)
    except (ConfigError, CheckpointError, train_lib.DataError, ReportError, OSError) as e:
        raise train_lib.error_exit(e.errors if isinstance(e, ConfigError) else [str(e)], 2) from None
    except train_lib.Diverged as e:
        raise train_lib.error_exit([f"training diverged: {e}"], 1) from None
    except train_lib.Stopped as e:
        console.print(escape(f"{e}: run the same command again to continue"), highlight=False)
        raise SystemExit(128 + e.signum) from None


def print_schedule(opts: argparse.Namespace) -> None:
    """The schedule of the matrix, and how much each sparsity's DPR runs will reallocate."""
    s = opts.schedule
    parts = [f"schedule: {s.epochs} epochs, lr x0.2 at {list(s.milestones)}, realloc periods {s.realloc_periods} "
             f"(iterations, {iterations_per_epoch(opts)} an epoch), DPR stop {s.dpr_stop}"]
    if "stop" in opts.conditions:
        parts.append(f"stop sweep {list(s.stop_epochs)}")
    if "gmp" in opts.conditions:
        parts.append(f"gmp {s.gmp_epochs} epochs, {s.gmp_steps} prunings every {s.gmp_interval}, lr {s.gmp_lr}")
    console.print("; ".join(parts), highlight=False)
    if {"dpr", "stop"} & set(opts.conditions):
        for sparsity, r in opts.reallocation.items():
            console.print(f"DPR at sparsity {sparsity}: {r.reallocations} reallocations per run, N_p = {r.target_pruned:,} "
                          f"of {r.active_units:,} active units ({r.pruned_fraction:.3f})", highlight=False)


def run_main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    if opts.threads is not None:
        torch.set_num_threads(opts.threads)
    if opts.benchmark:
        benchmark(opts)
        return 0
    if opts.aggregate_only is not None and opts.rules:
        write_rules_report(aggregate_rules(opts.aggregate_only or [opts.root]), opts.results, command_text(opts))
        return 0
    if opts.aggregate_only is not None:
        roots = opts.aggregate_only or [opts.root]
        rows = report(roots, opts.results)
        if opts.preset:
            presets.write_report(rows, opts.results, opts.preset, roots)
        return 0
    print_schedule(opts)
    complete = execute(opts)
    if opts.dry_run:
        return 0
    if opts.rules and any(opts.root.rglob("summary.json")):
        write_rules_report(aggregate_rules([opts.root]), opts.results, command_text(opts))
    elif any(opts.root.rglob("summary.json")):
        rows = report([opts.root], opts.results)
        if opts.preset:
            presets.write_report(rows, opts.results, opts.preset, [opts.root])
    if not complete:
        console.print("[yellow]not every run is finished[/yellow]: run the same command again to continue")
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main())
