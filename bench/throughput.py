"""Is block-sparse training worth it? Block-sparse layers and training steps against dense peers.

    python bench/throughput.py                    # full sweep on a CUDA GPU (see --list for its size)
    python bench/throughput.py --quick            # the target shapes only (a few minutes on an H100)
    python bench/throughput.py --list             # print the shape table and the plan, measure nothing
    python bench/throughput.py --shard 1/4        # every 4th work item, starting at the 1st
    python bench/throughput.py --report a.json b.json   # merge shard results: table, plot, targets
    python bench/throughput.py --smoke            # tiny shapes, any machine (forced without a GPU)

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

Timing: on CUDA, CUDA events around each repeat after warm-up, with the L2 cache flushed before
every repeat (as triton.testing.do_bench, but a fixed repeat count so the JSON keeps every raw
time); median and the 20-80% spread over the repeats are reported. Speedup = dense median /
median, shown beside the ideal 1/density and the roofline ceiling of bench/kernel_report.py
(predicted dense / predicted block-sparse time). Without a GPU the script runs a smoke mode (tiny
shapes, plain-torch reference path or TRITON_INTERPRET=1, time.perf_counter) that exercises the
harness only: its timings mean nothing, and the JSON says so ("timings_meaningless": true).

Output: rich tables on the terminal, bench/results/throughput-<device>-<time>.json (device,
driver, versions, git commit, command, config, every raw timing) and a PNG per dtype of speedup
against density, one panel per layer, one line per block size.
"""

from __future__ import annotations

import argparse
import datetime
import fnmatch
import json
import math
import os
import platform
import re
import subprocess
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def _ensure_kernels_importable() -> None:
    """Make `import blockdpr_kernels` work from a plain checkout (no `pip install -e .`): load kernels/."""
    import importlib.util

    if importlib.util.find_spec("blockdpr_kernels") is None:
        spec = importlib.util.spec_from_file_location("blockdpr_kernels", ROOT / "blockdpr_kernels" / "__init__.py",
                                                      submodule_search_locations=[str(ROOT / "blockdpr_kernels")])
        module = importlib.util.module_from_spec(spec)
        sys.modules["blockdpr_kernels"] = module
        spec.loader.exec_module(module)


_ensure_kernels_importable()
from bench.memory import measure as memory_measure, nbytes, parameter_state_bytes  # noqa: E402
from blockdpr.models import WideResNet, sparse_parameters  # noqa: E402
from blockdpr.sparsity.element import ElementSparsity  # noqa: E402
from blockdpr.sparsity.packed import to_block_sparse  # noqa: E402
from blockdpr.sparsity.reallocator import DPRConfig, Reallocator  # noqa: E402
from blockdpr_kernels import CONV_BLOCKS, BlockLayout, block_sparse_conv2d, block_sparse_linear  # noqa: E402

try:  # the roofline model (pure python); the harness runs without it
    from bench import kernel_report
except ImportError:
    kernel_report = None

# ------------------------------------------------------------------------------------ shapes
# Every layer the layer benchmark times. Convs: input [batch, c_in, hw, hw] (batch: --conv-batch),
# kernel k x k, padding 1 for 3x3 and 0 for 1x1. Linears: weight [c_out, c_in], input
# [--tokens, c_in]. count = how many layers of that shape the model has. WRN rows are the sparse
# convs of blockdpr.models.WideResNet on 32x32 input (tests/test_bench.py checks them against
# the model); ResNet-50 rows are torchvision's v1.5 bottlenecks (stride on the 3x3) at 224x224.
SHAPE_TABLE = """
model      name          kind    c_in  c_out  k  stride  hw  count
wrn-28-2   g1.in         conv      16     32  3       1  32      1
wrn-28-2   g1            conv      32     32  3       1  32      7
wrn-28-2   g2.in         conv      32     64  3       2  32      1
wrn-28-2   g2            conv      64     64  3       1  16      7
wrn-28-2   g3.in         conv      64    128  3       2  16      1
wrn-28-2   g3            conv     128    128  3       1   8      7
wrn-28-10  g1.in         conv      16    160  3       1  32      1
wrn-28-10  g1            conv     160    160  3       1  32      7
wrn-28-10  g2.in         conv     160    320  3       2  32      1
wrn-28-10  g2            conv     320    320  3       1  16      7
wrn-28-10  g3.in         conv     320    640  3       2  16      1
wrn-28-10  g3            conv     640    640  3       1   8      7
resnet-50  s2.reduce.0   conv      64     64  1       1  56      1
resnet-50  s2.reduce     conv     256     64  1       1  56      2
resnet-50  s2.3x3        conv      64     64  3       1  56      3
resnet-50  s2.expand     conv      64    256  1       1  56      3
resnet-50  s2.down       conv      64    256  1       1  56      1
resnet-50  s3.reduce.0   conv     256    128  1       1  56      1
resnet-50  s3.3x3.0      conv     128    128  3       2  56      1
resnet-50  s3.reduce     conv     512    128  1       1  28      3
resnet-50  s3.3x3        conv     128    128  3       1  28      3
resnet-50  s3.expand     conv     128    512  1       1  28      4
resnet-50  s3.down       conv     256    512  1       2  56      1
resnet-50  s4.reduce.0   conv     512    256  1       1  28      1
resnet-50  s4.3x3.0      conv     256    256  3       2  28      1
resnet-50  s4.reduce     conv    1024    256  1       1  14      5
resnet-50  s4.3x3        conv     256    256  3       1  14      5
resnet-50  s4.expand     conv     256   1024  1       1  14      6
resnet-50  s4.down       conv     512   1024  1       2  28      1
resnet-50  s5.reduce.0   conv    1024    512  1       1  14      1
resnet-50  s5.3x3.0      conv     512    512  3       2  14      1
resnet-50  s5.reduce     conv    2048    512  1       1   7      2
resnet-50  s5.3x3        conv     512    512  3       1   7      2
resnet-50  s5.expand     conv     512   2048  1       1   7      3
resnet-50  s5.down       conv    1024   2048  1       2  14      1
linear     1024          linear  1024   1024  1       1   0      1
linear     2048          linear  2048   2048  1       1   0      1
linear     4096          linear  4096   4096  1       1   0      1
linear     8192          linear  8192   8192  1       1   0      1
smoke      conv3x3       conv      32     32  3       1   8      1
smoke      conv3x3.s2    conv      32     64  3       2   8      1
smoke      conv1x1       conv      64     32  1       1   4      1
smoke      linear        linear    64     64  1       1   0      1
"""


