"""Is block-sparse training worth it? Block-sparse layers and training steps against dense peers.

    python -m bench.throughput                    # full sweep on a CUDA GPU (see --list for its size)
    python -m bench.throughput --quick            # the target shapes only (a few minutes on an H100)
    python -m bench.throughput --list             # print the shape table and the plan, measure nothing
    python -m bench.throughput --shard 1/4        # every 4th work item, starting at the 1st
    python -m bench.throughput --report a.json b.json   # merge shard results: table, plot, targets
    python -m bench.throughput --smoke            # tiny shapes, any machine (forced without a GPU)
    python bench/throughput.py --quick            # the same, run as a script

What it measures (all in one run, so every ratio is against a baseline from the same run):

1. layers: every conv of SHAPES (WRN-28-2, WRN-28-10, ResNet-50) and the square linears,
   forward ("fwd"), backward wrt input and weight of a precomputed output ("bwd") and both
   ("fwdbwd"), for the block-sparse layer (blockdpr_kernels) at each sparsity and block size,
   and for its peers: dense cuDNN F.conv2d (channels_last, cudnn.benchmark) / dense F.linear,
   element-masked dense (F.conv2d(x, w * mask) each call, what mask-based sparse-training
   libraries do; its time does not depend on the mask, so it is measured once per layer), and
   torch.sparse BSR (w.to_sparse_bsr + F.linear) for the linear forward.
2. training: images/s of a full SGD step (forward, backward, optimizer step, masks) of WRN-d-k
   on 32x32 input, dense / element mode / block mode per block size, with one DPR
   reallocation timed separately and amortised over --period steps; peak allocated bytes of a
   step and bytes of parameters + gradients + optimizer state (whole model).
3. memory: parameters + gradients + optimizer state of the sparse layers, dense against block
   mode (bench/memory.py, a real SGD step on the CPU).

Correctness before speed: every block-sparse case is first checked against the dense op on the
same weights (forward; input and weight gradients when a backward pass is timed, bench/check.py);
a wrong result makes its rows "failed" (with the errors), never a speed.

Timing (bench/timing.py): triton.testing.do_bench(..., return_mode="all") on CUDA (L2 flushed
before every call; the JSON keeps every raw time); median and the 20-80% spread are reported.
Speedup = dense median / median, shown beside the ideal 1/density and the roofline ceiling of
bench/roofline.py (predicted dense / predicted block-sparse time). Tuned kernel configs are
loaded from bench/results/autotune/<gpu>.json before timing and saved there after it
(bench/autotune_cache.py; --no-autotune-cache to tune from scratch).

Without a GPU the script runs a smoke mode (tiny shapes, plain-torch reference path or
TRITON_INTERPRET=1, time.perf_counter) that exercises the harness only: its timings mean
nothing, and the JSON says so ("timings_meaningless": true).

Output: rich tables on the terminal, bench/results/throughput-<device>-<time>.json (provenance:
device, driver, versions, git commit, command; config; every raw timing) and a PNG per dtype of
speedup against density, one panel per layer, one line per block size. The layer rows come from
bench/layers.py, the training rows from bench/training.py, tables and plots from bench/report.py.
"""

from __future__ import annotations

import argparse
import fnmatch
import re
import sys
import time
from pathlib import Path

import torch

if __package__ in (None, ""):  # `python bench/throughput.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench import autotune_cache, report
from bench.layers import DTYPES, layer_rows
from bench.shapes import LAYER_MODELS, PASSES, SHAPES, LayerShape
from bench.training import TRAIN_MODES, memory_rows, training_rows, wrn_spec
from blockdpr.cli import RawHelpFormatter, add_list_argument, escape
from blockdpr.runinfo import atomic_write_text, provenance
from blockdpr_kernels import CONV_BLOCKS

ROOT = Path(__file__).resolve().parent.parent

SECTIONS = ("layers", "training", "memory")

# Defaults: the full sweep; --quick and --smoke replace the ones they name (explicit flags win).
FULL = dict(models=list(LAYER_MODELS), layers=None, sparsities=[0.0, 0.5, 0.7, 0.8, 0.9, 0.95, 0.98],
            blocks=[16, 32, 64], dtypes=["bf16"], passes=list(PASSES), sections=list(SECTIONS),
            conv_batch=256, tokens=8192, train_models=["wrn-28-2", "wrn-28-10"], train_batches=[128, 512],
            train_sparsities=[0.9], train_modes=list(TRAIN_MODES), backend="auto")
QUICK = dict(layers=["wrn-28-10/g3", "wrn-28-10/g2", "resnet-50/s4.3x3", "linear/4096"],
             sparsities=[0.0, 0.5, 0.8, 0.9, 0.95], blocks=[32, 64], train_models=["wrn-28-10"],
             train_batches=[128])
