"""Host cost per layer call without a GPU: the block-sparse ops against torch's dense ops, in one run.

    python -m bench.host                       # writes bench/results/host.json and the table in bench/README.md
    python -m bench.host --calls 50 --repeats 3 --out /tmp/host.json --no-readme

What runs is the real Triton launch path (autotuner cache, JIT binder, compiled-kernel cache, triton's
C launcher) over a do-nothing CUDA driver: ``bench/host_libcuda.c``, compiled here with gcc into
``$BLOCKDPR_HOST_STUB`` (default ``~/.cache/blockdpr/host-stub/<source hash>/libcuda.so.1``), answers
every driver call triton makes with success and the figures of one H200 (sm_90, 132 SMs, 227 KiB of
shared memory per block), and drops the launches. A subprocess runs with ``LD_LIBRARY_PATH`` and
``TRITON_LIBCUDA_PATH`` pointed at it and ``TRITON_INTERPRET`` unset, activates triton's own
``CudaDriver`` in its torch-free mode (device, stream and capability from the driver, since CPU torch
has no CUDA), and calls the ops on CPU tensors, whose ``data_ptr()`` goes to the no-op launch. The
kernels are compiled for sm_90 on first use (ptxas ships with triton; cached in ``~/.triton``). Autotuning
cannot time anything here, so the tuner "times" every config by its position and keeps the first one
the pruner leaves: one tuning per key, as on a GPU, then cache hits.

Per case: one forward + backward (``x.grad`` / weight grad reset to None before each call, as
``zero_grad`` does) and the forward alone; ``--calls`` calls per repeat, the CPU time of the calling
thread per call in microseconds (``time.thread_time``: a machine shared with other work does not
inflate it by descheduling), the cases timed round robin, the minimum over ``--repeats`` repeats (all
kept in the JSON). glibc's mmap threshold is raised in the subprocess so that large CPU tensors come
from the heap, as a GPU caching allocator serves cached blocks. torch's dense ``F.conv2d`` / ``F.linear`` cannot run on
the do-nothing device, so its baseline runs twice: on meta tensors of the same shapes (the whole
dispatch and autograd path, no kernel, no allocation) and on tiny CPU tensors (a real CPU kernel that
costs almost nothing); see bench/README.md. Targets (issue 20): block-sparse conv and linear fwd+bwd
host time <= 1.0x torch's dense fwd+bwd host time on meta tensors, in the same run.

JSON (provenance from blockdpr.runinfo: command, git, versions; the stub driver as triton saw it; each
case; the ratios and targets) goes to ``--out`` (default bench/results/host.json), and a markdown
table generated from it between ``<!-- host-results:start -->`` and ``<!-- host-results:end -->`` of
``--readme`` (default bench/README.md).
"""
from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python bench/host.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.readme import replace_between_markers
from bench.timing import time_ms
from blockdpr.cli import RawHelpFormatter
from blockdpr.runinfo import atomic_write_json, atomic_write_text, provenance

__all__ = ["build_stub", "measure", "markdown", "main", "START", "END"]

ROOT = Path(__file__).resolve().parent.parent
STUB_SOURCE = Path(__file__).resolve().parent / "host_libcuda.c"
START, END = "<!-- host-results:start -->", "<!-- host-results:end -->"
TARGET_RATIO = 1.0
# Large CPU tensors from the heap, as a GPU's caching allocator serves its cached blocks, instead of one
# mmap / munmap pair per tensor over 32 MiB (the linear case's 64 MiB outputs: ~15 us each on this machine).
MALLOC_TUNABLES = "glibc.malloc.mmap_threshold=4294967296:glibc.malloc.trim_threshold=17179869184"
# The two layers of issue 20 (bf16, no bias); torch's baseline uses the same shapes on meta tensors.
CONV = dict(batch=256, channels=640, hw=8, kernel=3, block=32, sparsity=0.9)
LINEAR = dict(tokens=8192, features=4096, block=64, sparsity=0.9)
TINY_CONV = dict(batch=1, channels=8, hw=4, kernel=3)   # torch's baseline on CPU: almost no arithmetic
TINY_LINEAR = dict(tokens=4, features=16)


# ============================================================================ the do-nothing driver

