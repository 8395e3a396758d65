"""Worker process of bench/aot.py: reads the kernel objects and compiles one job at a time.

    python -m bench.aot_worker      # started by bench.aot, never by hand

Requests are line-delimited JSON on stdin ({"op": "enumerate"} or {"op": "compile", "job": ...}),
answers go to the original stdout (triton's own prints are sent to stderr). It runs without
TRITON_INTERPRET (bench.aot removes it from the environment) so ``triton.compile`` sees real kernels.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time

from bench.aot_compile import nvidia_tool
from bench.aot_jobs import DTYPES, KERNELS, PACKAGE, TARGETS, TC_INSTRUCTIONS, VARIANTS, build_signature
from bench.sass import hot_loop

def _unwrap(obj):
    """Autotuner / Heuristics -> the JITFunction underneath (None if obj is not a triton kernel)."""
    seen = 0
    while obj is not None and seen < 8:
        if type(obj).__name__ in ("JITFunction", "InterpretedFunction") or hasattr(obj, "params") and hasattr(obj, "arg_names"):
            return obj
        obj = getattr(obj, "fn", None)
        seen += 1
    return None


def _resolve(path: str):
    import importlib
    mod, _, attr = path.rpartition(".")
    return getattr(importlib.import_module(f"{PACKAGE}.{mod}"), attr)


def _config_dict(c) -> dict:
    return dict(kwargs=dict(c.kwargs), num_warps=c.num_warps, num_stages=c.num_stages,
                num_ctas=getattr(c, "num_ctas", 1), maxnreg=getattr(c, "maxnreg", None))


def _worker_enumerate() -> dict:
    """Kernels of the table with their args and configs; triton kernels in the package not in the table."""
    import importlib
    import pkgutil
    pkg = importlib.import_module(PACKAGE)
    ops = importlib.import_module(f"{PACKAGE}.ops")
    kernels, listed = {}, set()
    for name, spec in KERNELS.items():
        try:
            obj = _resolve(spec["obj"])
        except Exception as e:  # noqa: BLE001
            kernels[name] = dict(error=f"cannot find {spec['obj']}: {type(e).__name__}: {e}")
            continue
        fn = _unwrap(obj)
        listed.add(id(fn))
        configs = [_config_dict(c) for c in getattr(obj, "configs", None) or []]
        kernels[name] = dict(obj=spec["obj"], fn_name=fn.__name__, arg_names=list(fn.arg_names),
                             constexprs=[p.name for p in fn.params if p.is_constexpr],
                             autotuned=bool(configs), configs=configs or [
                                 dict(kwargs={}, num_warps=4, num_stages=3, num_ctas=1, maxnreg=None)],
                             pickable=_pickable(name, spec, obj))
    unlisted = []
    for info in pkgutil.iter_modules(pkg.__path__):
        mod = importlib.import_module(f"{PACKAGE}.{info.name}")
        for attr, obj in vars(mod).items():
            fn = _unwrap(obj) if type(obj).__module__.startswith("triton") else None
            if fn is None or id(fn) in listed or getattr(fn, "__module__", mod.__name__) != mod.__name__:
                continue
            # autotuned objects are launched kernels; plain @triton.jit ones only if named like one
            if obj is not fn or attr.endswith("_kernel"):
                unlisted.append(f"{info.name}.{attr}")
    blocks = {v: list(getattr(ops, spec["blocks"], ())) for v, spec in VARIANTS.items()}
    return dict(kernels=kernels, unlisted=sorted(set(unlisted)), blocks=blocks)


def _pickable(name: str, spec: dict, obj) -> dict | None:
    """Autotune config indices that the kernel module's ``prune_configs(name, configs, bn, bk, elem_bytes,
    smem_limit, hopper)`` (its ``early_config_prune``) keeps, per "dtype/block/target"; None: no pruning."""
    import importlib
    prune = getattr(importlib.import_module(f"{PACKAGE}.{spec['obj'].rpartition('.')[0]}"), "prune_configs", None)
    if prune is None or not getattr(obj, "configs", None):
        return None
    ops = importlib.import_module(f"{PACKAGE}.ops")
    blocks = sorted({b for v in VARIANTS.values() for b in getattr(ops, v["blocks"], ())})
    out = {}
    for dtype, dt in DTYPES.items():
        elem = 2 if dt["ptr"] in ("bf16", "fp16") else 4
        for block in blocks:
            for target, t in TARGETS.items():
                kept = {id(c) for c in prune(name, obj.configs, block, block, elem, t["smem_block"], target >= 90)}
                out[f"{dtype}/{block}/{target}"] = [i for i, c in enumerate(obj.configs) if id(c) in kept]
    return out



def analyse_cubin(cubin: bytes) -> dict:
    """Registers, stack / local / static shared bytes (cuobjdump), MMA / spill instruction counts and the
    hot loop's instructions per iteration (SASS, :func:`bench.sass.hot_loop`)."""
    cuobjdump = nvidia_tool("cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(cubin)
    try:
        sass = subprocess.run([cuobjdump, "--dump-resource-usage", "-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    res = {k.lower(): int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", sass)}
    opcodes = re.findall(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_]*)", sass)
    counts: dict[str, int] = {}
    for op in opcodes:
        counts[op] = counts.get(op, 0) + 1
    mma = {op: counts[op] for op in TC_INSTRUCTIONS if counts.get(op)}
    return dict(regs=res.get("reg"), stack=res.get("stack", 0), local=res.get("local", 0),
                static_smem=res.get("shared", 0), mma=mma, stl=counts.get("STL", 0), ldl=counts.get("LDL", 0),
                instructions=len(opcodes), loop=hot_loop(sass))


