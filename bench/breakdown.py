"""Per-kernel breakdown of the target shapes: where a block-sparse fwd+bwd spends its time.

    python -m bench.breakdown --out DIR          # CUDA: the target cases in bf16
    python -m bench.breakdown --smoke --out DIR  # tiny cases (forced without a GPU; timings mean nothing)

Cases (bench.shapes ids): conv 3x3 640->640 on 8x8, batch 256, 90% sparse, block 32 and 64
(``wrn-28-10/g3``); linear 4096 -> 4096 on 8192 tokens, 90%, block 64 (``linear/4096``). Per case,
after a correctness check against the dense op (bench/check.py; a wrong case is reported, not timed):

* ``launch_ms``: each kernel launcher of ``blockdpr_kernels.conv`` (forward, grad_input,
  grad_weight) alone. The launches are recorded from one fwd+bwd of the public op and replayed
  with the very arguments the op gave them (:func:`record_launches`), so this stays right when the
  launchers' signatures change;
* ``dense_ms``: cuDNN's (cuBLAS's) forward, input-gradient and weight-gradient passes alone;
* ``op_ms``: the public op forward + backward (what training pays), and ``op_host_ms``: the same
  on the host only (no synchronisation), i.e. the Python / dispatch cost per call;
* ``profile``: ``torch.profiler`` over 10 fwd+bwd steps (smoke: 2): the top kernels by device time and the
  blockdpr_kernels ops with their host time per call.

Output: ``DIR/breakdown.json`` (provenance, rows) and ``DIR/breakdown.md``.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

if __package__ in (None, ""):  # `python bench/breakdown.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench import autotune_cache
from bench.check import check_case
from bench.layers import DTYPES, exact_mask
from bench.shapes import by_id
from bench.timing import stats, time_ms
from blockdpr.cli import RawHelpFormatter, add_list_argument
from blockdpr.runinfo import atomic_write_json, atomic_write_text, provenance
from blockdpr_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear

__all__ = ["CASES", "SMOKE_CASES", "LAUNCHERS", "record_launches", "measure_case", "markdown", "main"]

# (layer id, sparsity, block, conv batch / linear tokens)
CASES = [("wrn-28-10/g3", 0.9, 32, 256), ("wrn-28-10/g3", 0.9, 64, 256), ("linear/4096", 0.9, 64, 8192)]
SMOKE_CASES = [("smoke/conv1x1", 0.5, 32, 1), ("smoke/linear", 0.5, 32, 16)]  # interpreter-sized
LAUNCHERS = ("forward", "grad_input", "grad_weight")  # of blockdpr_kernels.conv (linears launch them too)


def record_launches(run) -> dict:
    """``{launcher name: (function, args, kwargs)}`` of the last call of each LAUNCHERS function of
    ``blockdpr_kernels.conv`` made while ``run()`` runs (the module attributes are wrapped meanwhile)."""
    from blockdpr_kernels import conv

    seen, originals = {}, {name: getattr(conv, name) for name in LAUNCHERS}

    def wrap(name, fn):
        def recorder(*args, **kwargs):
            seen[name] = (fn, args, kwargs)
            return fn(*args, **kwargs)
        return recorder

    try:
        for name, fn in originals.items():
            setattr(conv, name, wrap(name, fn))
        run()
    finally:
        for name, fn in originals.items():
            setattr(conv, name, fn)
    return seen


def _inputs(shape, batch: int, sparsity: float, block: int, dt: torch.dtype, device: torch.device, seed: int):
    """x, dense weight w, packed values, layout and the dense weight matrix of one case (seeded)."""
    gen = torch.Generator().manual_seed(seed)
    if shape.kind == "conv":
        x = torch.randn(batch, shape.c_in, shape.hw, shape.hw, generator=gen)
        w = torch.randn(shape.c_out, shape.c_in, shape.k, shape.k, generator=gen) / math.sqrt(shape.c_in * shape.k ** 2)
        fmt = torch.channels_last
        matrix = w.permute(0, 2, 3, 1).reshape(shape.c_out, -1)
    else:
        x = torch.randn(batch, shape.c_in, generator=gen)
        w = torch.randn(shape.c_out, shape.c_in, generator=gen) / math.sqrt(shape.c_in)
        fmt, matrix = torch.contiguous_format, w
    grid = (matrix.shape[0] // block, matrix.shape[1] // block)
    layout = BlockLayout(exact_mask(grid, 1 - sparsity, gen).to(device), (block, block))
    values = layout.pack(matrix.to(device, dt).contiguous()).contiguous().requires_grad_()
    w = layout.unpack(values.detach())
    if shape.kind == "conv":
        w = w.view(shape.c_out, shape.k, shape.k, shape.c_in).permute(0, 3, 1, 2)
    x = x.to(device, dt).contiguous(memory_format=fmt).requires_grad_()
    return x, w.contiguous(memory_format=fmt).requires_grad_(), values, layout


def _dense_passes(shape, x, w, dy) -> dict:
    """cuDNN / cuBLAS forward, input gradient and weight gradient, each alone."""
    if shape.kind == "conv":
        geo = dict(stride=[shape.stride] * 2, padding=[shape.padding] * 2, dilation=[1, 1], transposed=False,
                   output_padding=[0, 0], groups=1)

        def grad(mask):
            return lambda: torch.ops.aten.convolution_backward(dy, x, w, None, output_mask=mask, **geo)
        return {"forward": lambda: F.conv2d(x, w, stride=shape.stride, padding=shape.padding),
                "grad_input": grad([True, False, False]), "grad_weight": grad([False, True, False])}
    return {"forward": lambda: F.linear(x, w), "grad_input": lambda: dy @ w, "grad_weight": lambda: dy.t() @ x}


def _profile(step, device: torch.device, steps: int, top: int = 12) -> list[dict]:
    """torch.profiler over ``steps`` calls of step(): top events by device time (CPU: by CPU time), with
    calls and per-call self device time, host (CPU) total and self time in microseconds."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            step()
        if device.type == "cuda":
            torch.cuda.synchronize()
    rows = []
    for e in prof.key_averages():
        device_us = getattr(e, "self_device_time_total", getattr(e, "self_cuda_time_total", 0))
        rows.append({"name": e.key, "calls": e.count, "self_device_us_per_call": device_us / max(e.count, 1),
                     "host_us_per_call": e.cpu_time_total / max(e.count, 1),
                     "self_host_us_per_call": e.self_cpu_time_total / max(e.count, 1),
                     "self_device_us_total": device_us})
    by = "self_device_us_total" if device.type == "cuda" else "self_host_us_per_call"
    rows.sort(key=lambda r: -r[by])
    ops = [r for r in rows if r["name"].startswith("blockdpr_kernels::")]
    return rows[:top] + [r for r in ops if r not in rows[:top]]