@dataclass(frozen=True)
class LayerShape:
    """One row of SHAPE_TABLE."""

    model: str
    name: str
    kind: str  # "conv" or "linear"
    c_in: int
    c_out: int
    k: int
    stride: int
    hw: int  # input height = width (convs); 0 for linears
    count: int

    @property
    def id(self) -> str:
        """Shell-friendly id used by --layers, e.g. 'wrn-28-10/g3' or 'linear/4096'."""
        return f"{self.model}/{self.name}"

    @property
    def padding(self) -> int:
        return self.k // 2

    def describe(self) -> str:
        if self.kind == "linear":
            return f"linear {self.c_in}->{self.c_out}"
        return f"{self.k}x{self.k} {self.c_in}->{self.c_out} s{self.stride} @{self.hw}x{self.hw}"


def parse_shape_table(text: str = SHAPE_TABLE) -> list[LayerShape]:
    """SHAPE_TABLE -> LayerShape rows (header line skipped)."""
    lines = [line.split() for line in text.strip().splitlines()]
    return [LayerShape(m, n, kind, *map(int, rest)) for m, n, kind, *rest in lines[1:]]


SHAPES = parse_shape_table()
LAYER_MODELS = ("wrn-28-2", "wrn-28-10", "resnet-50", "linear")  # --models (smoke: "smoke")
PASSES = ("fwd", "bwd", "fwdbwd")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
TRAIN_MODES = ("dense", "element", "block")
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

# GPU name substring -> device of bench/kernel_report.py's roofline model.
ROOFLINE_DEVICES = {"H200": "h200", "H100": "h100-sxm", "A100": "a100-sxm"}


# ------------------------------------------------------------------------------------ flags
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = p.add_argument
    a("--quick", action="store_true", help=f"the target subset: {QUICK}")
    a("--smoke", action="store_true", help="tiny shapes, timings meaningless (forced when no CUDA GPU)")
    a("--list", action="store_true", help="print the shape table and the planned work, then exit")
    a("--report", nargs="+", type=Path, metavar="JSON", help="re-render (and merge) result files; measure nothing")
    a("--sections", nargs="+", choices=SECTIONS, help=f"default: {FULL['sections']}")
    a("--models", nargs="+", help=f"layer tables, from {list(LAYER_MODELS)}; default all")
    a("--layers", nargs="+", metavar="GLOB", help="layer ids to keep (fnmatch, e.g. 'wrn-28-10/g3' 'linear/*')")
    a("--sparsities", nargs="+", type=float, help=f"default {FULL['sparsities']}")
    a("--blocks", nargs="+", type=int, help=f"square block sizes from {list(CONV_BLOCKS)}; default {FULL['blocks']}")
    a("--dtypes", nargs="+", help=f"from {list(DTYPES)}; default {FULL['dtypes']} (training: autocast to it)")
    a("--passes", nargs="+", help=f"from {list(PASSES)}; default all")
    a("--conv-batch", type=int, help=f"batch of the conv layer benchmarks (default {FULL['conv_batch']})")
    a("--tokens", type=int, help=f"rows of the linear layer input (default {FULL['tokens']})")
    a("--backend", choices=("auto", "triton", "reference"), help="block-sparse layer backend (default auto)")
    a("--retune", action="store_true", help="clear the kernels' autotune cache before each sparsity (the "
      "autotune key is the shape only, so by default the config tuned at the first sparsity is reused)")
    a("--train-models", nargs="+", help=f"WRN-d-k names, e.g. wrn-28-10; default {FULL['train_models']}")
    a("--train-batches", nargs="+", type=int, help=f"default {FULL['train_batches']}")
    a("--train-sparsities", nargs="+", type=float, help=f"default {FULL['train_sparsities']}")
    a("--train-modes", nargs="+", help=f"from {list(TRAIN_MODES)}; block mode runs each --blocks")
    a("--period", type=int, default=100, help="steps between reallocations (amortises one)")
    a("--warmup-ms", type=float, default=25, help="CUDA warm-up time before each measurement")
    a("--repeats", type=int, default=50, help="timed repeats per layer measurement (CUDA)")
    a("--max-ms", type=float, default=200, help="fewer repeats (>= 3) if they would take longer than this")
    a("--train-repeats", type=int, default=20, help="timed steps per training measurement (CUDA)")
    a("--train-max-ms", type=float, default=3000, help="--max-ms of the training measurements")
    a("--cpu-reps", type=int, default=3, help="timed repeats per measurement in smoke mode")
    a("--shard", default="1/1", help="I/N: run work items I, I+N, I+2N, ... (1-based)")
    a("--seed", type=int, default=0)
    a("--out", type=Path, default=None, help="output folder (default bench/results, smoke: bench/results/smoke)")
    a("--tag", default="", help="appended to the output file names")
    a("--no-plot", action="store_true")
    return p


def wrn_spec(name: str) -> tuple[int, int]:
    """'wrn-28-10' -> (28, 10); ValueError when malformed."""
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if not m or (int(m[1]) - 4) % 6 or int(m[1]) < 10 or int(m[2]) < 1:
        raise ValueError(f"expected a WRN name wrn-D-K with D = 6n + 4 >= 10, K >= 1, got {name!r}")
    return int(m[1]), int(m[2])


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
    cfg.update(smoke=smoke, quick=args.quick, period=args.period, warmup_ms=args.warmup_ms, repeats=args.repeats,
               max_ms=args.max_ms, train_repeats=args.train_repeats, train_max_ms=args.train_max_ms,
               cpu_reps=args.cpu_reps, retune=args.retune, seed=args.seed, shard=args.shard,
               device="cuda" if cuda else "cpu", tag=args.tag)
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
    for key in ("conv_batch", "tokens", "period", "repeats", "max_ms", "train_repeats", "train_max_ms",
                "cpu_reps"):
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


