"""What ``bash bench/gpu_session.sh`` runs: one bounded session on a lent GPU.

    bash bench/gpu_session.sh                   # CUDA: every step below, < 9 minutes from a cold Triton cache
    bash bench/gpu_session.sh --steps train-speed,breakdown   # only these steps
    bash bench/gpu_session.sh --out DIR         # results elsewhere (default: bench/results/<gpu>-<date>)
    bash bench/gpu_session.sh --list            # the steps and their time limits; run nothing

Each step is a subprocess with its own time limit (its process group is killed when the limit is
reached, so a slow step cannot starve the rest), also cut to what is left of the session's
budget. Its output goes to ``DIR/logs/<step>.log``. On CUDA:

  kernel-tests      pytest tests/kernels on the GPU, autotuning narrowed to one config per kernel
                    (bench/narrow_autotune.py) so compiling stays bounded; junit XML kept
  throughput-quick  python -m bench.throughput --quick --sections layers (the target table, every
                    block-sparse case checked against the dense op before it is timed)
  train-wrn-28-2    training steps dense / element / block 32, WRN-28-2, batch 100
  train-wrn-28-10   the same for WRN-28-10, batch 128
  breakdown         python -m bench.breakdown (per-kernel times of the target shapes, profiler)
  train-speed       python -m bench.train_speed: the training loop's img/s, dense and DPR, 1-32 stacked
                    trials, fp32 and bf16, as CUDA graphs (issue 15's targets)
  readme            the README's results table regenerated from the JSON (bench/readme.py)

The throughput and breakdown steps load the tuned kernel configs of bench/results/autotune/<gpu>.json
before timing and save them after (bench/autotune_cache.py), so the next session on the same kind
of GPU starts tuned. Without a GPU the same command runs the CPU smoke parts (tiny shapes, kernels
under the Triton interpreter, a WRN-10-1 training-loop run; no kernel tests, README untouched:
its table goes to DIR/readme-table.md) in under two minutes, and says so. ``DIR/summary.json``
lists each step's command, limit, wall time, exit status and the files it wrote; it is rewritten
after every step.
"""
from __future__ import annotations

import argparse
import datetime
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):  # `python bench/session.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench import autotune_cache, readme
from blockdpr.cli import RawHelpFormatter, add_list_argument
from blockdpr.runinfo import atomic_write_json, atomic_write_text, provenance, slug

__all__ = ["Step", "gpu_steps", "cpu_steps", "run_step", "run_session", "main"]

ROOT = Path(__file__).resolve().parent.parent
GPU_BUDGET_S = 510  # the steps' limits below add up to this: < 9 minutes with start-up
CPU_BUDGET_S = 110


@dataclass
class Step:
    """One bounded step: ``argv`` (``{out}`` is replaced by the results folder), its limit in seconds."""
    name: str
    argv: list[str]
    timeout_s: int
    env: dict = field(default_factory=dict)


def gpu_steps() -> list[Step]:
    """The steps of a CUDA session, in order."""
    py = [sys.executable]
    tp = py + ["-m", "bench.throughput", "--out", "{out}", "--sections"]
    return [
        Step("kernel-tests", py + ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "bench.narrow_autotune",
                                   "--maxfail", "5", "tests/kernels", "--junitxml", "{out}/kernel-tests.xml"], 70),
        Step("throughput-quick", tp + ["layers", "--quick", "--tag", "quick"], 130),
        Step("train-wrn-28-2", tp + ["training", "--train-models", "wrn-28-2", "--train-batches", "100",
                                     "--blocks", "32", "--tag", "train-wrn-28-2"], 50),
        Step("train-wrn-28-10", tp + ["training", "--train-models", "wrn-28-10", "--train-batches", "128",
                                      "--blocks", "32", "--tag", "train-wrn-28-10"], 60),
        Step("breakdown", py + ["-m", "bench.breakdown", "--out", "{out}"], 50),
        Step("train-speed", py + ["-m", "bench.train_speed", "--out", "{out}/train-speed.json"], 150),
    ]


def cpu_steps() -> list[Step]:
    """The CPU smoke parts (tiny shapes; timings mean nothing)."""
    py = [sys.executable]
    tp = py + ["-m", "bench.throughput", "--smoke", "--cpu-reps", "1", "--out", "{out}", "--sections"]
    return [
        Step("throughput-smoke", tp + ["layers", "--blocks", "16", "--sparsities", "0.9", "--tag", "quick"], 40),
        Step("train-smoke", tp + ["training", "--blocks", "16", "--tag", "train"], 30),
        Step("breakdown-smoke", py + ["-m", "bench.breakdown", "--smoke", "--out", "{out}"], 30,
             env={"TRITON_INTERPRET": "1"}),
        Step("train-speed-smoke", py + ["-m", "bench.train_speed", "--smoke", "--cpu-reps", "1",
                                        "--out", "{out}/train-speed.json"], 40),
    ]


def _snapshot(folders: list[Path]) -> dict:
    return {p: p.stat().st_mtime_ns for d in folders if d.is_dir() for p in d.rglob("*") if p.is_file()}


