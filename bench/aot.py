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
import hashlib
import json
import math
import os
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

if __package__ in (None, ""):  # `python bench/aot.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.roofline import DEVICES, ELEMENT_BYTES, print_roofline, roofline_report
from blockdpr.cli import RawHelpFormatter, add_list_argument, escape
from blockdpr.runinfo import atomic_write_text, provenance

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "blockdpr_kernels"
RESULTS_DIR = ROOT / "bench" / "results"
PACKAGE = "blockdpr_kernels"

# ============================================================================ the table to update
# Per kernel: where it lives (module attribute of blockdpr_kernels), its pointer arguments and the
# element type each points to ("T" = the activation dtype, else a triton type name), and any
# constexpr values of its own. Every other argument is found by name in VARIANTS (ints and
# geometry constexprs), DTYPES (precision constexprs), the block (BN, BK) or the autotune config.
# Arg names, which of them are constexpr, and the config list are read from the kernel objects.
KERNELS: dict[str, dict[str, Any]] = {
    "fwd": dict(obj="conv._fwd_kernel",
                pointers=dict(x_ptr="T", v_ptr="T", row_ptr="i32", col_idx="i32", bias_ptr="T", y_ptr="T"),
                constexprs=dict(HAS_BIAS=True)),
    "dgrad": dict(obj="conv._dgrad_kernel",
                  pointers=dict(dy_ptr="T", v_ptr="T", col_ptr="i32", col_row_idx="i32", col_perm="i32", dx_ptr="T"),
                  constexprs={}),
    "wgrad": dict(obj="conv._wgrad_kernel",
                  pointers=dict(x_ptr="T", dy_ptr="T", groups="i32", row_idx="i32", col_idx="i32",
                                dv_ptr="T", ws_ptr="fp32", count_ptr="i32"),
                  constexprs={}),
}
# The density bucket is an autotune-key int the kernels do not specialise on (do_not_specialize):
# any value that is neither 1 nor a multiple of 16 compiles it as the runtime does, a plain i32.
DENSITY_BUCKET = 3
# How the kernels are launched: geometry ints (specialised like the runtime: 1 -> constexpr) and
# constexprs; block sizes from blockdpr_kernels.ops.<blocks>; block constexpr names (rows, cols).
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": dict(blocks="LINEAR_BLOCKS", block_args=("BN", "BK"),
                   ints=dict(M=8192, H=1, W=1, P=1, Q=1, C_IN=4096, C_OUT=4096, DENSITY=DENSITY_BUCKET),
                   constexprs=dict(R=1, S=1, STRIDE=1, PAD=0)),
    "conv3x3": dict(blocks="CONV_BLOCKS", block_args=("BN", "BK"),
                    ints=dict(M=256 * 8 * 8, H=8, W=8, P=8, Q=8, C_IN=640, C_OUT=640, DENSITY=DENSITY_BUCKET),
                    constexprs=dict(R=3, S=3, STRIDE=1, PAD=1)),
}
# dtype -> triton element type of "T" pointers and constexprs (fp32 runs as TF32 on tensor cores).
DTYPES: dict[str, dict[str, Any]] = {
    "bf16": dict(ptr="bf16", constexprs=dict(PRECISION="ieee")),
    "fp16": dict(ptr="fp16", constexprs=dict(PRECISION="ieee")),
    "fp32": dict(ptr="fp32", constexprs=dict(PRECISION="tf32")),
    "fp32-ieee": dict(ptr="fp32", constexprs=dict(PRECISION="ieee")),  # CUDA cores; not in the default matrix
}
DEFAULT_DTYPES = ("bf16", "fp16", "fp32")
# Targets: shared memory per block (opt-in max) and per SM, registers per SM, max warps per SM,
# the MMA instruction expected (wgmma -> HGMMA on Hopper, mma.sync -> HMMA on Ampere).
TARGETS: dict[int, dict[str, Any]] = {
    90: dict(name="sm_90", gpus="H100/H200", smem_block=227 * 1024, smem_sm=228 * 1024,
             regs_sm=65536, warps_sm=64, ctas_sm=32, mma="HGMMA"),
    80: dict(name="sm_80", gpus="A100", smem_block=163 * 1024, smem_sm=164 * 1024,
             regs_sm=65536, warps_sm=64, ctas_sm=32, mma="HMMA"),
}
TC_INSTRUCTIONS = ("HGMMA", "HMMA", "IMMA", "QGMMA", "IGMMA", "UTCHMMA", "UTCQMMA")
REPRESENTATIVE_BLOCK = 32
ANALYSIS_VERSION = 1  # bump when the worker's per-cubin analysis changes (invalidates cached rows)