SMOKE = dict(models=["smoke"], layers=None, sparsities=[0.0, 0.5, 0.9], blocks=[16, 32], dtypes=["fp32"],
             conv_batch=2, tokens=16, train_models=["wrn-10-1"], train_batches=[4])
SMOKE_FORCED = ("models", "layers", "conv_batch", "tokens", "train_models", "train_batches")



# ------------------------------------------------------------------------------------ flags
def _csv(values) -> str:
    """Values as the flags take them: 16,32,64."""
    return ",".join(map(str, values))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    a = p.add_argument

    def lst(flag, **kw):
        add_list_argument(p, flag, **kw)

    a("--quick", action="store_true", help="the target subset: " + "; ".join(f"{k} {_csv(v)}" for k, v in QUICK.items()))
    a("--smoke", action="store_true", help="tiny shapes, timings meaningless (forced when no CUDA GPU)")
    a("--list", action="store_true", help="print the shape table and the planned work, then exit")
    lst("--report", type=Path, metavar="JSON", help="re-render (and merge) result files; measure nothing")
    lst("--sections", choices=SECTIONS, help=f"sections to run (default: {_csv(FULL['sections'])})")
    lst("--models", help=f"layer tables, from {_csv(LAYER_MODELS)} (default: all)")
    lst("--layers", metavar="GLOB", help="layer ids to keep (fnmatch, e.g. 'wrn-28-10/g3' 'linear/*')")
    lst("--sparsities", type=float, help=f"fractions of blocks pruned (default: {_csv(FULL['sparsities'])})")
    lst("--blocks", type=int, help=f"square block sizes from {_csv(CONV_BLOCKS)} (default: {_csv(FULL['blocks'])})")
    lst("--dtypes", help=f"from {_csv(DTYPES)}; training autocasts to it (default: {_csv(FULL['dtypes'])})")
    lst("--passes", help=f"from {_csv(PASSES)} (default: all)")
    a("--conv-batch", type=int, help=f"batch of the conv layer benchmarks (default: {FULL['conv_batch']})")
    a("--tokens", type=int, help=f"rows of the linear layer input (default: {FULL['tokens']})")
    a("--backend", choices=("auto", "triton", "reference"), help="block-sparse layer backend (default: auto)")
    a("--retune", action="store_true", help="clear the kernels' tuned configs before each sparsity (by default "
      "the config tuned at the first sparsity is reused where the autotune key does not change)")
    a("--autotune-cache", type=Path, default=autotune_cache.DEFAULT_DIR,
      metavar="DIR", help="folder of tuned configs per GPU name, loaded before timing and saved after (CUDA only) (default: bench/results/autotune)")
    a("--no-autotune-cache", action="store_true", help="neither load nor save tuned configs")
    lst("--train-models", help=f"WRN-d-k names, e.g. wrn-28-10 (default: {_csv(FULL['train_models'])})")
    lst("--train-batches", type=int, help=f"batches of the training-step benchmarks (default: {_csv(FULL['train_batches'])})")
    lst("--train-sparsities", type=float, help=f"sparsities of the training-step benchmarks (default: {_csv(FULL['train_sparsities'])})")
    lst("--train-modes", help=f"from {_csv(TRAIN_MODES)}; block mode runs each --blocks (default: all)")
    a("--period", type=int, default=100, help="steps between reallocations (amortises one)")
    a("--warmup-ms", type=float, default=25, help="CUDA warm-up time before each measurement (do_bench warmup)")
    a("--rep-ms", type=float, default=30, help="CUDA time of the timed calls per layer measurement (do_bench rep)")
    a("--train-rep-ms", type=float, default=1000, help="--rep-ms of the training-step measurements")
    a("--cpu-reps", type=int, default=3, help="timed repeats per measurement in smoke mode")
    a("--shard", default="1/1", help="I/N: run work items I, I+N, I+2N, ... (1-based)")
    a("--seed", type=int, default=0, help="seed of the random layouts and inputs")
    a("--out", type=Path, default=None, help="output folder (default: bench/results; with --smoke bench/results/smoke)")
    a("--tag", default="", help="appended to the output file names")
    a("--no-plot", action="store_true", help="write no PNG figures")
    return p