# ------------------------------------------------------------------------------------ environment
def git_info() -> dict:
    def git(*cmd):
        try:
            return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except (OSError, subprocess.SubprocessError):
            return ""
    return {"commit": git("rev-parse", "HEAD") or None, "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}


def environment(device: torch.device) -> dict:
    """Device, driver and library versions."""
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    env = {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
           "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "numpy": np.__version__,
           "host": platform.node(), "cpu_count": os.cpu_count(),
           "triton_interpret": os.environ.get("TRITON_INTERPRET", "0") == "1",
           "allow_tf32": {"matmul": torch.backends.cuda.matmul.allow_tf32, "cudnn": torch.backends.cudnn.allow_tf32},
           "gpu_name": None, "driver": None}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu_name=props.name, capability=list(torch.cuda.get_device_capability(device)),
                   gpu_memory_bytes=props.total_memory, sm_count=props.multi_processor_count)
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20).stdout.strip().splitlines()
            env["driver"] = out[0] if out else None
        except (OSError, subprocess.SubprocessError):
            pass
    return env


# ------------------------------------------------------------------------------------ timing
def time_ms(fn, cfg: dict, repeats: int | None = None, max_ms: float | None = None) -> list[float]:
    """Every timed repeat of fn() in ms.

    CUDA: as triton.testing.do_bench, but with a fixed number of repeats (so the JSON can keep every
    one): one call, an estimate from 3 calls, --warmup-ms of warm-up calls, then `repeats` calls
    (fewer if they would take more than `max_ms`, at least 3), each timed by CUDA events after
    flushing the L2 cache by zeroing a 256 MB buffer. CPU (smoke): perf_counter after one call.
    """
    repeats = repeats or cfg["repeats"]
    if cfg["device"] != "cuda":
        fn()
        times = []
        for _ in range(cfg["cpu_reps"]):
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
        return times
    flush = _l2_flush_buffer()
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(3):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    estimate = max(start.elapsed_time(end) / 3, 1e-3)
    for _ in range(min(1000, max(1, int(cfg["warmup_ms"] / estimate)))):
        fn()
    n = max(3, min(repeats, int((max_ms or cfg["max_ms"]) / estimate)))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for s, e in zip(starts, ends):
        flush.zero_()
        s.record()
        fn()
        e.record()
    torch.cuda.synchronize()
    return [round(s.elapsed_time(e), 5) for s, e in zip(starts, ends)]


_FLUSH: list[torch.Tensor] = []


