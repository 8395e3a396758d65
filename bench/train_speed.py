"""Training speed of the real loop (issue 15): images/s of `blockdpr.engine.Engine.step` for dense and
element-mode DPR WRN-28-2, 1 to 32 stacked trials, fp32 and bf16, eager or as a CUDA graph.

    python -m bench.train_speed                          # the sweep below, on the GPU
    python -m bench.train_speed --trials 1 --precisions fp32 --paths graph
    python -m bench.train_speed --smoke                  # CPU: WRN-10-1, tiny batches; times mean nothing

Each case builds the engine a training run uses (data on the device, stacked model, DPR objects,
optimizer, the step: eager, or captured as a CUDA graph with `--cuda-graph`), runs warm-up steps
(capture included), then times whole loop steps (batch selection, on-device augmentation, the
step) with `bench.timing.time_ms` (do_bench on CUDA). Reallocations are kept out of the timed
steps and timed on their own (every trial's, together, as the loop does them), then amortised over
`--period` steps (100: the paper's most frequent period, the worst case):

    dpr images/s  = T * batch / (step_ms + reallocation_ms / period)
    DPR overhead  = dense images/s / dpr images/s - 1      (same trials, precision and path)

The JSON (rows with raw times, provenance, command) and a markdown table go to --out (default:
bench/results/train-speed-<gpu>.json / .md; smoke runs under bench/results/smoke/). The targets
of issue 15 are checked in the table: DPR 1 trial fp32 >= 30,000 img/s, aggregate >= 100,000,
DPR overhead <= 3%.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/train_speed.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

import torch

from bench.timing import stats, time_ms
from blockdpr.cli import HelpFormatter, add_list_argument
from blockdpr.config import RunConfig
from blockdpr.runinfo import atomic_write_json, atomic_write_text, provenance, slug

ROOT = Path(__file__).resolve().parent.parent
TARGETS = {"dpr_1_trial_fp32": 30_000, "aggregate": 100_000, "dpr_overhead": 0.03}
PERIOD = 100  # the paper's reallocation period in epochs 0-24, its most frequent
SMOKE = dict(depth=10, width=1, batch_size=4, steps_per_epoch=2, warmup=2, trials=[1, 2], precisions=["fp32"],
             paths=["eager"], device="cpu")


@dataclasses.dataclass(frozen=True)
class Case:
    """One measurement: mode ("dense" or "dpr"), stacked trials, precision ("fp32" / "bf16"), path
    ("eager" / "graph")."""
    mode: str
    trials: int
    precision: str
    path: str

    @property
    def label(self) -> str:
        return f"{self.mode} T={self.trials} {self.precision} {self.path}"


def cases(modes, trials, precisions, paths) -> list[Case]:
    """The sweep, dense right before DPR of the same setting (their ratio is the overhead)."""
    return [Case(m, t, p, g) for g in paths for p in precisions for t in trials for m in modes]


def run_configs(case: Case, opts: argparse.Namespace) -> list[RunConfig]:
    """The case's trials as the RunConfigs of a training run (one per seed; the engine writes nothing,
    so their run directories are names only)."""
    images = opts.batch_size * opts.steps_per_epoch
    return [RunConfig(mode=case.mode, sparsity=0.9, seed=seed, out=Path(f"{case.mode}-T{case.trials}-seed{seed}"),
                      device=opts.device, amp=case.precision == "bf16", cuda_graph=case.path == "graph",
                      data=opts.data, train_subset=images, test_subset=opts.batch_size, depth=opts.depth,
                      width=opts.width, batch_size=opts.batch_size, epochs=1, no_progress=True,
                      checkpoint_minutes=0, realloc_periods=((0, 10 ** 9),)).check()  # reallocations: timed apart
            for seed in range(case.trials)]


def measure(case: Case, opts: argparse.Namespace) -> dict:
    """Time one case: warm-up steps, then loop steps; DPR also its reallocations (see the module docstring)."""
    from blockdpr.engine import Engine  # imported here: `--help` stays fast

    engine = Engine(run_configs(case, opts))
    engine.start_epoch(0)
    steps = iter(range(10 ** 9))

    def step():
        engine.step(next(steps) % engine.steps_per_epoch)

    for _ in range(opts.warmup):
        step()
    device = engine.device.type
    timer = dict(warmup_ms=opts.warmup_ms, rep_ms=opts.rep_ms, cpu_reps=opts.cpu_reps)
    row = {"step_times_ms": time_ms(step, device, **timer)}
    step_ms = stats(row["step_times_ms"])["median_ms"]
    realloc_ms = 0.0
    if case.mode == "dpr":
        def reallocate():
            engine.reallocate(list(range(engine.T)))  # every trial, together, as the loop does them
        row["realloc_times_ms"] = time_ms(reallocate, device, **timer)
        realloc_ms = stats(row["realloc_times_ms"])["median_ms"]
    batch = engine.T * opts.batch_size
    row.update(step_ms=step_ms, realloc_ms=realloc_ms, period=opts.period,
               amortised_step_ms=step_ms + realloc_ms / opts.period,
               peak_bytes=torch.cuda.max_memory_allocated() if device == "cuda" else None)
    row["images_per_s"] = batch / row["amortised_step_ms"] * 1e3
    row["per_trial_images_per_s"] = row["images_per_s"] / engine.T
    return row


def overheads(rows: list[dict]) -> None:
    """Add `dpr_overhead` to each DPR row that has a dense row of the same trials, precision and path."""
    dense = {(r["trials"], r["precision"], r["path"]): r for r in rows if r["mode"] == "dense" and r["status"] == "ok"}
    for r in rows:
        match = dense.get((r["trials"], r["precision"], r["path"]))
        if r["mode"] == "dpr" and r["status"] == "ok" and match:
            r["dpr_overhead"] = match["images_per_s"] / r["images_per_s"] - 1


def verdicts(rows: list[dict]) -> list[str]:
    """The issue's targets against the best measured rows: markdown table lines."""
    ok = [r for r in rows if r["status"] == "ok" and r["mode"] == "dpr"]
    one = max((r["images_per_s"] for r in ok if r["trials"] == 1 and r["precision"] == "fp32"), default=None)
    best = max((r["images_per_s"] for r in ok), default=None)
    lowest = min((r["dpr_overhead"] for r in ok if "dpr_overhead" in r), default=None)

    def line(name: str, value, shown: str, target: str, met: bool) -> str:
        return f"| {name} | {'not measured' if value is None else shown} | {target} | " + \
            ("" if value is None else "met" if met else "missed") + " |"
    return [
        line("DPR, 1 trial, fp32 (img/s)", one, f"{one or 0:,.0f}", f">= {TARGETS['dpr_1_trial_fp32']:,}",
             (one or 0) >= TARGETS["dpr_1_trial_fp32"]),
        line("DPR, aggregate over stacked trials (img/s)", best, f"{best or 0:,.0f}", f">= {TARGETS['aggregate']:,}",
             (best or 0) >= TARGETS["aggregate"]),
        line("DPR step overhead against dense (lowest)", lowest, f"{lowest or 0:+.1%}",
             f"<= {TARGETS['dpr_overhead']:.0%}", lowest is not None and lowest <= TARGETS["dpr_overhead"]),
    ]