def build_stub(cache: Path | None = None) -> Path:
    """Compile ``bench/host_libcuda.c`` to ``<dir>/libcuda.so.1`` (once per source); returns ``<dir>``.

    RuntimeError when gcc is missing or fails."""
    import triton
    gcc = shutil.which("gcc")
    if gcc is None:
        raise RuntimeError("gcc not found: bench.host compiles its do-nothing CUDA driver with gcc")
    include = Path(triton.__file__).parent / "backends" / "nvidia" / "include"
    digest = hashlib.sha256(STUB_SOURCE.read_bytes() + str(include).encode()).hexdigest()[:16]
    default = Path(os.environ.get("BLOCKDPR_HOST_STUB", Path.home() / ".cache" / "blockdpr" / "host-stub"))
    out = (cache or default) / digest
    lib = out / "libcuda.so.1"
    if not lib.exists():
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(dir=out) as tmp:
            built = Path(tmp) / "libcuda.so.1"
            done = subprocess.run([gcc, "-shared", "-fPIC", "-O2", f"-I{include}", "-o", str(built), str(STUB_SOURCE)],
                                  capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"gcc failed on {STUB_SOURCE}:\n{done.stderr}")
            os.replace(built, lib)
    return out


def _activate_stub_driver() -> dict:
    """In the subprocess: triton's CudaDriver over the stub, torch-free (CPU torch has no CUDA); the
    autotuner ranks configs by position (nothing can be timed). Returns the device as triton sees it."""
    from triton.backends.nvidia.driver import CudaDriver
    from triton.runtime import driver
    from triton.runtime.autotuner import Autotuner

    cuda = CudaDriver()
    cuda.get_device_capability = cuda._get_device_capability
    cuda.get_current_stream = cuda._get_current_stream
    cuda.get_current_device = cuda._get_current_device
    cuda.set_current_device = cuda._set_current_device
    driver.set_active(cuda)
    Autotuner._bench = lambda self, *args, config, **kwargs: [float(self.configs.index(config))] * 3

    from blockdpr_kernels import conv
    conv.CPU_LAUNCH = True  # the ops' device check: CPU tensors go to the (do-nothing) launch
    target = cuda.get_current_target()
    return {"source": str(STUB_SOURCE.relative_to(ROOT)), "target": f"{target.backend} sm_{target.arch}",
            "properties": cuda.utils.get_device_properties(0)}


# ============================================================================ measurement (subprocess)