def _l2_flush_buffer() -> torch.Tensor:
    """A 256 MB CUDA buffer (larger than any L2) whose zeroing evicts the cache, made once."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 * 2**20, dtype=torch.int8, device="cuda"))
    return _FLUSH[0]


def stats(times: list[float]) -> dict:
    """Median and the 20th / 80th percentiles of a list of ms."""
    p20, med, p80 = np.percentile(times, [20, 50, 80])
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "repeats": len(times)}


def roofline(shape: LayerShape, cfg: dict, density: float, block: int, pass_: str, dtype: str,
             gpu_name: str | None) -> dict:
    """Roofline of one block-sparse row from bench/kernel_report.py (predict / dense_prediction: time =
    max(FLOPs / peak, minimum bytes / bandwidth) per kernel; bwd = dgrad + wgrad). The device is the
    GPU's entry in kernel_report.DEVICES (H100 SXM when there is no GPU; nothing for unknown GPUs).
    roofline_ceiling = predicted dense / predicted block-sparse time: the best speedup it allows."""
    if kernel_report is None:
        return {}
    device = next((key for name, key in ROOFLINE_DEVICES.items() if name in (gpu_name or "H100")), None)
    if device is None:
        return {}
    if dtype == "fp32":  # TF32 tensor cores when torch allows them for this op, as the kernels do
        tf32 = torch.backends.cudnn.allow_tf32 if shape.kind == "conv" else torch.backends.cuda.matmul.allow_tf32
        dtype = "tf32" if tf32 else "fp32"
    if shape.kind == "conv":
        geometry = kernel_report.ConvShape(cfg["conv_batch"], shape.c_in, shape.c_out, shape.hw, shape.hw, shape.k,
                                           shape.stride, shape.padding)
    else:
        geometry = kernel_report.LinearShape(cfg["tokens"], shape.c_out, shape.c_in)
    ops = {"fwd": ("fwd",), "bwd": ("dgrad", "wgrad"), "fwdbwd": ("fwd", "dgrad", "wgrad")}[pass_]
    try:
        sparse = sum(kernel_report.predict(op, geometry, density, block, dtype, device=device)["seconds"] for op in ops)
        dense = sum(kernel_report.dense_prediction(op, geometry, dtype, device=device)["seconds"] for op in ops)
    except (ValueError, KeyError, TypeError) as e:  # a model that does not cover the case
        return {"roofline_error": f"{type(e).__name__}: {e}"}
    return {"roofline_device": device, "roofline_ms": sparse * 1e3, "roofline_dense_ms": dense * 1e3,
            "roofline_ceiling": dense / sparse}


# ------------------------------------------------------------------------------------ layers
def exact_mask(grid: tuple[int, int], density: float, generator: torch.Generator) -> torch.Tensor:
    """bool [grid] with exactly max(1, round(density * n)) True, placed by a seeded permutation."""
    n = grid[0] * grid[1]
    keep = max(1, round(density * n))
    mask = torch.zeros(n, dtype=torch.bool)
    mask[torch.randperm(n, generator=generator)[:keep]] = True
    return mask.view(grid)


def pass_fns(forward, inputs: tuple[torch.Tensor, ...], passes: list[str]) -> dict:
    """fn per pass: fwd (no autograd), bwd (grad of one precomputed output wrt inputs), fwdbwd."""
    fns = {}
    if "fwd" in passes:
        def fwd():
            with torch.no_grad():
                forward()
        fns["fwd"] = fwd
    if "bwd" in passes or "fwdbwd" in passes:
        y = forward()
        grad = torch.randn_like(y)
        if "bwd" in passes:
            fns["bwd"] = lambda: torch.autograd.grad(y, inputs, grad, retain_graph=True)
        if "fwdbwd" in passes:
            fns["fwdbwd"] = lambda: torch.autograd.grad(forward(), inputs, grad)
    return fns


def layer_rows(shape: LayerShape, dtype: str, cfg: dict, gpu_name: str | None, log) -> list[dict]:
    """All measurements of one layer shape in one dtype: dense, masked, block per (block, sparsity), BSR."""
    device, dt = torch.device(cfg["device"]), DTYPES[dtype]
    gen = torch.Generator().manual_seed(cfg["seed"])
    fmt = dict(memory_format=torch.channels_last) if shape.kind == "conv" else {}
    if shape.kind == "conv":
        x = torch.randn(cfg["conv_batch"], shape.c_in, shape.hw, shape.hw, generator=gen)
        w = torch.randn(shape.c_out, shape.c_in, shape.k, shape.k, generator=gen) / math.sqrt(shape.c_in * shape.k ** 2)
    else:
        x = torch.randn(cfg["tokens"], shape.c_in, generator=gen)
        w = torch.randn(shape.c_out, shape.c_in, generator=gen) / math.sqrt(shape.c_in)
    x = x.to(device, dt).contiguous(**fmt).requires_grad_()
    w = w.to(device, dt).contiguous(**fmt).requires_grad_()
    geometry = dict(stride=shape.stride, padding=shape.padding)

    def dense(weight):
        return (lambda: F.conv2d(x, weight(), **geometry)) if shape.kind == "conv" else (lambda: F.linear(x, weight()))

    base = dict(layer=shape.id, model=shape.model, name=shape.name, kind=shape.kind, c_in=shape.c_in,
                c_out=shape.c_out, k=shape.k, stride=shape.stride, hw=shape.hw, count=shape.count,
                batch=cfg["conv_batch"] if shape.kind == "conv" else cfg["tokens"], dtype=dtype)
    rows = []

    def record(impl, pass_, fn, more=None, **extra):
        row = dict(base, impl=impl, **{"pass": pass_}, **extra, **(more or {}))
        try:
            if isinstance(fn, Exception):
                raise fn
            row["times_ms"] = time_ms(fn, cfg)
            row.update(stats(row["times_ms"]), status="ok")
        except Exception as e:  # noqa: BLE001 - recorded (a peer may not support a case); the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        return row

    # Dense and element-masked peers (the masked time does not depend on which weights are masked).
    for pass_, fn in pass_fns(dense(lambda: w), (x, w), cfg["passes"]).items():
        record("dense", pass_, fn, block=None, sparsity=0.0, density=1.0)
    mask = (torch.rand(w.shape, generator=gen) < 0.1).to(device, dt).contiguous(**fmt)
    for pass_, fn in pass_fns(dense(lambda: w * mask), (x, w), cfg["passes"]).items():
        record("masked", pass_, fn, block=None, sparsity=None, density=None)

    matrix = w.detach().permute(0, 2, 3, 1).reshape(shape.c_out, -1) if shape.kind == "conv" else w.detach()
    for block in cfg["blocks"]:
        if shape.c_in % block or shape.c_out % block:
            rows.append(dict(base, impl="block", block=block, status="skipped",
                             error=f"block {block} does not tile {shape.c_in}->{shape.c_out}"))
            continue
        grid = (matrix.shape[0] // block, matrix.shape[1] // block)
        for sparsity in cfg["sparsities"]:
            if cfg["retune"]:
                clear_autotune_caches()
            layout = BlockLayout(exact_mask(grid, 1 - sparsity, gen).to(device), (block, block))
            values = layout.pack(matrix.contiguous()).contiguous().requires_grad_()
            density = layout.nnz / (grid[0] * grid[1])
            extra = dict(block=block, sparsity=sparsity, density=density, nnz=layout.nnz, ideal=1 / density)
            if shape.kind == "conv":
                forward = lambda: block_sparse_conv2d(x, values, layout, kernel_size=shape.k,  # noqa: E731
                                                      backend=cfg["backend"], **geometry)
            else:
                forward = lambda: block_sparse_linear(x, values, layout, backend=cfg["backend"])  # noqa: E731
            for pass_, fn in pass_fns(forward, (x, values), cfg["passes"]).items():
                record("block", pass_, fn, roofline(shape, cfg, density, block, pass_, dtype, gpu_name), **extra)
            if shape.kind == "linear" and "fwd" in cfg["passes"]:
                try:
                    fn, more = bsr_forward(x, layout.unpack(values.detach()), block)
                except Exception as e:  # noqa: BLE001 - recorded as a failed peer
                    fn, more = e, {}
                record("bsr", "fwd", fn, more, **extra)
    add_speedups(rows)
    ok = [r for r in rows if r["impl"] == "block" and r.get("status") == "ok" and r["pass"] == cfg["passes"][-1]]
    best = max(ok, key=lambda r: r["speedup"], default=None)
    log(f"  {shape.id:22s} {dtype}: {len(rows)} rows" + (f", best {cfg['passes'][-1]} {best['speedup']:.2f}x "
        f"(block {best['block']}, sparsity {best['sparsity']})" if best else ""))
    return rows


def clear_autotune_caches() -> int:
    """Forget the block-sparse kernels' autotuned configs (next call re-tunes); returns how many."""
    try:
        from blockdpr_kernels import conv as kernel_module
    except ImportError:  # no triton: nothing is tuned
        return 0
    tuners = [v for v in vars(kernel_module).values() if isinstance(getattr(v, "cache", None), dict)
              and hasattr(v, "configs")]
    for tuner in tuners:
        tuner.cache.clear()
    return len(tuners)