def resolve_config(args: argparse.Namespace, parser: argparse.ArgumentParser, cuda: bool) -> dict:
    """Flags -> the full config dict (presets applied, everything validated; parser.error on bad input)."""
    smoke = args.smoke or not cuda
    cfg = dict(FULL)
    if args.quick:
        cfg.update(QUICK)
    if smoke:
        cfg.update(SMOKE)
    if args.models is not None and args.layers is None:
        cfg["layers"] = None  # explicit --models: all their layers, not the --quick selection
    for key in FULL:
        value = getattr(args, key)
        if value is not None and not (smoke and key in SMOKE_FORCED):
            cfg[key] = value
    cfg.update(smoke=smoke, quick=args.quick, period=args.period, warmup_ms=args.warmup_ms, rep_ms=args.rep_ms,
               train_rep_ms=args.train_rep_ms, cpu_reps=args.cpu_reps, retune=args.retune, seed=args.seed,
               shard=args.shard, device="cuda" if cuda else "cpu", tag=args.tag,
               autotune_cache=None if args.no_autotune_cache else args.autotune_cache)
    errors = []
    bad = lambda what, got, allowed: errors.append(f"{what}: {got} not in {list(allowed)}")  # noqa: E731
    for key, allowed in (("models", LAYER_MODELS + ("smoke",)), ("dtypes", DTYPES), ("passes", PASSES),
                         ("train_modes", TRAIN_MODES), ("blocks", CONV_BLOCKS)):
        if unknown := [v for v in cfg[key] if v not in allowed]:
            bad(f"--{key.replace('_', '-')}", unknown, allowed)
    for key in ("sparsities", "train_sparsities"):
        if [s for s in cfg[key] if not 0 <= s < 1]:
            errors.append(f"--{key.replace('_', '-')}: every sparsity must be in [0, 1), got {cfg[key]}")
    if [s for s in cfg["train_sparsities"] if s == 0]:
        errors.append("--train-sparsities: 0 is the dense mode, give sparsities in (0, 1)")
    for name in cfg["train_models"]:
        try:
            wrn_spec(name)
        except ValueError as e:
            errors.append(f"--train-models: {e}")
    for key in ("conv_batch", "tokens", "period", "rep_ms", "train_rep_ms", "cpu_reps"):
        if cfg[key] < 1:
            errors.append(f"--{key.replace('_', '-')}: must be >= 1, got {cfg[key]}")
    if [b for b in cfg["train_batches"] if b < 1]:
        errors.append(f"--train-batches: must be >= 1, got {cfg['train_batches']}")
    m = re.fullmatch(r"(\d+)/(\d+)", cfg["shard"])
    if not m or not 1 <= int(m[1]) <= int(m[2]):
        errors.append(f"--shard: expected I/N with 1 <= I <= N, got {cfg['shard']!r}")
    if cfg["layers"] and "layers" in cfg["sections"]:
        ids = [s.id for s in SHAPES if s.model in cfg["models"]]
        if unmatched := [g for g in cfg["layers"] if not fnmatch.filter(ids, g)]:
            errors.append(f"--layers: {unmatched} match no layer of --models {cfg['models']} (see --list)")
    if errors:
        parser.error("; ".join(errors))
    return cfg


def selected_shapes(cfg: dict) -> list[LayerShape]:
    """The SHAPES rows of cfg's models that match cfg's layer globs."""
    return [s for s in SHAPES if s.model in cfg["models"]
            and (not cfg["layers"] or any(fnmatch.fnmatch(s.id, g) for g in cfg["layers"]))]


def work_items(cfg: dict) -> list[tuple]:
    """Everything to measure, as units that carry their own dense baseline, after --shard."""
    items = []
    if "layers" in cfg["sections"]:
        items += [("layer", s, d) for s in selected_shapes(cfg) for d in cfg["dtypes"]]
    if "training" in cfg["sections"]:
        items += [("training", m, b, d) for m in cfg["train_models"] for b in cfg["train_batches"] for d in cfg["dtypes"]]
    if "memory" in cfg["sections"]:
        items += [("memory", m) for m in cfg["train_models"]]
    i, n = map(int, cfg["shard"].split("/"))
    return items[i - 1::n]


