"""GPU readiness without a GPU: compile every Triton kernel ahead of time for Hopper and Ampere,
report registers, spills, shared memory and tensor-core use, plus the roofline table.

    python -m bench.aot                    # full matrix: kernels x configs x dtypes x blocks x sm_90/sm_80
    python -m bench.aot --quick            # one block size per variant (32), all configs
    python -m bench.aot --rows problems    # list only rows with errors, spills, smem overflow, no MMA
    python -m bench.aot --skip-compile     # roofline only (no triton needed)
    python -m bench.aot --extra-config BLOCK_M=512,num_warps=4,num_stages=4   # try a config of your own

Part 1 (compile). Every kernel of ``blockdpr_kernels`` x every autotune config it
can pick x dtype (bf16, fp16, fp32 as TF32) x supported block size x variant (linear: the 1x1
conv over M pixels with unit spatial size, as matmul.py launches it; conv3x3: stride 1 pad 1)
is compiled with ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90|80, 32))`` -- no
GPU and no CUDA driver needed; ptxas and cuobjdump come with the triton wheel. For each cubin:
registers per thread, spill bytes (cuobjdump STACK + LOCAL, with the STL / LDL instruction
counts of the SASS), shared memory (static + Triton's dynamic), whether the SASS has tensor-core
MMA instructions (HGMMA = wgmma on sm_90, HMMA = mma.sync), estimated CTAs per SM, and compile
errors. Integer arguments are specialised as the runtime does (== 1 -> constant, multiples of 16
-> divisibility hint), from the representative geometry in VARIANTS.

Compiles run in worker subprocesses with ``TRITON_INTERPRET`` removed from their environment, so
this works from a pytest session that runs the kernels under the interpreter (which also swaps
the autotune config list for a single small one at import). Results are cached per (source of
blockdpr_kernels/*.py, triton version, job) under ``$BLOCKDPR_AOT_CACHE`` (default
``~/.cache/blockdpr/aot``); Triton's own cache keeps the cubins.

Part 2 (roofline). The model of :mod:`bench.roofline` over the benchmark layers of
:mod:`bench.shapes`, per density and block: each op's predicted time and the speedup ceiling.

The one table to update when a kernel changes is KERNELS (with VARIANTS / DTYPES next to it).
The compile workers are ``python -m bench.aot_worker`` processes.
"""
from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # `python bench/aot.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.aot_compile import compile_jobs, enumerate_kernels, nvidia_tool, source_hash
from bench.aot_jobs import (DEFAULT_DTYPES, DTYPES, KERNELS, REPRESENTATIVE_BLOCK, TARGETS, VARIANTS, build_jobs,
                            parse_config)
from bench.roofline import DEVICES, ELEMENT_BYTES, print_roofline, roofline_report
from blockdpr.cli import RawHelpFormatter, add_list_argument, escape
from blockdpr.runinfo import atomic_write_text, provenance

RESULTS_DIR = Path(__file__).resolve().parent / "results"