def run_step(step: Step, out: Path, limit_s: float, watched: list[Path]) -> dict:
    """Run one step with a time limit (the whole process group is killed at the limit); returns its record."""
    argv = [a.replace("{out}", str(out)) for a in step.argv]
    log = out / "logs" / f"{step.name}.log"
    log.parent.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
               **step.env)
    before = _snapshot(watched)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        proc = subprocess.Popen(argv, cwd=ROOT, env=env, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code, timed_out = proc.wait(timeout=limit_s), False
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            code, timed_out = proc.returncode, True
    wall = time.perf_counter() - t0
    files = sorted(str(p.relative_to(ROOT) if p.is_relative_to(ROOT) else p)
                   for p, m in _snapshot(watched).items() if before.get(p) != m and p != log)
    status = f"timed out after {limit_s:.0f} s" if timed_out else ("ok" if code == 0 else f"exit {code}")
    return {"name": step.name, "command": argv, "env": step.env, "timeout_s": round(limit_s), "wall_s": round(wall, 1),
            "exit_code": code, "timed_out": timed_out, "status": status, "log": str(log), "files": files}


def default_out(gpu: str | None) -> Path:
    """bench/results/<gpu>-<date> on CUDA; bench/results/smoke/session-cpu without a GPU."""
    if gpu is None:
        return ROOT / "bench" / "results" / "smoke" / "session-cpu"
    return ROOT / "bench" / "results" / f"{slug(gpu)}-{datetime.date.today():%Y%m%d}"


def run_session(out: Path, cuda: bool, gpu: str | None, steps: list[Step], budget_s: float,
                readme_path: Path | None, say=print) -> dict:
    """Run ``steps`` within ``budget_s`` seconds in all, then the README table; summary.json after each step."""
    out.mkdir(parents=True, exist_ok=True)
    summary = {"mode": "gpu" if cuda else "cpu-smoke", "gpu": gpu, "budget_s": budget_s,
               "provenance": provenance(), "results": str(out), "steps": [],
               "complete": False}
    if not cuda:
        summary["note"] = ("no CUDA GPU: CPU smoke parts only (tiny shapes, kernels under the Triton interpreter, "
                           "no kernel tests); timings mean nothing, the README is left as it is")
        say(f"NO CUDA GPU: running the CPU smoke parts only (under {budget_s:.0f} s); timings mean nothing")
    watched = [out, autotune_cache.DEFAULT_DIR]
    t0 = time.perf_counter()
    for step in steps:
        left = budget_s - (time.perf_counter() - t0)
        if left < 5:
            record = {"name": step.name, "status": "skipped: session budget spent", "wall_s": 0.0,
                      "timeout_s": step.timeout_s, "files": []}
        else:
            say(f"[{time.perf_counter() - t0:5.0f} s] {step.name} (limit {min(step.timeout_s, left):.0f} s) ...")
            record = run_step(step, out, min(step.timeout_s, left), watched)
        say(f"        {step.name}: {record['status']} in {record['wall_s']:.1f} s")
        summary["steps"].append(record)
        summary["wall_s"] = round(time.perf_counter() - t0, 1)
        atomic_write_json(out / "summary.json", summary)
    table = readme.results_markdown(out, ROOT)
    atomic_write_text(out / "readme-table.md", table)
    if cuda and readme_path is not None:
        try:
            readme.update_readme(readme_path, out)
            summary["readme"] = f"regenerated {readme_path}"
        except ValueError as e:
            summary["readme"] = f"not regenerated: {e}"
    else:
        summary["readme"] = f"{readme_path} left as it is; the table is in {out / 'readme-table.md'}"
    summary.update(wall_s=round(time.perf_counter() - t0, 1), complete=True)
    atomic_write_json(out / "summary.json", summary)
    bad = [s["name"] for s in summary["steps"] if s["status"] != "ok"]
    say(f"session done in {summary['wall_s']:.0f} s; results in {out}; README: {summary['readme']}"
        + (f"; steps not ok: {bad}" if bad else "") + ("" if cuda else " (CPU SMOKE: timings mean nothing)"))
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--out", type=Path, default=None, help="results folder (default: see above)")
    parser.add_argument("--budget-s", type=float, default=None,
                        help=f"seconds for all steps (default: {GPU_BUDGET_S} on CUDA, {CPU_BUDGET_S} without)")
    parser.add_argument("--readme", type=Path, default=ROOT / "README.md", metavar="PATH",
                        help="README whose table is regenerated (default: the repository's README.md)")
    parser.add_argument("--list", action="store_true", help="print the steps and their limits; run nothing")
    add_list_argument(parser, "--steps", default=None, help="run only these steps (names as --list prints them)")
    args = parser.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    gpu = torch.cuda.get_device_name() if cuda else None
    steps = gpu_steps() if cuda else cpu_steps()
    if args.steps:
        unknown = sorted(set(args.steps) - {s.name for s in steps})
        if unknown:
            parser.error(f"--steps: no step named {', '.join(unknown)} on this machine; "
                         f"its steps: {', '.join(s.name for s in steps)}")
        steps = [s for s in steps if s.name in args.steps]
    if args.list:
        for title, listed in (("on CUDA", gpu_steps()), ("without a GPU (CPU smoke)", cpu_steps())):
            print(f"{title}:" + (" <- this machine" if listed[0].name == steps[0].name else ""))
            for s in listed:
                print(f"  {s.name:18s} limit {s.timeout_s:4d} s  {' '.join(s.argv)}")
        return 0
    budget = args.budget_s or min(sum(s.timeout_s for s in steps), GPU_BUDGET_S if cuda else CPU_BUDGET_S)
    summary = run_session(args.out or default_out(gpu), cuda, gpu, steps, budget, args.readme)
    return 0 if all(s["status"] == "ok" for s in summary["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