# ------------------------------------------------------------------------------------ main
def run(cfg: dict, console, checkpoint=None) -> dict:
    """Measure every work item of cfg; returns the result dict. checkpoint(result) is called after
    every item (with result["complete"] False), so a run stopped by a time limit keeps its rows."""
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    result = {"schema": 2, "smoke": cfg["smoke"], "timings_meaningless": cfg["smoke"] or device.type != "cuda",
              "provenance": provenance(device), "config": {k: str(v) if isinstance(v, Path) else v
                                                           for k, v in cfg.items()},
              "complete": False, "layers": [], "training": [], "memory": []}
    gpu = report.gpu_name(result)
    tuned = None
    if device.type == "cuda" and cfg["autotune_cache"]:
        tuned = autotune_cache.path_for(gpu, cfg["autotune_cache"])
        result["autotune_cache"] = autotune_cache.load(tuned)
        console.print(f"tuned configs: {escape(result['autotune_cache'])}")
    items = work_items(cfg)
    console.print(f"{len(items)} work items on {gpu or 'CPU'}"
                  + (" [bold red](SMOKE MODE: timings mean nothing)[/]" if cfg["smoke"] else ""))
    log = console.print
    t0 = time.perf_counter()
    for item in items:
        if item[0] == "layer":
            result["layers"] += layer_rows(item[1], item[2], cfg, gpu, log)
        elif item[0] == "training":
            result["training"] += training_rows(*item[1:], DTYPES[item[3]], cfg, log)
        else:
            result["memory"] += memory_rows(item[1], cfg, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if tuned is not None:
            autotune_cache.save(tuned, gpu)
        result["seconds"] = time.perf_counter() - t0
        result["targets"] = report.targets(result)
        if checkpoint:
            checkpoint(result)
    result.update(seconds=time.perf_counter() - t0, targets=report.targets(result), complete=True)
    return result


def print_plan(cfg: dict, console) -> None:
    """--list: the shape table and the work items (with how many timings each holds)."""
    from rich.table import Table

    t = Table(title="SHAPE_TABLE (selected rows marked *)")
    for col in ("", "id", "kind", "c_in", "c_out", "k", "stride", "hw", "count"):
        t.add_column(col, justify="right")
    chosen = set(selected_shapes(cfg))
    for s in SHAPES:
        t.add_row("*" if s in chosen else "", s.id, s.kind, str(s.c_in), str(s.c_out), str(s.k), str(s.stride),
                  str(s.hw), str(s.count))
    console.print(t)
    items = work_items(cfg)
    n_timings = n_tuned = 0
    for item in items:
        if item[0] == "layer":
            s = item[1]
            tiled = [b for b in cfg["blocks"] if not (s.c_in % b or s.c_out % b)]
            bsr = len(tiled) * len(cfg["sparsities"]) if s.kind == "linear" and "fwd" in cfg["passes"] else 0
            n_timings += len(cfg["passes"]) * (2 + len(tiled) * len(cfg["sparsities"])) + bsr
            n_tuned += len(tiled) * (len(cfg["sparsities"]) if cfg["retune"] else 1)
    n_train = sum(len(cfg["train_modes"]) + len(cfg["blocks"]) - 1 for i in items if i[0] == "training")
    n_memory = sum(len(cfg["train_sparsities"]) * len(cfg["blocks"]) for i in items if i[0] == "memory")
    # Rough H100 costs: a timing ~0.15 s; Triton autotuning ~4 s per (layer, block) (3 kernels x 8 configs,
    # plus compiling on a cold cache); a training configuration ~25 s (autotuning its convs included).
    minutes = (0.15 * n_timings + 4 * n_tuned + 25 * n_train + 10 * n_memory) / 60
    console.print(f"shard {cfg['shard']}: {len(items)} work items: {n_timings} layer timings, {n_tuned} autotuned "
                  f"(layer, block) pairs, {n_train} training configurations, {n_memory} memory rows; "
                  f"rough GPU time ~{minutes:.0f} min (H100 guess, cold Triton cache)")


def main(argv: list[str] | None = None) -> dict | None:
    from rich.console import Console

    parser = build_parser()
    args = parser.parse_args(argv)
    console = Console(width=200)
    if args.report:
        result = report.merge(args.report)
        result["config"] = dict(result["config"], tag=args.tag or "merged")
        report.print_tables(result, console)
        report.write_outputs(result, args.out or args.report[0].parent, report.output_stem(result), console,
                             not args.no_plot)
        return result
    cuda = torch.cuda.is_available()
    cfg = resolve_config(args, parser, cuda or (args.list and not args.smoke))  # --list: the GPU plan anywhere
    if not cuda and not args.smoke and not args.list:
        console.print("[bold red]No CUDA GPU: running the SMOKE MODE (tiny shapes; timings mean nothing).[/]")
    if args.list:
        print_plan(cfg, console)
        return None
    out_dir = args.out or (ROOT / "bench" / "results" / ("smoke" if cfg["smoke"] else ""))
    result = run(cfg, console, lambda r: atomic_write_text(out_dir / f"{report.output_stem(r)}.json",
                                                           report.dump_json(r)))
    report.print_tables(result, console)
    report.write_outputs(result, out_dir, report.output_stem(result), console, not args.no_plot)
    console.print(f"done in {result['seconds']:.1f} s"
                  + (" [bold red](SMOKE MODE: timings mean nothing)[/]" if cfg["smoke"] else ""))
    return result


if __name__ == "__main__":
    main()