# ============================================================================ compile matrix
def source_hash() -> str:
    """Hash of every kernels/*.py: results cached under it are invalidated by any kernel edit."""
    h = hashlib.sha256()
    for p in sorted(KERNEL_DIR.glob("*.py")):
        h.update(p.name.encode() + b"\0" + p.read_bytes())
    return h.hexdigest()[:24]


def cache_dir() -> Path:
    return Path(os.environ.get("BLOCKDPR_AOT_CACHE", Path.home() / ".cache" / "blockdpr" / "aot"))


def _triton_version() -> str:
    try:
        from importlib.metadata import version
        return version("triton")
    except Exception:  # noqa: BLE001
        return "unknown"


def _abbrev(key: str) -> str:
    """BLOCK_M -> BM, BLOCK_SIZE_N -> BSN, GROUP -> GROUP."""
    parts = key.split("_")
    return "".join(p[0] for p in parts) if len(parts) > 1 else key


def config_label(cfg: dict) -> str:
    kw = " ".join(f"{_abbrev(k)}{v}" for k, v in cfg["kwargs"].items())
    extra = "".join(f" {k}={cfg[k]}" for k in ("num_ctas", "maxnreg") if cfg.get(k) not in (None, 1))
    return f"{kw} w{cfg['num_warps']} s{cfg['num_stages']}{extra}"


def parse_config(text: str) -> dict:
    """``BLOCK_M=512,num_warps=4,num_stages=4`` -> a config dict (unknown keys are kernel kwargs)."""
    cfg = dict(kwargs={}, num_warps=4, num_stages=3, num_ctas=1, maxnreg=None)
    for item in filter(None, text.split(",")):
        key, _, val = item.partition("=")
        val = int(val) if val.lstrip("-").isdigit() else val
        (cfg if key in ("num_warps", "num_stages", "num_ctas", "maxnreg") else cfg["kwargs"])[key.strip()] = val
    return cfg



def _specialize_int(value: int) -> tuple[str, bool]:
    """(triton type, divisible by 16) as the launcher specialises an int argument; 'constexpr' for 1."""
    if value == 1:
        return "constexpr", False
    ty = "i32" if -2**31 <= value < 2**31 else "i64"
    return ty, value % 16 == 0


def build_signature(job: dict, arg_names: list[str], constexpr_names: list[str]):
    """(signature, constexprs, attrs) for ASTSource, or raises ValueError naming what is missing."""
    spec, variant, dt = KERNELS[job["kernel"]], VARIANTS[job["variant"]], DTYPES[job["dtype"]]
    values = dict(variant["constexprs"])
    values.update(dt["constexprs"])
    values.update(zip(variant["block_args"], job["block"]))
    values.update(spec["constexprs"])
    values.update(job["config"]["kwargs"])
    signature, constexprs, attrs = {}, {}, {}
    for i, name in enumerate(arg_names):
        if name in constexpr_names:
            if name not in values:
                raise ValueError(f"no value for constexpr {name!r}: add it to KERNELS / VARIANTS / DTYPES")
            signature[name], constexprs[name] = "constexpr", values[name]
        elif name in spec["pointers"]:
            elem = spec["pointers"][name]
            signature[name] = "*" + (dt["ptr"] if elem == "T" else elem)
            attrs[(i,)] = [["tt.divisibility", 16]]  # torch allocations are 16-byte aligned
        elif name in variant["ints"]:
            ty, div16 = _specialize_int(variant["ints"][name])
            signature[name] = ty
            if ty == "constexpr":
                constexprs[name] = variant["ints"][name]
            elif div16:
                attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            raise ValueError(f"unknown argument {name!r}: add it to KERNELS[{job['kernel']!r}]['pointers'] "
                             f"or VARIANTS[{job['variant']!r}]['ints']")
    return signature, constexprs, attrs