def bsr_forward(x: torch.Tensor, weight: torch.Tensor, block: int):
    """(fn, {"bsr_form": ...}): torch.sparse BSR forward of x @ weight^T, through F.linear if torch
    supports that case, else through the BSR @ dense matmul. Raises if neither works (recorded)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "Sparse BSR tensor support is in beta state"
        w_bsr = weight.to_sparse_bsr((block, block))
        forms = {"F.linear(x, w_bsr)": lambda: F.linear(x, w_bsr), "(w_bsr @ x.T).T": lambda: (w_bsr @ x.t()).t()}
        errors = []
        for form, f in forms.items():
            try:
                with torch.no_grad():
                    f()
            except Exception as e:  # noqa: BLE001 - try the next form
                errors.append(f"{form}: {type(e).__name__}: {str(e)[:150]}")
                continue

            def fn(f=f):
                with torch.no_grad(), warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    f()
            return fn, {"bsr_form": form}
    raise RuntimeError("torch.sparse BSR does not support this case: " + "; ".join(errors))


def add_speedups(rows: list[dict]) -> None:
    """speedup = dense median / median, for rows of the same layer, dtype and pass."""
    dense = {(r["layer"], r["dtype"], r["pass"]): r["median_ms"] for r in rows
             if r["impl"] == "dense" and r.get("status") == "ok"}
    for r in rows:
        ref = dense.get((r["layer"], r["dtype"], r.get("pass")))
        if r.get("status") == "ok" and ref:
            r["dense_ms"] = ref
            r["speedup"] = ref / r["median_ms"]
            if r.get("roofline_ms"):
                r["roofline_fraction"] = r["roofline_ms"] / r["median_ms"]  # 1.0 = at the roofline


# ------------------------------------------------------------------------------------ training
def build_training(model_name: str, mode: str, block: int | None, sparsity: float, cfg: dict):
    """(model, optimizer, structure or None, layers kept dense) of one training configuration."""
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model = WideResNet(*wrn_spec(model_name)).to(device)
    names = list(sparse_parameters(model))
    structure, kept_dense = None, []
    if mode == "element":
        structure = ElementSparsity.random(sparse_parameters(model), sparsity, cfg["seed"])
        structure.apply_()
    elif mode == "block":
        structure, kept_dense = to_block_sparse(model, names, block, sparsity, cfg["seed"])
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    return model, optimizer, structure, kept_dense


def training_rows(model_name: str, batch: int, dtype: str, cfg: dict, log) -> list[dict]:
    """Images/s, peak memory and state bytes of a full step: dense, element and block mode."""
    device, dt = torch.device(cfg["device"]), DTYPES[dtype]
    amp = device.type == "cuda" and dt != torch.float32
    configs = [("dense", None, 0.0)] if "dense" in cfg["train_modes"] else []
    for s in cfg["train_sparsities"]:
        configs += [("element", None, s)] if "element" in cfg["train_modes"] else []
        configs += [("block", b, s) for b in cfg["blocks"]] if "block" in cfg["train_modes"] else []
    gen = torch.Generator().manual_seed(cfg["seed"])
    images = torch.randn(batch, 3, 32, 32, generator=gen).to(device).contiguous(memory_format=torch.channels_last)
    labels = torch.randint(0, 10, (batch,), generator=gen).to(device)
    rows = []
    for mode, block, sparsity in configs:
        row = dict(model=model_name, batch=batch, dtype=dtype, amp=amp, mode=mode, block=block, sparsity=sparsity,
                   period=cfg["period"])
        try:
            row.update(measure_training(model_name, mode, block, sparsity, images, labels, dt, amp, cfg))
            row["status"] = "ok"
        except Exception as e:  # noqa: BLE001 - e.g. out of memory: recorded, the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {str(e)[:300]}")
        rows.append(row)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    dense = next((r for r in rows if r["mode"] == "dense" and r["status"] == "ok"), None)
    for r in rows:
        if dense and r["status"] == "ok":
            r["speedup"] = r["images_per_s"] / dense["images_per_s"]
            r["peak_ratio"] = r["peak_bytes"] / dense["peak_bytes"] if dense["peak_bytes"] else None
            r["state_ratio"] = r["state_bytes"] / dense["state_bytes"]
        label = r["mode"] + (f"-{r['block']}" if r["block"] else "")
        log(f"  {model_name} batch {batch} {dtype} {label:9s} s={r['sparsity']}: "
            + (f"{r['images_per_s']:.0f} img/s" if r["status"] == "ok" else r["error"]))
    return rows


def measure_training(model_name, mode, block, sparsity, images, labels, dt, amp, cfg) -> dict:
    """Time one configuration: warm-up, peak memory of a step, step times, reallocation times.

    peak_bytes: torch.cuda.max_memory_allocated during one step, minus what was allocated before the
    model was built (the input batch, the L2 flush buffer): model, optimizer state, activations,
    gradients and workspaces of this configuration only.
    """
    device = images.device
    baseline = 0
    if device.type == "cuda":
        torch.cuda.synchronize()
        baseline = torch.cuda.memory_allocated()
    model, optimizer, structure, kept_dense = build_training(model_name, mode, block, sparsity, cfg)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dt, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        if structure is not None:
            structure.mask_grads_()
        optimizer.step()
        if structure is not None:
            structure.apply_()

    for _ in range(3 if device.type == "cuda" else 1):  # warm-up (cuDNN benchmark, Triton autotune)
        step()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    out = {"step_times_ms": time_ms(step, cfg, cfg["train_repeats"], cfg["train_max_ms"]), "peak_bytes": peak}
    out.update({f"step_{k}": v for k, v in stats(out["step_times_ms"]).items()})
    state = parameter_state_bytes(list(model.parameters()), optimizer)
    if mode == "element":
        state += sum(nbytes(m) for m in structure.masks)
    if mode == "block":
        state += sum(nbytes(t) for m in structure.layers for t in vars(m.layout).values() if torch.is_tensor(t))
        out["layers_kept_dense"] = kept_dense
    out["state_bytes"] = state
    realloc_ms = 0.0
    if structure is not None:
        units = structure.segments.total
        target = max(1, round(DPRConfig().target_pruned * units / sum(structure.dense_numels)))
        reallocator = Reallocator(structure.segments.sizes, DPRConfig(target_pruned=target), cfg["seed"], device)
        counter = iter(range(10 ** 9))
        out["realloc_times_ms"] = time_ms(lambda: structure.reallocate(reallocator, next(counter), optimizer), cfg)
        realloc_ms = stats(out["realloc_times_ms"])["median_ms"]
        out["density"] = sum(structure.nonzero_counts()) / sum(structure.dense_numels)
    out["realloc_ms"] = realloc_ms
    out["amortised_step_ms"] = out["step_median_ms"] + realloc_ms / cfg["period"]
    out["images_per_s"] = images.shape[0] / out["amortised_step_ms"] * 1e3
    return out


def memory_rows(model_name: str, cfg: dict, log) -> list[dict]:
    """Sparse-layer parameter + gradient + optimizer bytes, dense vs block (bench/memory.py)."""
    rows = [memory_measure(*wrn_spec(model_name), s, b) for s in cfg["train_sparsities"] for b in cfg["blocks"]]
    for r in rows:
        log(f"  {r['model']} s={r['sparsity']} block {r['block']}: block/dense bytes {r['ratio']:.3f}")
    return rows


# ------------------------------------------------------------------------------------ targets
def targets(result: dict) -> list[dict]:
    """The issue's targets, checked on the rows present (measured = None when a row is missing)."""
    layers, train, memory = result["layers"], result["training"], result["memory"]

    def layer(layer_id, pass_, impl, sparsity, block, batch):
        return next((r.get("speedup") for r in layers if r["layer"] == layer_id and r.get("pass") == pass_
                     and r["impl"] == impl and r.get("sparsity") == sparsity and r.get("block") == block
                     and r["batch"] == batch and r["dtype"] == "bf16" and r.get("status") == "ok"), None)

    def bsr_ratio():
        mine = next((r for r in layers if r["layer"] == "linear/4096" and r.get("pass") == "fwd" and r["impl"] == "block"
                     and r.get("sparsity") == 0.9 and r.get("block") == 64 and r["batch"] == 8192
                     and r["dtype"] == "bf16" and r.get("status") == "ok"), None)
        bsr = next((r for r in layers if r["layer"] == "linear/4096" and r["impl"] == "bsr" and r.get("sparsity") == 0.9
                    and r.get("block") == 64 and r["batch"] == 8192 and r["dtype"] == "bf16"
                    and r.get("status") == "ok"), None)
        return bsr["median_ms"] / mine["median_ms"] if mine and bsr else None

    out = []

    def add(what, need, measured):
        out.append({"target": what, "required": need, "measured": measured,
                    "met": None if measured is None else measured >= need})

    conv = "conv 3x3 640->640 8x8 batch 256 fwd+bwd bf16 block 32, x cuDNN"
    add(f"{conv} at 90%", 6.0, layer("wrn-28-10/g3", "fwdbwd", "block", 0.9, 32, 256))
    add(f"{conv} at 80%", 3.5, layer("wrn-28-10/g3", "fwdbwd", "block", 0.8, 32, 256))
    add(f"{conv} at 50%", 1.0, layer("wrn-28-10/g3", "fwdbwd", "block", 0.5, 32, 256))
    lin = "linear 4096x4096 8192 tokens bf16 90% block 64"
    add(f"{lin} fwd+bwd, x cuBLAS", 7.0, layer("linear/4096", "fwdbwd", "block", 0.9, 64, 8192))
    add(f"{lin} fwd, x cuBLAS", 7.0, layer("linear/4096", "fwd", "block", 0.9, 64, 8192))
    add(f"{lin} fwd, x torch.sparse BSR", 1.0, bsr_ratio())
    for r in train:
        if r["model"] == "wrn-28-10" and r["mode"] == "block" and r["sparsity"] == 0.9 and r["dtype"] == "bf16":
            add(f"WRN-28-10 step batch {r['batch']} block {r['block']} 90%, x dense img/s", 3.0, r.get("speedup"))
    for r in memory:
        if r["model"] == "WRN-28-10" and r["sparsity"] == 0.9:
            # required is a floor on dense / block, i.e. block <= 13% of dense
            add(f"WRN-28-10 sparse-layer param+grad+opt bytes block {r['block']} 90%, dense / block",
                1 / 0.13, 1 / r["ratio"])
    return out