# ============================================================================ summary
def summarize(rows: list[dict]) -> list[dict]:
    """Per (kernel, variant, target): compiled / errors / spills / smem / MMA instructions per dtype."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["kernel"], r["variant"], r["target"]), []).append(r)
    out = []
    for (kernel, variant, target), rs in groups.items():
        good = [r for r in rs if not r.get("error")]
        mma = {}
        for dt in [d for d in DTYPES if any(r["dtype"] == d for r in rs)]:
            names = sorted({op for r in good if r["dtype"] == dt for op in r["mma"]})
            no_tc = sum(1 for r in good if r["dtype"] == dt and not r["uses_tc"])
            mma[dt] = ("+".join(names) or "none") + (f" ({no_tc} without)" if no_tc and names else "")
        out.append(dict(
            kernel=kernel, variant=variant, target=TARGETS[target]["name"], compiled=len(good), total=len(rs),
            errors=len(rs) - len(good),
            spilling=sorted({f"{r['dtype']} b{r['block'][0]} {r['config_label']}" for r in good if r["spills"]}),
            max_spill_bytes=max((r["spill_bytes"] for r in good), default=0),
            max_regs=max((r["regs"] for r in good), default=None),
            max_smem=max((r["smem"] for r in good), default=None),
            smem_overflow=sorted({f"{r['dtype']} b{r['block'][0]} {r['config_label']}" for r in good
                                  if not r["fits_smem"]}),
            duplicates=sum(1 for r in good if r.get("same_as")), mma=mma, hot_loop=_loop_summary(good)))
    return out


def _loop_summary(rows: list[dict]) -> dict:
    """Per dtype: the hot loop's instructions per iteration over the configs (min / max, and per MMA
    instruction at the largest tile), its load kinds, and whether any config divides at run time."""
    out = {}
    for dt in sorted({r["dtype"] for r in rows}):
        loops = [(r["config_label"], r["loop"]) for r in rows if r["dtype"] == dt and r.get("loop")]
        if not loops:
            continue
        counts = [lp["instructions"] for _, lp in loops]
        label, biggest = max(loops, key=lambda c: (c[1]["mma"], -c[1]["instructions"]))
        out[dt] = dict(min=min(counts), max=max(counts), largest_tile=label,
                       largest_tile_instructions=biggest["instructions"], largest_tile_mma=biggest["mma"],
                       loads=sorted({kind for _, lp in loops for kind in lp["loads"]}),
                       division=any(lp["division"] for _, lp in loops))
    return out


# ============================================================================ output
def _meta(argv) -> dict:
    """Provenance (blockdpr.runinfo) plus the ptxas version and the kernels' source hash."""
    try:
        ptxas = subprocess.run([nvidia_tool("ptxas"), "--version"], capture_output=True, text=True, timeout=30).stdout
        ptxas_version = (re.findall(r"release ([\d.]+)", ptxas) or [None])[0]
    except (OSError, subprocess.SubprocessError):
        ptxas_version = None
    meta = provenance("cpu", None if argv is None else ["-m", "bench.aot", *argv])
    meta["versions"]["ptxas"] = ptxas_version
    meta["kernels_source_hash"] = source_hash()
    return meta


def _kb(n) -> str:
    return "-" if n is None else f"{n / 1024:.1f}"


def print_compile(console, rows: list[dict], summary: list[dict], which: str = "all") -> None:
    from rich.table import Table
    if which != "none":
        shown = rows if which == "all" else [r for r in rows if r.get("error") or not r["ok"]]
        t = Table(title=f"AOT compile ({len(shown)} of {len(rows)} rows)", show_lines=False)
        for col in ("kernel", "dtype", "block", "config", "target", "regs", "spill B (STL/LDL)",
                    "smem KB", "tensor cores", "CTAs/SM", "notes / error"):
            t.add_column(col, justify="right" if col in ("regs", "smem KB", "CTAs/SM", "block") else "left")
        for r in shown:
            name = f"{r['variant']}.{r['kernel']}"
            if r.get("error"):
                t.add_row(name, r["dtype"], str(r["block"][0]), r["config_label"], r["target_name"],
                          "-", "-", "-", "-", "-", f"[red]{escape(r.get('error_summary') or r['error'][:200])}[/red]")
                continue
            spill = f"{r['spill_bytes']} ({r['stl']}/{r['ldl']})"
            spill = f"[red]{spill}[/red]" if r["spills"] else spill
            smem = _kb(r["smem"]) if r["fits_smem"] else f"[red]{_kb(r['smem'])} > {_kb(r['smem_limit'])}[/red]"
            mma = " ".join(f"{k}x{v}" for k, v in r["mma"].items()) or "none"
            if not r["uses_tc"] and r["dtype"] in ("bf16", "fp16"):
                mma = f"[red]{mma}[/red]"
            elif not r["expected_mma"]:
                mma = f"[yellow]{mma}[/yellow]"
            notes = []
            if r.get("same_as"):
                notes.append(f"same cubin as {r['same_as']}")
            if r["config_index"] is None:
                notes.append("extra config")
            t.add_row(name, r["dtype"], str(r["block"][0]), r["config_label"], r["target_name"], str(r["regs"]),
                      spill, smem, mma, str(r["ctas_per_sm"]), "; ".join(notes))
        console.print(t)
    s = Table(title="AOT compile summary (per kernel and target)")
    dtypes = [d for d in DTYPES if any(d in g["mma"] for g in summary)]
    for col in ("kernel", "target", "compiled", "errors", "max regs", "spilling configs", "max smem KB",
                "over smem", *(f"MMA {d}" for d in dtypes), "loop instr. (bf16)", "dup cubins"):
        s.add_column(col)
    for g in summary:
        s.add_row(f"{g['variant']}.{g['kernel']}", g["target"], f"{g['compiled']}/{g['total']}",
                  _red(g["errors"]), str(g["max_regs"]),
                  _red(len(g["spilling"])) + (f" (max {g['max_spill_bytes']} B)" if g["spilling"] else ""),
                  _kb(g["max_smem"]), _red(len(g["smem_overflow"])), *(g["mma"].get(d, "-") for d in dtypes),
                  _loop_cell(g["hot_loop"].get("bf16")), str(g["duplicates"]))
    console.print(s)