def markdown(rows: list[dict], meta: dict, heading: bool = True) -> str:
    """The report: (a heading with the command,) one row per case, then the targets."""
    out = [f"# Training speed: WRN-{meta['depth']}-{meta['width']}, batch {meta['batch_size']} per trial, "
           f"{meta['device']}", "", f"`{meta['command']}`", ""] if heading else []
    out += ["| mode | trials | precision | path | step ms | realloc ms | img/s (all trials) | img/s per trial | DPR overhead |",
            "| --- | ---: | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        if r["status"] != "ok":
            out.append(f"| {r['mode']} | {r['trials']} | {r['precision']} | {r['path']} | {r['status']}: "
                       f"{r.get('error', '')} | | | | |")
            continue
        overhead = f"{r['dpr_overhead']:+.1%}" if "dpr_overhead" in r else ""
        out.append(f"| {r['mode']} | {r['trials']} | {r['precision']} | {r['path']} | {r['step_ms']:.2f} | "
                   f"{r['realloc_ms']:.2f} | {r['images_per_s']:,.0f} | {r['per_trial_images_per_s']:,.0f} | {overhead} |")
    out += ["", f"Reallocations amortised over {meta['period']} steps.", "",
            "| target (issue 15) | measured | target | |", "| --- | ---: | ---: | --- |", *verdicts(rows)]
    if meta["smoke"]:
        out += ["", "CPU smoke run: the times mean nothing."]
    return "\n".join(out) + "\n"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    add_list_argument(p, "--modes", choices=("dense", "dpr"), default=["dense", "dpr"], help="what to train")
    add_list_argument(p, "--trials", type=int, default=[1, 8, 16, 32], help="trials stacked in one process")
    add_list_argument(p, "--precisions", choices=("fp32", "bf16"), default=["fp32", "bf16"],
                      help="fp32 (TF32 convolutions, the reproduction's default) or bf16 autocast")
    add_list_argument(p, "--paths", choices=("eager", "graph"), default=["graph"],
                      help="eager steps, or the step captured as a CUDA graph (--cuda-graph; CUDA only)")
    p.add_argument("--depth", type=int, default=28, help="WRN depth")
    p.add_argument("--width", type=int, default=2, help="WRN width")
    p.add_argument("--batch-size", type=int, default=100, help="images per trial per step")
    p.add_argument("--steps-per-epoch", type=int, default=20, help="training images = batch x this (steps cycle)")
    p.add_argument("--period", type=int, default=PERIOD, help="steps over which one reallocation is amortised")
    p.add_argument("--warmup", type=int, default=5, help="steps before timing (the capture happens in them)")
    p.add_argument("--warmup-ms", type=float, default=100, help="do_bench warm-up, ms")
    p.add_argument("--rep-ms", type=float, default=500, help="do_bench timing, ms")
    p.add_argument("--cpu-reps", type=int, default=3, help="timed steps on a CPU")
    p.add_argument("--device", default="auto", help="auto, cuda, cuda:N or cpu")
    p.add_argument("--data", type=Path, default=None, help="CIFAR-10 source (default: the repository's data/)")
    p.add_argument("--smoke", action="store_true",
                   help="CPU smoke run; its defaults: " + ", ".join(
                       f"--{k.replace('_', '-')} " + (",".join(map(str, v)) if isinstance(v, list) else str(v)) for k, v in SMOKE.items()))
    p.add_argument("--out", type=Path, default=None, help="JSON path (the .md goes beside it)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    if parser.parse_known_args(argv)[0].smoke:  # its settings are defaults: flags given still win
        parser.set_defaults(**SMOKE)
    opts = parser.parse_args(argv)
    if min(opts.trials) < 1 or opts.batch_size < 1 or opts.period < 1 or opts.steps_per_epoch < 1 or opts.warmup < 0:
        parser.error("--trials, --batch-size, --period and --steps-per-epoch must be positive, --warmup >= 0")
    if "graph" in opts.paths and not torch.cuda.is_available():
        parser.error("--paths graph needs a CUDA GPU (CUDA graphs); use --paths eager or --smoke")
    return opts


def main(argv: list[str] | None = None) -> list[dict]:
    opts = parse_args(argv)
    cuda = torch.cuda.is_available() and opts.device != "cpu"
    gpu = torch.cuda.get_device_name() if cuda else None
    out = opts.out or (ROOT / "bench" / "results" / (f"train-speed-{slug(gpu)}.json" if gpu else "smoke/train-speed-cpu.json"))
    prov = provenance(argv=["-m", "bench.train_speed", *(sys.argv[1:] if argv is None else argv)])
    meta = {"command": prov["command"], "device": gpu or "CPU", "smoke": opts.smoke, "depth": opts.depth, "width": opts.width,
            "batch_size": opts.batch_size, "period": opts.period, "provenance": prov}
    rows = []
    for case in cases(opts.modes, opts.trials, opts.precisions, opts.paths):
        row = dataclasses.asdict(case)
        try:
            row.update(measure(case, opts), status="ok")
            print(f"{case.label}: {row['images_per_s']:,.0f} img/s", flush=True)
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
            print(f"{case.label}: {row['error']}", flush=True)
        rows.append(row)
        overheads(rows)
        write(out, meta, rows)  # after every case: a session cut short keeps what it measured
        if cuda:
            gc.collect()  # the case's trainer, its CUDA graphs and their memory pools
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
    print(f"wrote {out} and {out.with_suffix('.md')}")
    return rows


def write(out: Path, meta: dict, rows: list[dict]) -> None:
    """The JSON (meta and rows with raw times) and the markdown report beside it."""
    atomic_write_json(out, {"meta": meta, "rows": rows})
    atomic_write_text(out.with_suffix(".md"), markdown(rows, meta))


if __name__ == "__main__":
    main()