# ------------------------------------------------------------------------------------ output
def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_tables(result: dict, console) -> None:
    """Layer table (one row per layer, dtype, pass, sparsity; a column per block), training, targets."""
    from rich.table import Table

    if result["smoke"]:
        console.print("[bold red]SMOKE MODE: tiny shapes on " + result["environment"].get("device_kind", "cpu")
                      + ". These timings mean NOTHING; run on a CUDA GPU for real numbers.[/]")
    if not result.get("complete", True):
        console.print("[bold yellow]INCOMPLETE: this run stopped before all its work items were measured.[/]")
    layers = result["layers"]
    blocks = sorted({r["block"] for r in layers if r["impl"] == "block" and r.get("status") == "ok"})
    t = Table(title=f"layers: speedup vs dense (median; ideal = 1/density) on {result['environment'].get('gpu_name') or 'CPU'}")
    for col in ["layer", "shape", "dtype", "pass", "sparsity", "dense ms", "masked x",
                f"bsr x (b{blocks[-1] if blocks else '-'})"] + \
               [f"b{b} x" for b in blocks] + [f"{c} (b{blocks[-1] if blocks else '-'})" for c in ("ideal x", "ceiling x")]:
        t.add_column(col, justify="right")
    keys = sorted({(r["layer"], r["dtype"], r["pass"]) for r in layers if r["impl"] == "dense" and r.get("status") == "ok"},
                  key=lambda k: ([s.id for s in SHAPES].index(k[0]) if k[0] in [s.id for s in SHAPES] else 999, k[1],
                                 PASSES.index(k[2])))
    for layer_id, dtype, pass_ in keys:
        sel = [r for r in layers if r["layer"] == layer_id and r["dtype"] == dtype and r.get("status") == "ok"]
        dense = next(r for r in sel if r["impl"] == "dense" and r["pass"] == pass_)
        masked = next((r for r in sel if r["impl"] == "masked" and r["pass"] == pass_), None)
        shape = next((s.describe() for s in SHAPES if s.id == layer_id), "")
        for sparsity in sorted({r["sparsity"] for r in sel if r["impl"] == "block"}):
            cell = {b: next((r for r in sel if r["impl"] == "block" and r["pass"] == pass_ and r["block"] == b
                             and r["sparsity"] == sparsity), None) for b in blocks}
            last = cell[blocks[-1]] if blocks else None
            bsr = next((r for r in sel if r["impl"] == "bsr" and r["pass"] == pass_ and r["sparsity"] == sparsity
                        and blocks and r["block"] == blocks[-1]), None)
            t.add_row(layer_id, shape, dtype, pass_, f"{sparsity:.2f}", f"{dense['median_ms']:.3f}",
                      fmt_x(masked and masked.get("speedup")), fmt_x(bsr and bsr.get("speedup")),
                      *[fmt_x(c and c.get("speedup")) for c in cell.values()], fmt_x(last and last["ideal"]),
                      fmt_x(last and last.get("roofline_ceiling")))
    if keys:
        console.print(t)
    skipped = sorted({(r["layer"], r["block"]) for r in layers if r.get("status") == "skipped"})
    if skipped:
        console.print("not tiled by the block (skipped): " + ", ".join(f"{l} b{b}" for l, b in skipped))
    failed = [r for r in layers if r.get("status") == "failed"]
    for r in failed[:10]:
        console.print(f"[yellow]failed:[/] {r['layer']} {r['dtype']} {r['impl']} {r.get('pass')} "
                      f"block {r.get('block')} s={r.get('sparsity')}: {r['error']}")
    if len(failed) > 10:
        console.print(f"[yellow]... and {len(failed) - 10} more failed layer measurements (see the JSON)[/]")

    if result["training"]:
        t = Table(title="training step (forward, backward, SGD step, reallocation / period)")
        for col in ("model", "batch", "dtype", "mode", "block", "sparsity", "step ms", "realloc ms", "img/s",
                    "x dense", "peak MB", "state MB", "state / dense"):
            t.add_column(col, justify="right")
        for r in result["training"]:
            ok = r["status"] == "ok"
            t.add_row(r["model"], str(r["batch"]), r["dtype"], r["mode"], str(r["block"] or "-"), f"{r['sparsity']:.2f}",
                      f"{r['step_median_ms']:.2f}" if ok else r["status"], f"{r['realloc_ms']:.2f}" if ok else "-",
                      f"{r['images_per_s']:.0f}" if ok else "-", fmt_x(r.get("speedup")),
                      f"{r['peak_bytes'] / 2**20:.0f}" if ok and r["peak_bytes"] else "-",
                      f"{r['state_bytes'] / 2**20:.1f}" if ok else "-", fmt_x(r.get("state_ratio")))
        console.print(t)
    if result["memory"]:
        t = Table(title="sparse layers: parameters + gradients + SGD momentum (bench/memory.py)")
        for col in ("model", "sparsity", "block", "dense MB", "block MB", "block / dense", "kept dense"):
            t.add_column(col, justify="right")
        for r in result["memory"]:
            t.add_row(r["model"], f"{r['sparsity']:.2f}", str(r["block"]), f"{r['dense_bytes'] / 1e6:.2f}",
                      f"{r['block_bytes'] / 1e6:.2f}", f"{r['ratio']:.3f}", str(len(r["layers_kept_dense"])))
        console.print(t)
    t = Table(title="targets (bf16; met = measured >= required)")
    for col in ("target", "required", "measured", "met"):
        t.add_column(col, justify="right")
    for r in result["targets"]:
        t.add_row(r["target"], f">= {r['required']:.2f}", fmt_x(r["measured"]),
                  "-" if r["met"] is None else ("yes" if r["met"] else "NO"))
    console.print(t)