def measure_case(layer_id: str, sparsity: float, block: int, batch: int, dtype: str, device: torch.device,
                 timer: dict, calls: int = 10, seed: int = 0) -> dict:
    """Every number of one case; ``status`` "failed" (with ``error``) when the op is wrong or crashes.

    timer: keyword arguments of bench.timing.time_ms; calls: fwd+bwd steps profiled and host-timed."""
    shape = by_id(layer_id)
    row = dict(layer=layer_id, shape=shape.describe(), batch=batch, sparsity=sparsity, block=block, dtype=dtype)
    x, w, values, layout = _inputs(shape, batch, sparsity, block, DTYPES[dtype], device, seed)
    row.update(nnz=layout.nnz)
    backend = "triton" if device.type == "cuda" or _interpreting() else "reference"
    geometry = dict(stride=shape.stride, padding=shape.padding)
    if shape.kind == "conv":
        def forward():
            return block_sparse_conv2d(x, values, layout, kernel_size=shape.k, backend=backend, **geometry)
    else:
        def forward():
            return block_sparse_linear(x, values, layout, backend=backend)
    try:
        row.update(check_case(shape.kind, forward, x, values, layout, geometry, True, seed))
    except Exception as e:  # noqa: BLE001 - a crashing op is a failed case
        row.update(check="failed", check_message=f"{type(e).__name__}: {str(e)[:300]}")
    if row["check"] == "failed":
        return dict(row, status="failed", error=row["check_message"])
    dy = torch.randn_like(forward())

    def fwd_bwd():
        return torch.autograd.grad(forward(), (x, values), dy)

    launches = record_launches(fwd_bwd) if backend == "triton" else {}
    row["launch_ms"] = {name: stats(time_ms(lambda: fn(*a, **kw), device.type, **timer))
                        for name, (fn, a, kw) in launches.items()}
    dense_dy = dy.contiguous(memory_format=torch.channels_last) if shape.kind == "conv" else dy
    row["dense_ms"] = {name: stats(time_ms(fn, device.type, **timer))
                       for name, fn in _dense_passes(shape, x.detach(), w.detach(), dense_dy).items()}
    row["op_ms"] = stats(time_ms(fwd_bwd, device.type, **timer))
    row["op_host_ms"] = _host_ms(fwd_bwd, device, calls)
    row["configs"] = {name: [{"key": e["key"], "config": e["config"]} for e in entries]
                      for name, entries in autotune_cache.snapshot().items() if entries}
    row["profile"] = _profile(fwd_bwd, device, calls)
    return dict(row, status="ok")