def _layout(shape, block: int, sparsity: float, seed: int = 0):
    """Exactly round((1 - sparsity) * blocks) blocks, placed by a seeded permutation."""
    import torch
    from blockdpr_kernels import BlockLayout
    grid = (shape[0] // block, shape[1] // block)
    keep = torch.randperm(grid[0] * grid[1], generator=torch.Generator().manual_seed(seed))
    mask = torch.zeros(grid[0] * grid[1], dtype=torch.bool)
    mask[keep[:round((1 - sparsity) * mask.numel())]] = True
    return BlockLayout(mask.reshape(grid), (block, block))


def _conv(device: str, batch: int, channels: int, hw: int, kernel: int, block=None, sparsity=None):
    """``(forward, forward+backward)`` of a conv, stride 1, padding 1, no bias (WRN's convs): block-sparse
    (bf16, backend "triton") when ``block`` is given, else torch's F.conv2d (fp32)."""
    import torch
    import torch.nn.functional as F
    from blockdpr_kernels import block_sparse_conv2d
    cl, dtype = torch.channels_last, torch.bfloat16 if block else torch.float32
    x = torch.randn(batch, channels, hw, hw, dtype=dtype, device=device).contiguous(memory_format=cl).requires_grad_()
    dy = torch.randn(batch, channels, hw, hw, dtype=dtype, device=device).contiguous(memory_format=cl)
    if block:
        layout = _layout((channels, kernel * kernel * channels), block, sparsity)
        w = torch.randn(layout.nnz, block, block, dtype=dtype, requires_grad=True)
        return _closures(lambda: block_sparse_conv2d(x, w, layout, padding=1, kernel_size=kernel, backend="triton"),
                         dy, x, w)
    w = torch.randn(channels, channels, kernel, kernel, dtype=dtype, device=device, requires_grad=True)
    return _closures(lambda: F.conv2d(x, w, padding=1), dy, x, w)


def _linear(device: str, tokens: int, features: int, block=None, sparsity=None):
    """``(forward, forward+backward)`` of a square linear layer without bias, as :func:`_conv`."""
    import torch
    import torch.nn.functional as F
    from blockdpr_kernels import block_sparse_linear
    dtype = torch.bfloat16 if block else torch.float32
    x = torch.randn(tokens, features, dtype=dtype, device=device, requires_grad=True)
    dy = torch.randn(tokens, features, dtype=dtype, device=device)
    if block:
        layout = _layout((features, features), block, sparsity)
        w = torch.randn(layout.nnz, block, block, dtype=dtype, requires_grad=True)
        return _closures(lambda: block_sparse_linear(x, w, layout, backend="triton"), dy, x, w)
    w = torch.randn(features, features, dtype=dtype, device=device, requires_grad=True)
    return _closures(lambda: F.linear(x, w), dy, x, w)


def _closures(op, dy, x, w):
    def forward():
        op()

    def forward_backward():
        x.grad = w.grad = None
        op().backward(dy)
    return forward, forward_backward


def _cases() -> list[tuple[str, str, str, tuple]]:
    """``(name, op, tensors, (forward, forward+backward))`` of every case, in table order."""
    dense_conv = {k: CONV[k] for k in TINY_CONV}
    dense_linear = {k: LINEAR[k] for k in TINY_LINEAR}
    return [
        ("block_sparse_conv2d", "conv", SPARSE, _conv("cpu", **CONV)),
        ("F.conv2d", "conv", "meta", _conv("meta", **dense_conv)),
        ("F.conv2d", "conv", "cpu, tiny", _conv("cpu", **TINY_CONV)),
        ("block_sparse_linear", "linear", SPARSE, _linear("cpu", **LINEAR)),
        ("F.linear", "linear", "meta", _linear("meta", **dense_linear)),
        ("F.linear", "linear", "cpu, tiny", _linear("cpu", **TINY_LINEAR)),
    ]


SPARSE = "cpu, do-nothing launch"


def _host_us(fn, calls: int) -> float:
    """Mean microseconds of CPU time per call of ``calls`` calls (bench.timing's CPU timer on the calling
    thread's clock), gc off."""
    gc.collect()
    gc.disable()
    try:
        return sum(time_ms(fn, "cpu", cpu_reps=calls, clock=time.thread_time)) * 1e3 / calls
    finally:
        gc.enable()


def _count_tuner_runs() -> dict:
    """Count every autotuner run (the full launch path) per kernel from now on; the fast path never runs it."""
    from blockdpr_kernels.testing import kernels
    counts = dict.fromkeys(kernels(), 0)
    for name, tuner in kernels().items():
        def run(*args, _name=name, _run=tuner.run, **kwargs):
            counts[_name] += 1
            return _run(*args, **kwargs)
        tuner.run = run  # kernel[grid](...) calls self.run: the instance attribute wins
    return counts


def measure(calls: int, repeats: int) -> dict:
    """In the subprocess (stub driver on the library path): every case, and what the fast path skipped."""
    import torch
    from blockdpr_kernels.testing import launchers
    torch.set_num_threads(1)
    device = _activate_stub_driver()
    tuner_runs = _count_tuner_runs()
    rows = [dict(name=name, op=op, tensors=tensors, mode=mode, fn=fn, repeats_us=[])
            for name, op, tensors, (forward, forward_backward) in _cases()
            for mode, fn in (("fwd+bwd", forward_backward), ("fwd", forward))]
    for row in rows:
        row["fn"]()  # compiles and tunes the sparse kernels, outside the timing
    before = dict(tuner_runs)
    for _ in range(repeats):  # round robin: a change in the machine's load meets every case alike
        for row in rows:
            row["repeats_us"].append(_host_us(row["fn"], calls))
    timed_runs = sum(tuner_runs.values()) - sum(before.values())
    for row in rows:
        del row["fn"]
        row["host_us"] = min(row["repeats_us"])
    new_key = dict(CONV, batch=CONV["batch"] // 2)  # another autotune key: it tunes once, then the fast path
    forward_backward = _conv("cpu", **new_key)[1]
    runs = []
    for _ in range(2):
        before = dict(tuner_runs)
        forward_backward()
        runs.append({k: tuner_runs[k] - before[k] for k in tuner_runs})
    return {"device": device, "calls": calls, "repeats": repeats, "torch_threads": torch.get_num_threads(),
            "rows": rows, "tuner_runs_timed": timed_runs, "new_key": {"case": new_key, "tuner_runs_first_call": runs[0],
                                      "tuner_runs_second_call": runs[1]},
            "compiled_signatures": {name: len(launcher.compiled) for name, launcher in launchers().items()}}


# ============================================================================ the report (parent)

def ratios(rows: list[dict]) -> list[dict]:
    """Block-sparse host time over torch's, per op, mode and baseline; with the target (fwd+bwd vs meta)."""
    out = []
    for sparse in (r for r in rows if r["tensors"] == SPARSE):
        peers = (r for r in rows if r["op"] == sparse["op"] and r["mode"] == sparse["mode"])
        for dense in (r for r in peers if r["tensors"] != SPARSE):
            ratio = sparse["host_us"] / dense["host_us"]
            target = sparse["mode"] == "fwd+bwd" and dense["tensors"] == "meta"
            out.append(dict(op=sparse["op"], mode=sparse["mode"], baseline=dense["tensors"], ratio=ratio,
                            target=TARGET_RATIO if target else None, met=(ratio <= TARGET_RATIO) if target else None))
    return out


def markdown(record: dict) -> str:
    """The README table of a result (what :func:`main` writes between the markers)."""
    prov, dev = record["provenance"], record["device"]
    props = dev["properties"]
    lines = [f"Measured by `{prov['command']}` at git `{(prov['git']['commit'] or '?')[:10]}`"
             f"{' (dirty tree)' if prov['git']['dirty'] else ''}, {prov['time_utc']}, on {prov['device']['cpu_count']} "
             f"CPU cores of `{prov['device']['host']}` (torch {prov['versions']['torch']}, triton "
             f"{prov['versions']['triton']}, {record['torch_threads']} torch thread); do-nothing driver as triton "
             f"saw it: {dev['target']}, {props['multiprocessor_count']} SMs, {props['max_shared_mem'] // 1024} KiB "
             f"shared memory per block. Host us per call, min of {record['repeats']} repeats of {record['calls']} "
             "calls (CPU time of the calling thread). Generated from `bench/results/host.json`: do not edit "
             "by hand.", "",
             "| case | tensors | fwd+bwd us | fwd us |", "| --- | --- | --- | --- |"]
    by = {(r["name"], r["op"], r["tensors"], r["mode"]): r["host_us"] for r in record["rows"]}
    for name, op, tensors in dict.fromkeys((r["name"], r["op"], r["tensors"]) for r in record["rows"]):
        lines.append(f"| `{name}` ({op}) | {tensors} | {by[name, op, tensors, 'fwd+bwd']:.1f} | "
                     f"{by[name, op, tensors, 'fwd']:.1f} |")
    lines += ["", "| ratio block-sparse / torch | baseline | fwd+bwd | fwd | target (fwd+bwd) |",
              "| --- | --- | --- | --- | --- |"]
    got = {(r["op"], r["baseline"], r["mode"]): r for r in record["ratios"]}
    for op, baseline in dict.fromkeys((r["op"], r["baseline"]) for r in record["ratios"]):
        fb, f = got[op, baseline, "fwd+bwd"], got[op, baseline, "fwd"]
        target = "-" if fb["target"] is None else f"<= {fb['target']:.1f}x: {'met' if fb['met'] else 'missed'}"
        lines.append(f"| {op} | {baseline} | {fb['ratio']:.2f}x | {f['ratio']:.2f}x | {target} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    # Many short repeats (the same 1400 calls per case as 7 x 200): on a shared 2-core VM, repeats of 200
    # calls of one case varied by up to 2x within one run, so the minimum needs many chances.
    parser.add_argument("--calls", type=int, default=50, help="calls per timed repeat")
    parser.add_argument("--repeats", type=int, default=28, help="timed repeats per case (the minimum is reported)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "host.json", help="the JSON written")
    parser.add_argument("--readme", type=Path, default=ROOT / "bench" / "README.md",
                        help="the markdown file whose host-results table is regenerated")
    parser.add_argument("--no-readme", action="store_true", help="write the JSON only")
    parser.add_argument("--child", type=Path, help=argparse.SUPPRESS)  # internal: measure, write JSON here
    args = parser.parse_args(argv)
    if args.calls < 1 or args.repeats < 1:
        parser.error("--calls and --repeats: expected positive ints")
    if args.child:
        atomic_write_json(args.child, measure(args.calls, args.repeats))
        return {}
    try:
        stub = build_stub()
    except RuntimeError as e:
        parser.error(str(e))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(LD_LIBRARY_PATH=os.pathsep.join([str(stub), *filter(None, [env.get("LD_LIBRARY_PATH")])]),
               TRITON_LIBCUDA_PATH=str(stub), CUDA_VISIBLE_DEVICES="", TRITON_DEFAULT_FP_FUSION="1",
               GLIBC_TUNABLES=MALLOC_TUNABLES,
               PYTHONPATH=os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])]))
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "host.json"
        cmd = [sys.executable, "-m", "bench.host", "--child", str(result), "--calls", str(args.calls),
               "--repeats", str(args.repeats)]
        done = subprocess.run(cmd, cwd=ROOT, env=env)
        if done.returncode != 0:
            sys.exit(f"bench.host: the measuring subprocess failed (exit {done.returncode})")
        measured = json.loads(result.read_text())
    record = {"provenance": provenance("cpu", ["-m", "bench.host", *(sys.argv[1:] if argv is None else argv)]),
              **measured, "ratios": ratios(measured["rows"])}
    atomic_write_json(args.out, record)
    table = markdown(record)
    print(table, end="")
    if not args.no_readme:
        atomic_write_text(args.readme, replace_between_markers(args.readme.read_text(), table, START, END))
        print(f"regenerated the host-results table of {args.readme}")
    print(f"wrote {args.out}")
    return record


if __name__ == "__main__":
    main()