def plot(result: dict, path_stem: Path) -> list[Path]:
    """A PNG per dtype: one panel per layer, speedup vs density, a line per block size (the last of the
    run's passes, fwdbwd by default), the masked-dense peer and the ideal 1/density line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (used as matplotlib.ticker)

    layers = [r for r in result["layers"] if r.get("status") == "ok"]
    paths = []
    for dtype in sorted({r["dtype"] for r in layers}):
        rows = [r for r in layers if r["dtype"] == dtype]
        passes = [p for p in PASSES if any(r["pass"] == p and r["impl"] == "block" for r in rows)]
        if not passes:
            continue
        pass_ = passes[-1]
        ids = [s.id for s in SHAPES if any(r["layer"] == s.id for r in rows)]
        ncols = min(4, len(ids))
        nrows = math.ceil(len(ids) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
        for ax, layer_id in zip(axes.flat, ids):
            sel = [r for r in rows if r["layer"] == layer_id and r["pass"] == pass_]
            densities = sorted({r["density"] for r in sel if r["impl"] == "block"})
            for block in sorted({r["block"] for r in sel if r["impl"] == "block"}):
                pts = sorted((r["density"], r["speedup"]) for r in sel
                             if r["impl"] == "block" and r["block"] == block and "speedup" in r)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"block {block}")
            if densities:
                d = np.geomspace(min(densities), 1, 50)
                ax.plot(d, 1 / d, "k--", lw=1, label="ideal 1/density")
            masked = next((r for r in sel if r["impl"] == "masked" and "speedup" in r), None)
            if masked:
                ax.axhline(masked["speedup"], color="gray", ls=":", label="masked dense")
            ax.axhline(1, color="k", lw=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if min(densities or [1]) <= t]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            shape = next(s for s in SHAPES if s.id == layer_id)
            ax.set_title(f"{layer_id}: {shape.describe()}", fontsize=8)
            ax.set_xlabel("density")
            ax.set_ylabel(f"{pass_} speedup vs dense")
            ax.legend(fontsize=6)
        for ax in list(axes.flat)[len(ids):]:
            ax.axis("off")
        device = result["environment"].get("gpu_name") or "CPU"
        title = f"block-sparse {pass_} speedup over dense, {dtype}, {device}"
        if result["smoke"]:
            title = "SMOKE MODE (timings meaningless): " + title
        fig.suptitle(title)
        fig.tight_layout()
        path = path_stem.with_name(f"{path_stem.name}-{dtype}.png")
        fig.savefig(path, dpi=80)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_summary(result: dict, json_name: str) -> str:
    """README-ready summary: targets and training steps, with the device and the results file."""
    env = result["environment"]
    lines = ["**SMOKE MODE: tiny shapes, these timings mean nothing.**", ""] if result["timings_meaningless"] else []
    lines += [f"Device: {env.get('gpu_name') or 'CPU'} (driver {env.get('driver')}, CUDA {env.get('cuda')}, "
             f"torch {env.get('torch')}, triton {env.get('triton')}); results `{json_name}`.", "",
             "| target | required | measured | met |", "| --- | --- | --- | --- |"]
    for r in result["targets"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['target']} | >= {r['required']:.2f} | {fmt_x(r['measured'])} | {met} |")
    if result["training"]:
        lines += ["", "| model | batch | mode | block | sparsity | img/s | x dense | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["training"]:
            if r["status"] == "ok":
                peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
                lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['block'] or '-'} | {r['sparsity']} | "
                             f"{r['images_per_s']:.0f} | {fmt_x(r.get('speedup'))} | {peak} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path, stem: str, console, make_plot: bool = True) -> dict:
    """JSON, PNGs and the markdown summary; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path = out_dir / f"{stem}.json"
    paths = {"json": json_path}
    if make_plot:
        paths["png"] = plot(result, out_dir / stem)
    result["outputs"] = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()}
    json_path.write_text(dump_json(result))
    md = out_dir / f"{stem}.md"
    md.write_text(markdown_summary(result, json_path.name))
    paths["md"] = md
    console.print(f"wrote {json_path}, {md}" + "".join(f", {p}" for p in paths.get("png", [])))
    return paths