def nvidia_tool(name: str) -> str:
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


# ---------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, log):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton's warning
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, "-m", "bench.aot_worker"],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log, text=True,
                                     bufsize=1, env=env, cwd=str(ROOT))

    def ask(self, req: dict, timeout: float | None = None) -> dict:
        """Send one request, wait for its answer; the worker is killed after ``timeout`` seconds."""
        watchdog = threading.Timer(timeout, self.proc.kill) if timeout else None
        if watchdog:
            watchdog.start()
        try:
            self.proc.stdin.write(json.dumps(req) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (BrokenPipeError, OSError):
            line = ""
        finally:
            if watchdog:
                watchdog.cancel()
        if not line:
            code = self.proc.wait()
            raise RuntimeError(f"timed out after {timeout:.0f} s" if code == -9 and timeout
                               else f"worker exited with code {code}")
        return json.loads(line)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)
        except Exception:  # noqa: BLE001
            self.proc.kill()


def _cache_path(key_obj: dict) -> Path:
    key = hashlib.sha256(json.dumps(key_obj, sort_keys=True).encode()).hexdigest()[:32]
    return cache_dir() / key[:2] / f"{key}.json"


def _cache_get(key_obj: dict, use_cache: bool):
    if not use_cache:
        return None
    p = _cache_path(key_obj)
    try:
        return json.loads(p.read_text())
    except (OSError, ValueError):
        return None


def _cache_put(key_obj: dict, value) -> None:
    p = _cache_path(key_obj)
    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(value))
    tmp.replace(p)


def enumerate_kernels(use_cache: bool = True) -> dict:
    """Kernel args / constexprs / autotune configs, read from the kernel objects in a worker process."""
    key = dict(kind="enumerate", src=source_hash(), triton=_triton_version(), table=repr((KERNELS, VARIANTS)))
    info = _cache_get(key, use_cache)
    if info is None:
        with tempfile.TemporaryFile("w+") as log:
            w = _Worker(log)
            try:
                info = w.ask(dict(op="enumerate"))
            except RuntimeError as e:
                log.seek(0)
                raise RuntimeError(f"{e}\n{log.read()[-4000:]}") from None
            finally:
                w.close()
        _cache_put(key, info)
    return info


def build_jobs(info: dict, kernels: Iterable[str] | None = None, variants: Iterable[str] | None = None,
               dtypes: Iterable[str] = DEFAULT_DTYPES, blocks: Iterable[int] | None = None,
               targets: Iterable[int] = tuple(TARGETS), configs: str | Iterable[int] = "all",
               extra_configs: Iterable[dict] = ()) -> list[dict]:
    """The compile jobs: kernel x variant x dtype x (square) block x config x target.

    blocks: None = every block size the variant supports (ops.LINEAR_BLOCKS / CONV_BLOCKS), else the
    given ones that it supports. configs: "all", "first" or indices into the autotune list, taken among the
    configs that the kernel's ``early_config_prune`` keeps for each dtype / block / target (the autotuner
    never runs the others). extra_configs: configs of your own (e.g. deliberately bad), never pruned,
    marked config_index=None.
    """
    jobs = []
    for kname in kernels or KERNELS:
        k = info["kernels"][kname]
        if "error" in k:
            continue
        every = list(enumerate(k["configs"])) + [(None, c) for c in extra_configs]

        def chosen(key: str) -> set:
            """Indices to compile: among the pickable configs (kernel's pruning), "first" / "all" / given."""
            pick = [i for i, _ in every if i is not None and (not k.get("pickable") or i in k["pickable"][key])]
            return set(pick[:1] if configs == "first" else pick if configs == "all" else
                       [i for i in pick if i in configs]) | {None}

        for variant in variants or VARIANTS:
            supported = info["blocks"].get(variant) or [REPRESENTATIVE_BLOCK]
            for block in [b for b in (blocks or supported) if b in supported]:
                for dtype in dtypes:
                    keep = {t: chosen(f"{dtype}/{block}/{t}") for t in targets}
                    for idx, cfg in every:
                        for target in targets:
                            if idx in keep[target]:
                                jobs.append(dict(kernel=kname, variant=variant, dtype=dtype, block=[block, block],
                                                 config=cfg, config_index=idx, target=int(target)))
    return jobs