def _worker_compile(job: dict, kinfo: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    row = dict(job)
    t0 = time.time()
    try:
        fn = _unwrap(_resolve(KERNELS[job["kernel"]]["obj"]))
        signature, constexprs, attrs = build_signature(job, kinfo["arg_names"], kinfo["constexprs"])
        cfg = job["config"]
        options = dict(num_warps=cfg["num_warps"], num_stages=cfg["num_stages"], num_ctas=cfg.get("num_ctas") or 1)
        if cfg.get("maxnreg"):
            options["maxnreg"] = cfg["maxnreg"]
        src = triton.compiler.ASTSource(fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
        kernel = triton.compile(src, target=GPUTarget("cuda", job["target"], 32), options=options)
        cubin = kernel.asm["cubin"]
        row.update(analyse_cubin(cubin))
        row["dynamic_smem"] = int(kernel.metadata.shared)
        row["cubin_sha"] = hashlib.sha256(cubin).hexdigest()[:16]
        row["error"] = None
    except Exception as e:  # noqa: BLE001 -- every failure is a row of the report
        lines = [line for line in f"{type(e).__name__}: {e}".splitlines() if line.strip()]
        row["error"] = "\n".join(lines)[-3000:]
        # the cause is on the last line (triton prints the source excerpt first)
        row["error_summary"] = f"{type(e).__name__}: {lines[-1].strip()}"[:300] if len(lines) > 1 else lines[0][:300]
    row["compile_s"] = round(time.time() - t0, 3)
    return row



def _worker_main() -> None:
    """Line-delimited JSON requests on stdin, answers on the original stdout (triton's prints go to stderr)."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    kinfo = None
    for line in sys.stdin:
        req = json.loads(line)
        if req["op"] == "enumerate":
            kinfo = _worker_enumerate()
            out.write(json.dumps(kinfo) + "\n")
        elif req["op"] == "compile":
            if req["job"].get("_crash"):  # tests: a compiler process that dies mid-job
                os._exit(3)
            kinfo = req.get("kinfo") or kinfo or _worker_enumerate()
            out.write(json.dumps(_worker_compile(req["job"], kinfo["kernels"][req["job"]["kernel"]])) + "\n")




if __name__ == "__main__":
    _worker_main()