def dump_json(result: dict) -> str:
    """JSON with one line per measured row (the raw timings make rows long, the file stays diffable)."""
    parts = []
    for key, value in result.items():
        if key in ("layers", "training", "memory") and value:
            text = "[\n  " + ",\n  ".join(json.dumps(r) for r in value) + "\n ]"
        else:
            text = json.dumps(value, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def output_stem(result: dict) -> str:
    """throughput-<device>-<UTC time>[-tag]; smoke runs always write throughput-smoke[-tag]."""
    tag = f"-{result['config']['tag']}" if result["config"].get("tag") else ""
    if result["smoke"]:
        return f"throughput-smoke{tag}"
    device = re.sub(r"[^a-z0-9]+", "-", (result["environment"].get("gpu_name") or "cpu").lower()).strip("-")
    return f"throughput-{device}-{result['created'].replace(':', '').replace('-', '')[:15]}{tag}"


# ------------------------------------------------------------------------------------ main
def run(cfg: dict, console, checkpoint=None) -> dict:
    """Measure every work item of cfg; returns the result dict. checkpoint(result) is called after
    every item (with result["complete"] False), so a run stopped by a time limit keeps its rows."""
    device = torch.device(cfg["device"])
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    env = environment(device)
    env["device_kind"] = "cuda" if device.type == "cuda" else "cpu"
    result = {"schema": 1, "smoke": cfg["smoke"], "timings_meaningless": cfg["smoke"] or device.type != "cuda",
              "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ"),
              "command": " ".join([Path(sys.executable).name] + sys.argv), "git": git_info(), "environment": env,
              "config": cfg, "complete": False, "layers": [], "training": [], "memory": []}
    items = work_items(cfg)
    console.print(f"{len(items)} work items on {env['gpu_name'] or 'CPU'}"
                  + (" [bold red](SMOKE MODE: timings mean nothing)[/]" if cfg["smoke"] else ""))
    log = console.print
    t0 = time.perf_counter()
    for item in items:
        if item[0] == "layer":
            result["layers"] += layer_rows(item[1], item[2], cfg, env["gpu_name"], log)
        elif item[0] == "training":
            result["training"] += training_rows(*item[1:], cfg, log)
        else:
            result["memory"] += memory_rows(item[1], cfg, log)
        if device.type == "cuda":
            torch.cuda.empty_cache()
        result["seconds"] = time.perf_counter() - t0
        result["targets"] = targets(result)
        if checkpoint:
            checkpoint(result)
    result.update(seconds=time.perf_counter() - t0, targets=targets(result), complete=True)
    return result


def merge(paths: list[Path]) -> dict:
    """One result from several result files (shards of one sweep): rows concatenated, device checked."""
    parts = [json.loads(p.read_text()) for p in paths]
    gpus = {p["environment"].get("gpu_name") for p in parts}
    if len(gpus) > 1:
        raise SystemExit(f"--report: the files come from different devices {sorted(map(str, gpus))}; "
                         "speedups are only comparable within one device")
    result = dict(parts[0])
    result.update(complete=all(p.get("complete", True) for p in parts), smoke=any(p["smoke"] for p in parts), timings_meaningless=any(p["timings_meaningless"] for p in parts),
                  sources=[{"file": str(path), "created": p["created"], "command": p["command"], "git": p["git"],
                            "config": p["config"]} for path, p in zip(paths, parts)],
                  layers=[r for p in parts for r in p["layers"]], training=[r for p in parts for r in p["training"]],
                  memory=[r for p in parts for r in p["memory"]])
    result["targets"] = targets(result)
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
        result = merge(args.report)
        result["config"] = dict(result["config"], tag=args.tag or "merged")
        print_tables(result, console)
        write_outputs(result, args.out or args.report[0].parent, output_stem(result), console, not args.no_plot)
        return result
    cuda = torch.cuda.is_available()
    cfg = resolve_config(args, parser, cuda or (args.list and not args.smoke))  # --list: the GPU plan anywhere
    if not cuda and not args.smoke and not args.list:
        console.print("[bold red]No CUDA GPU: running the SMOKE MODE (tiny shapes; timings mean nothing).[/]")
    if args.list:
        print_plan(cfg, console)
        return None
    out_dir = args.out or (ROOT / "bench" / "results" / ("smoke" if cfg["smoke"] else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    result = run(cfg, console, lambda r: (out_dir / f"{output_stem(r)}.json").write_text(dump_json(r)))
    print_tables(result, console)
    write_outputs(result, out_dir, output_stem(result), console, not args.no_plot)
    console.print(f"done in {result['seconds']:.1f} s"
                  + (" [bold red](SMOKE MODE: timings mean nothing)[/]" if cfg["smoke"] else ""))
    return result


if __name__ == "__main__":
    main()