def _loop_cell(loop: dict | None) -> str:
    """``min-max; 92 for 4 MMA at BM128 w4 s2; LDG+LDGSTS; runtime division`` for the summary table."""
    if not loop:
        return "-"
    cell = (f"{loop['min']}-{loop['max']}; {loop['largest_tile_instructions']} for {loop['largest_tile_mma']} MMA "
            f"at {loop['largest_tile']}; {'+'.join(loop['loads'])}")
    return cell + ("; [red]runtime division[/red]" if loop["division"] else "")


def _red(n: int) -> str:
    return f"[red]{n}[/red]" if n else str(n)


# ============================================================================ command line
def run_compile(kernels=None, variants=None, dtypes=DEFAULT_DTYPES, blocks=None, targets=tuple(TARGETS),
                configs="all", extra_configs=(), workers=2, use_cache=True, progress=None) -> dict:
    """Enumerate, build the job matrix, compile; returns dict(rows, summary, unlisted, kernel_errors)."""
    info = enumerate_kernels(use_cache)
    jobs = build_jobs(info, kernels, variants, dtypes, blocks, targets, configs, extra_configs)
    rows = compile_jobs(jobs, info, workers, use_cache, progress)
    kernel_errors = {k: v["error"] for k, v in info["kernels"].items() if "error" in v}
    good = [r for r in rows if not r.get("error")]
    totals = dict(jobs=len(rows), compiled=len(good), errors=len(rows) - len(good),
                  spilling=sum(1 for r in good if r["spills"]), over_smem=sum(1 for r in good if not r["fits_smem"]),
                  half_without_tc=sum(1 for r in good if r["dtype"] in ("bf16", "fp16") and not r["uses_tc"]),
                  cached=sum(1 for r in rows if r.get("cached")))
    return dict(rows=rows, summary=summarize(rows), totals=totals, unlisted=info["unlisted"], kernel_errors=kernel_errors,
                kernels={k: {kk: v.get(kk) for kk in ("obj", "fn_name", "arg_names", "constexprs", "configs")}
                         for k, v in info["kernels"].items()})


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    add_list_argument(parser, "--kernels", choices=list(KERNELS), default=None, help="kernels to compile (default: every kernel)")
    add_list_argument(parser, "--variants", choices=list(VARIANTS), default=None, help="kernel variants to compile (default: every variant)")
    add_list_argument(parser, "--dtypes", choices=list(DTYPES), default=list(DEFAULT_DTYPES),
                      help="dtypes to compile; fp32 = TF32 tensor cores, fp32-ieee = CUDA cores (as torch's default for linear)")
    add_list_argument(parser, "--blocks", type=int, default=None, help="block sizes to compile (default: every supported block size)")
    add_list_argument(parser, "--targets", type=int, choices=list(TARGETS), default=list(TARGETS),
                      help="CUDA compute capabilities to compile for (90 = sm_90, H100 / H200; 80 = sm_80, A100)")
    parser.add_argument("--configs", default="all", help="all | first | comma-separated autotune indices")
    parser.add_argument("--extra-config", action="append", default=[], type=parse_config, metavar="K=V,...",
                        help="an extra config to try, e.g. BLOCK_M=512,num_warps=4,num_stages=4 (repeatable; default: none)")
    parser.add_argument("--quick", action="store_true", help=f"block {REPRESENTATIVE_BLOCK} only")
    parser.add_argument("--workers", type=int, default=2, help="compile worker processes")
    parser.add_argument("--no-cache", action="store_true", help="recompile everything (results cache off)")
    parser.add_argument("--rows", choices=("all", "problems", "none"), default="all",
                        help="compile rows to print (the summary is always printed)")
    parser.add_argument("--skip-compile", action="store_true", help="no compilation: only the roofline part")
    parser.add_argument("--skip-roofline", action="store_true", help="no roofline part: only the compilation")
    add_list_argument(parser, "--densities", type=float, default=[0.2, 0.1], help="fraction of blocks kept")
    add_list_argument(parser, "--roofline-blocks", type=int, default=[16, 32, 64], help="block sizes of the roofline part")
    parser.add_argument("--device", choices=list(DEVICES), default="h100-sxm", help="GPU the roofline models")
    parser.add_argument("--roofline-dtype", choices=list(ELEMENT_BYTES), default="bf16", help="operand dtype of the roofline")
    parser.add_argument("--batch", type=int, default=256, help="batch of the conv layers of the roofline")
    parser.add_argument("--linear-m", type=int, default=8192, help="rows (tokens) of the square linears")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "aot.json", metavar="PATH",
                        help="where the report is written (default: bench/results/aot.json)")
    args = parser.parse_args(argv)

    from rich.console import Console
    console = Console()
    if not console.is_terminal:
        console = Console(width=220)
    result: dict[str, Any] = dict(meta=_meta(argv))
    if not args.skip_compile:
        configs = args.configs if args.configs in ("all", "first") else [int(i) for i in args.configs.split(",")]
        blocks = [REPRESENTATIVE_BLOCK] if args.quick and not args.blocks else args.blocks
        t0 = time.time()
        last = [0.0]

        def progress(done, total):
            if time.time() - last[0] > 10 or done == total:
                last[0] = time.time()
                console.print(f"[dim]compiled {done}/{total} ({time.time() - t0:.0f} s)[/dim]")

        comp = run_compile(args.kernels, args.variants, args.dtypes, blocks, args.targets, configs,
                           args.extra_config, args.workers, not args.no_cache, progress)
        comp["seconds"] = round(time.time() - t0, 1)
        print_compile(console, comp["rows"], comp["summary"], args.rows)
        tot = comp["totals"]
        console.print(f"{tot['compiled']}/{tot['jobs']} compiled ({tot['cached']} from cache) in {comp['seconds']} s; "
                      f"errors {tot['errors']}, spilling {tot['spilling']}, over shared memory {tot['over_smem']}, "
                      f"bf16/fp16 without tensor cores {tot['half_without_tc']}")
        for name in comp["unlisted"]:
            console.print(f"[red]kernel {escape(name)} is not in the KERNELS table of bench/aot_jobs.py: not compiled[/red]")
        for name, err in comp["kernel_errors"].items():
            console.print(f"[red]kernel {escape(name)}: {escape(err)}[/red]")
        result["compile"] = comp
    if not args.skip_roofline:
        report = roofline_report(args.densities, args.roofline_blocks, args.roofline_dtype, args.device,
                                 args.batch, args.linear_m)
        print_roofline(console, report)
        result["roofline"] = report
    if args.json:
        atomic_write_text(args.json, json.dumps(result, default=str, separators=(",", ":")))
        console.print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
