"""The compile driver of bench.aot: worker subprocesses, the results cache, derived columns.

Jobs (dicts from :mod:`bench.aot_jobs`) are compiled by ``python -m bench.aot_worker`` processes,
started with ``TRITON_INTERPRET`` removed from their environment and spoken to in line-delimited
JSON. Each answer (or crash) becomes one row, cached per (source of blockdpr_kernels/*.py, triton
version, job) under ``$BLOCKDPR_AOT_CACHE`` (default ``~/.cache/blockdpr/aot``), then completed by
:func:`_finish` with the columns the report prints (spills, shared memory, tensor cores, CTAs per SM).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import queue
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

from bench.aot_jobs import DTYPES, KERNELS, TARGETS, VARIANTS, config_label

ROOT = Path(__file__).resolve().parent.parent
KERNEL_DIR = ROOT / "blockdpr_kernels"
ANALYSIS_VERSION = 2  # bump when the worker's per-cubin analysis changes (invalidates cached rows)


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


def nvidia_tool(name: str) -> str:
    """Path of one of the NVIDIA tools (ptxas, cuobjdump) that come with the triton wheel."""
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


# ---------------------------------------------------------------- worker processes and results cache
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


# ---------------------------------------------------------------- compile
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