def _finish(row: dict) -> dict:
    """Derived columns: spills, total shared memory and its limit, tensor-core use, CTAs per SM."""
    t = TARGETS[row["target"]]
    row["target_name"], row["config_label"] = t["name"], config_label(row["config"])
    if row.get("error"):
        row.update(ok=False, spill_bytes=None, smem=None, fits_smem=None, uses_tc=None, ctas_per_sm=None)
        return row
    row["spill_bytes"] = row["stack"] + row["local"]
    row["spills"] = row["spill_bytes"] > 0 or row["stl"] > 0
    row["smem"] = row["static_smem"] + row["dynamic_smem"]
    row["smem_limit"] = t["smem_block"]
    row["fits_smem"] = row["smem"] <= t["smem_block"]
    row["uses_tc"] = bool(row["mma"])
    row["expected_mma"] = t["mma"] in row["mma"]
    warps = row["config"]["num_warps"]
    regs_per_warp = math.ceil(max(row["regs"] or 1, 1) * 32 / 256) * 256
    by_regs = (t["regs_sm"] // regs_per_warp) // warps
    by_smem = t["smem_sm"] // (row["smem"] + 1024) if row["smem"] else t["ctas_sm"]
    row["ctas_per_sm"] = max(0, min(by_regs, by_smem, t["warps_sm"] // warps, t["ctas_sm"])) if row["fits_smem"] else 0
    row["ok"] = not row["spills"] and row["fits_smem"] and (row["uses_tc"] or row["dtype"] not in ("bf16", "fp16"))
    return row


def compile_jobs(jobs: list[dict], info: dict, workers: int = 2, use_cache: bool = True, progress=None,
                 job_timeout: float = 600.0) -> list[dict]:
    """Compile every job (cached results first, the rest in ``workers`` subprocesses); rows in job order.

    A compile that crashes its process or takes longer than ``job_timeout`` seconds becomes an error row.
    """
    src, tv = source_hash(), _triton_version()
    keys = [dict(kind="compile", src=src, triton=tv, job=j, analysis=ANALYSIS_VERSION,
                 table=repr((KERNELS[j["kernel"]], VARIANTS[j["variant"]], DTYPES[j["dtype"]]))) for j in jobs]
    rows: list[dict | None] = [None] * len(jobs)
    todo = queue.Queue()
    for i, key in enumerate(keys):
        hit = _cache_get(key, use_cache)
        if hit is not None:
            rows[i] = dict(hit, cached=True)
        else:
            todo.put(i)
    if progress:
        progress(sum(r is not None for r in rows), len(jobs))
    lock = threading.Lock()
    state = dict(fatal=None)

    def log_tail(log) -> str:
        log.flush()
        return Path(log.name).read_text(errors="replace")[-3000:]

    def run(log):
        worker, deaths = None, 0
        while True:
            try:
                i = todo.get_nowait()
            except queue.Empty:
                break
            job = jobs[i]
            if state["fatal"]:  # workers cannot even start: do not retry for every job
                row = dict(job, error=state["fatal"], error_summary=state["fatal"].splitlines()[0], compile_s=None)
            else:
                if worker is None:
                    worker = _Worker(log)
                try:
                    row = worker.ask(dict(op="compile", job=job, kinfo=dict(kernels={job["kernel"]: info["kernels"][job["kernel"]]})),
                                     timeout=job_timeout)
                    _cache_put(keys[i], row)
                    deaths = 0
                except Exception as e:  # noqa: BLE001 -- a crashed compiler (e.g. SIGSEGV) is a row, not a crash
                    row = dict(job, error=f"compiler process died: {e}\n{log_tail(log)}",
                               error_summary=f"compiler process died: {e}", compile_s=None)
                    worker.close()
                    worker, deaths = None, deaths + 1
                    if deaths >= 3:
                        state["fatal"] = f"3 compiler processes died in a row, giving up: {e}\n{log_tail(log)}"
            row["cached"] = False
            with lock:
                rows[i] = row
                if progress:
                    progress(sum(r is not None for r in rows), len(jobs))
        if worker is not None:
            worker.close()

    if not todo.empty():
        with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
            threads = [threading.Thread(target=run, args=(log,)) for _ in range(max(1, min(workers, todo.qsize())))]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
    out = [_finish(r) for r in rows]
    _mark_duplicates(out)
    return out


def _mark_duplicates(rows: list[dict]) -> None:
    """Configs that compile to the very same cubin as an earlier config (e.g. num_stages ignored)."""
    first: dict[tuple, str] = {}
    for r in rows:
        if r.get("cubin_sha") is None:
            continue
        k = (r["kernel"], r["variant"], r["dtype"], tuple(r["block"]), r["target"], r["cubin_sha"])
        r["same_as"] = first.get(k)
        first.setdefault(k, r["config_label"])


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
            duplicates=sum(1 for r in good if r.get("same_as")), mma=mma))
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
                "over smem", *(f"MMA {d}" for d in dtypes), "dup cubins"):
        s.add_column(col)
    for g in summary:
        s.add_row(f"{g['variant']}.{g['kernel']}", g["target"], f"{g['compiled']}/{g['total']}",
                  _red(g["errors"]), str(g["max_regs"]),
                  _red(len(g["spilling"])) + (f" (max {g['max_spill_bytes']} B)" if g["spilling"] else ""),
                  _kb(g["max_smem"]), _red(len(g["smem_overflow"])), *(g["mma"].get(d, "-") for d in dtypes),
                  str(g["duplicates"]))
    console.print(s)