def _interpreting() -> bool:
    import os
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _host_ms(fn, device: torch.device, calls: int) -> float:
    """Host time per call of fn() with no synchronisation inside the loop (launch and dispatch cost)."""
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    host = (time.perf_counter() - t0) / calls * 1e3
    if device.type == "cuda":
        torch.cuda.synchronize()
    return host


def _ms(d: dict | None, key: str) -> str:
    return f"{d[key]['median_ms']:.3f}" if d and key in d else "-"


def markdown(result: dict) -> str:
    """The breakdown as markdown: a row per case, then the top kernels of each case's profile."""
    lines = []
    if result["timings_meaningless"]:
        lines += ["**SMOKE MODE (CPU): these timings mean nothing.**", ""]
    lines += ["| case | check | fwd launch | dgrad launch | wgrad launch | dense fwd | dense dgrad | dense wgrad | "
              "op fwd+bwd | op host |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for r in result["rows"]:
        case = f"{r['shape']} b{r['batch']} {r['dtype']} s{r['sparsity']} block {r['block']}"
        if r["status"] != "ok":
            lines.append(f"| {case} | FAILED: {r['error'][:120]} |" + " - |" * 8)
            continue
        launch, dense = r["launch_ms"], r["dense_ms"]
        lines.append(f"| {case} | ok | " + " | ".join(_ms(launch, k) for k in LAUNCHERS) + " | "
                     + " | ".join(_ms(dense, k) for k in LAUNCHERS)
                     + f" | {r['op_ms']['median_ms']:.3f} | {r['op_host_ms']:.3f} |")
    lines += ["", "Times in ms (median). Top events of torch.profiler per case (us per call):", ""]
    for r in result["rows"]:
        if r["status"] != "ok":
            continue
        lines += [f"`{r['shape']}` block {r['block']}:", "", "| event | calls | device us | host us |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| `{p['name'][:70]}` | {p['calls']} | {p['self_device_us_per_call']:.1f} | "
                  f"{p['host_us_per_call']:.1f} |" for p in r["profile"]]
        lines.append("")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="folder for breakdown.json / breakdown.md")
    parser.add_argument("--smoke", action="store_true", help="tiny cases (forced without a GPU)")
    parser.add_argument("--dtype", choices=list(DTYPES), default=None, help="operand dtype (default: bf16; with --smoke fp32)")
    add_list_argument(parser, "--blocks", type=int, default=None, help="only these block sizes (default: every case)")
    parser.add_argument("--warmup-ms", type=float, default=25, help="do_bench warm-up per timing")
    parser.add_argument("--rep-ms", type=float, default=50, help="do_bench timed duration per timing")
    parser.add_argument("--autotune-cache", type=Path, default=autotune_cache.DEFAULT_DIR,
                        metavar="DIR", help="folder of tuned configs per GPU (loaded before, saved after; CUDA only) (default: bench/results/autotune)")
    args = parser.parse_args(argv)
    cuda = torch.cuda.is_available()
    smoke = args.smoke or not cuda
    device = torch.device("cuda" if cuda else "cpu")
    dtype = args.dtype or ("fp32" if smoke else "bf16")
    cases = [c for c in (SMOKE_CASES if smoke else CASES) if not args.blocks or c[2] in args.blocks]
    result = {"smoke": smoke, "timings_meaningless": smoke or not cuda, "provenance": provenance(device),
              "rows": []}
    tuned = autotune_cache.path_for(torch.cuda.get_device_name(), args.autotune_cache) if cuda else None
    if tuned:
        result["autotune_cache"] = autotune_cache.load(tuned)
    timer = dict(warmup_ms=args.warmup_ms, rep_ms=args.rep_ms, cpu_reps=1 if smoke else 3)
    if smoke:
        print("SMOKE MODE: tiny cases" + ("" if cuda else " on the CPU") + "; these timings mean nothing")
    for layer_id, sparsity, block, batch in cases:
        row = measure_case(layer_id, sparsity, block, batch, dtype, device, timer, 2 if smoke else 10)
        result["rows"].append(row)
        print(f"{layer_id} block {block} s{sparsity}: {row['status']}"
              + (f", op fwd+bwd {row['op_ms']['median_ms']:.3f} ms" if row["status"] == "ok" else f": {row['error']}"))
        atomic_write_json(args.out / "breakdown.json", result)
    if tuned:
        autotune_cache.save(tuned, torch.cuda.get_device_name())
    atomic_write_text(args.out / "breakdown.md", markdown(result))
    print(f"wrote {args.out / 'breakdown.json'}, {args.out / 'breakdown.md'}")
    return result


if __name__ == "__main__":
    main()