def _red(n: int) -> str:
    return f"[red]{n}[/red]" if n else str(n)



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
    add_list_argument(parser, "--kernels", choices=list(KERNELS), default=None, help="default: every kernel")
    add_list_argument(parser, "--variants", choices=list(VARIANTS), default=None, help="default: every variant")
    add_list_argument(parser, "--dtypes", choices=list(DTYPES), default=list(DEFAULT_DTYPES),
                      help="fp32 = TF32 tensor cores; fp32-ieee = CUDA cores (as torch's default for linear)")
    add_list_argument(parser, "--blocks", type=int, default=None, help="default: every supported block size")
    add_list_argument(parser, "--targets", type=int, choices=list(TARGETS), default=list(TARGETS))
    parser.add_argument("--configs", default="all", help="all | first | comma-separated autotune indices")
    parser.add_argument("--extra-config", action="append", default=[], type=parse_config, metavar="K=V,...",
                        help="an extra config to try, e.g. BLOCK_M=512,num_warps=4,num_stages=4 (repeatable)")
    parser.add_argument("--quick", action="store_true", help=f"block {REPRESENTATIVE_BLOCK} only")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--no-cache", action="store_true", help="recompile everything (results cache off)")
    parser.add_argument("--rows", choices=("all", "problems", "none"), default="all",
                        help="compile rows to print (the summary is always printed)")
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--skip-roofline", action="store_true")
    add_list_argument(parser, "--densities", type=float, default=[0.2, 0.1], help="fraction of blocks kept")
    add_list_argument(parser, "--roofline-blocks", type=int, default=[16, 32, 64])
    parser.add_argument("--device", choices=list(DEVICES), default="h100-sxm")
    parser.add_argument("--roofline-dtype", choices=list(ELEMENT_BYTES), default="bf16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--linear-m", type=int, default=8192, help="rows (tokens) of the square linears")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "aot.json")
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
            console.print(f"[red]kernel {escape(name)} is not in the KERNELS table of bench/aot.py: not compiled[/red]")
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
