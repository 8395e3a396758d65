"""GPU readiness without a GPU: compile every Triton kernel ahead of time for Hopper and Ampere,
report registers, spills, shared memory and tensor-core use, plus a roofline model.

    python bench/kernel_report.py                    # full matrix: kernels x configs x dtypes x blocks x sm_90/sm_80
    python bench/kernel_report.py --quick            # one block size per variant (32), all configs
    python bench/kernel_report.py --rows problems    # list only rows with errors, spills, smem overflow, no MMA
    python bench/kernel_report.py --skip-compile     # roofline only (no triton needed)
    python bench/kernel_report.py --extra-config BLOCK_M=512,num_warps=4,num_stages=4   # try a config of your own

Part 1 (compile). Every kernel of ``blockdpr_kernels`` (``kernels/``) x every autotune config it
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
kernels/*.py, triton version, job) under ``$BLOCKDPR_AOT_CACHE`` (default
``~/.cache/blockdpr/aot``); Triton's own cache keeps the cubins.

Part 2 (roofline). For the benchmark shapes (WRN-28-2 / WRN-28-10 / ResNet-50 conv layers, square
linears), each density and block: FLOPs and the minimum bytes moved (activations in/out once,
packed weights, index arrays) for forward, input gradient and weight gradient; time =
max(FLOPs / peak, bytes / bandwidth) on an H100 SXM; the ceiling on speedup against dense.
``predict()`` and ``dense_prediction()`` are importable without torch or triton:

    sys.path.insert(0, "bench"); from kernel_report import predict, dense_prediction, ConvShape
    predict("fwd", ConvShape(256, 640, 640, 8, 8), density=0.1, block=32, dtype="bf16")

The one table to update when a kernel changes is KERNELS (with VARIANTS / DTYPES next to it).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import os
import platform
import queue
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Iterable

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
                                dv_ptr="fp32"),
                  constexprs={}),
}
# How the kernels are launched: geometry ints (specialised like the runtime: 1 -> constexpr) and
# constexprs; block sizes from blockdpr_kernels.ops.<blocks>; block constexpr names (rows, cols).
VARIANTS: dict[str, dict[str, Any]] = {
    "linear": dict(blocks="LINEAR_BLOCKS", block_args=("BN", "BK"),
                   ints=dict(M=8192, H=1, W=1, P=1, Q=1, C_IN=4096, C_OUT=4096),
                   constexprs=dict(R=1, S=1, STRIDE=1, PAD=0)),
    "conv3x3": dict(blocks="CONV_BLOCKS", block_args=("BN", "BK"),
                    ints=dict(M=256 * 8 * 8, H=8, W=8, P=8, Q=8, C_IN=640, C_OUT=640),
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


# ============================================================================ roofline model
@dataclasses.dataclass(frozen=True)
class ConvShape:
    """conv2d on ``x [batch, c_in, h, w]`` with a ``kernel x kernel`` filter to ``c_out`` channels."""
    batch: int
    c_in: int
    c_out: int
    h: int
    w: int
    kernel: int = 3
    stride: int = 1
    padding: int = 1

    @property
    def p(self) -> int:
        return (self.h + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def q(self) -> int:
        return (self.w + 2 * self.padding - self.kernel) // self.stride + 1

    @property
    def gemm(self) -> tuple[int, int, int]:
        """(M output pixels, N = c_out, K = kernel^2 * c_in) of the implicit GEMM."""
        return self.batch * self.p * self.q, self.c_out, self.kernel * self.kernel * self.c_in

    @property
    def in_elems(self) -> int:
        return self.batch * self.h * self.w * self.c_in

    @property
    def in_channels(self) -> int:
        return self.c_in

    def describe(self) -> str:
        s = f"conv{self.kernel}x{self.kernel} {self.c_in}->{self.c_out} {self.h}x{self.w}"
        return s + (f" s{self.stride}" if self.stride != 1 else "") + f" b{self.batch}"


@dataclasses.dataclass(frozen=True)
class LinearShape:
    """``x [m, k] @ W[n, k]^T``."""
    m: int
    n: int
    k: int

    @property
    def gemm(self) -> tuple[int, int, int]:
        return self.m, self.n, self.k

    @property
    def in_elems(self) -> int:
        return self.m * self.k

    @property
    def in_channels(self) -> int:
        return self.k

    def describe(self) -> str:
        return f"linear {self.k}->{self.n} m{self.m}"


# Peak dense tensor-core FLOP/s per math type (no 2:4 sparsity) and HBM bandwidth (B/s).
DEVICES: dict[str, dict[str, Any]] = {
    "h100-sxm": dict(name="H100 SXM", bandwidth=3.35e12,
                     flops=dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12)),
    "h200": dict(name="H200", bandwidth=4.8e12,
                 flops=dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12)),
    "a100-sxm": dict(name="A100 SXM", bandwidth=2.039e12,
                     flops=dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
}
ELEMENT_BYTES = dict(bf16=2, fp16=2, tf32=4, fp32=4)
INDEX_BYTES = 4
OPS = {"fwd": "fwd", "forward": "fwd", "dgrad": "dgrad", "grad_input": "dgrad", "input_grad": "dgrad",
       "wgrad": "wgrad", "grad_weight": "wgrad", "weight_grad": "wgrad"}


def _as_shape(shape) -> ConvShape | LinearShape:
    if isinstance(shape, (ConvShape, LinearShape)):
        return shape
    if isinstance(shape, dict):
        return LinearShape(**shape) if set(shape) == {"m", "n", "k"} else ConvShape(**shape)
    shape = tuple(int(v) for v in shape)
    if len(shape) == 3:
        return LinearShape(*shape)
    if 5 <= len(shape) <= 8:
        return ConvShape(*shape)
    raise ValueError(f"shape: expected ConvShape, LinearShape, dict, (m, n, k) or "
                     f"(batch, c_in, c_out, h, w[, kernel, stride, padding]); got {shape!r}")


def _as_op(op: str) -> str:
    key = str(op).lower()
    for prefix in ("linear_", "conv_", "conv2d_"):
        key = key.removeprefix(prefix)
    if key not in OPS:
        raise ValueError(f"op: expected one of {sorted(OPS)}, got {op!r}")
    return OPS[key]


def _as_dtype(dtype) -> str:
    name = str(dtype).removeprefix("torch.")
    name = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}.get(name, name)
    if name not in ELEMENT_BYTES:
        raise ValueError(f"dtype: expected one of {sorted(ELEMENT_BYTES)} or a torch dtype, got {dtype!r}")
    return name


def _model(op: str, shape, nnz_elems: int, index_bytes: int, dtype: str, device: str) -> dict:
    op, shape, dtype = _as_op(op), _as_shape(shape), _as_dtype(dtype)
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {device!r}")
    dev = DEVICES[device]
    m, n, _ = shape.gemm
    e = ELEMENT_BYTES[dtype]
    x_bytes, y_bytes, w_bytes = e * shape.in_elems, e * m * n, e * nnz_elems
    flops = 2 * m * nnz_elems
    # forward reads x and W, writes y; dgrad reads dy and W, writes dx; wgrad reads x and dy, writes dW
    moved = x_bytes + y_bytes + w_bytes + index_bytes
    compute_s, memory_s = flops / dev["flops"][dtype], moved / dev["bandwidth"]
    return dict(op=op, shape=shape.describe(), dtype=dtype, device=device, flops=flops, bytes=moved,
                intensity=flops / moved if moved else 0.0, compute_s=compute_s, memory_s=memory_s,
                seconds=max(compute_s, memory_s), bound="compute" if compute_s >= memory_s else "memory")


def block_count(shape, density: float, block) -> tuple[int, int, int]:
    """(nnz, block rows, block cols) of a layout keeping ``density`` of the ``[N, K]`` weight's blocks."""
    shape = _as_shape(shape)
    bn, bk = (block, block) if isinstance(block, int) else tuple(block)
    _, n, k = shape.gemm
    if n % bn or shape.in_channels % bk:
        raise ValueError(f"block {bn}x{bk} does not tile {shape.describe()} (N={n}, C_in={shape.in_channels})")
    rows, cols = n // bn, k // bk
    if not 0.0 < density <= 1.0:
        raise ValueError(f"density: expected a fraction of blocks kept in (0, 1], got {density}")
    return max(1, int(round(density * rows * cols))), rows, cols


def predict(op: str, shape, density: float, block, dtype="bf16", *, device: str = "h100-sxm") -> dict:
    """Roofline prediction for one block-sparse kernel launch.

    op: "fwd" | "dgrad" | "wgrad" (aliases forward / grad_input / grad_weight, "linear_"/"conv_" prefix ok).
    shape: ConvShape, LinearShape, (m, n, k) for a linear, (batch, c_in, c_out, h, w[, kernel, stride,
        padding]) for a conv, or a dict of either's fields.
    density: fraction of weight blocks kept (1 - sparsity); nnz = max(1, round(density * blocks)).
    block: int or (bn, bk). dtype: "bf16" | "fp16" | "tf32" | "fp32" (CUDA-core fp32) or a torch dtype.
    Returns dict(flops, bytes, seconds, compute_s, memory_s, bound, intensity, nnz, density, ...):
    minimum bytes = activations read / written once + packed weights (or their gradient) + the
    int32 index arrays the op reads; seconds = max(flops / peak, bytes / bandwidth).
    """
    shape = _as_shape(shape)
    op = _as_op(op)
    nnz, rows, cols = block_count(shape, density, block)
    bn, bk = (block, block) if isinstance(block, int) else tuple(block)
    index = {"fwd": (rows + 1) + nnz,            # row_ptr, col_idx
             "dgrad": (cols + 1) + 2 * nnz,      # col_ptr, col_row_idx, col_perm
             "wgrad": 2 * nnz}[op]               # row_idx, col_idx
    out = _model(op, shape, nnz * bn * bk, INDEX_BYTES * index, dtype, device)
    out.update(nnz=nnz, blocks=rows * cols, density=nnz / (rows * cols), block=[bn, bk])
    return out


def dense_prediction(op: str, shape, dtype="bf16", *, device: str = "h100-sxm") -> dict:
    """Roofline prediction for the dense op (cuBLAS / cuDNN): same model, full weight, no indices."""
    shape = _as_shape(shape)
    _, n, k = shape.gemm
    out = _model(op, shape, n * k, 0, dtype, device)
    out.update(nnz=None, blocks=None, density=1.0, block=None)
    return out


def speedup_ceiling(op: str, shape, density: float, block, dtype="bf16", *, device: str = "h100-sxm") -> float:
    """Predicted dense time / predicted block-sparse time: the best speedup the roofline allows."""
    return (dense_prediction(op, shape, dtype, device=device)["seconds"]
            / predict(op, shape, density, block, dtype, device=device)["seconds"])


def roofline_fraction(measured_seconds: float, prediction: dict) -> float:
    """Fraction of the roofline reached: predicted seconds / measured seconds (1.0 = at the roofline)."""
    return prediction["seconds"] / measured_seconds


def wrn_layers(depth: int, width: int, batch: int) -> list[tuple[str, ConvShape, int]]:
    """The sparse 3x3 convs of WRN-depth-width on 32x32 inputs: (name, shape, count)."""
    n = (depth - 4) // 6
    widths = [16, 16 * width, 32 * width, 64 * width]
    out, size = [], 32
    for g in range(3):
        c_in, c_out, stride = widths[g], widths[g + 1], 1 if g == 0 else 2
        out.append((f"g{g + 1}.0.conv1", ConvShape(batch, c_in, c_out, size, size, 3, stride, 1), 1))
        size //= stride
        out.append((f"g{g + 1}.convs", ConvShape(batch, c_out, c_out, size, size, 3, 1, 1), 2 * n - 1))
    return out


def resnet50_layers(batch: int) -> list[tuple[str, ConvShape, int]]:
    """The bottleneck convs of ResNet-50 on 224x224 (stride on the 3x3, torchvision v1.5), stem excluded."""
    out, size, c_prev = [], 56, 64
    for stage, (width, blocks) in enumerate(zip((64, 128, 256, 512), (3, 4, 6, 3)), start=1):
        stride = 1 if stage == 1 else 2
        c_out = 4 * width
        small = size // stride
        L = f"layer{stage}"
        out += [(f"{L}.0.conv1", ConvShape(batch, c_prev, width, size, size, 1, 1, 0), 1),
                (f"{L}.0.conv2", ConvShape(batch, width, width, size, size, 3, stride, 1), 1),
                (f"{L}.0.downsample", ConvShape(batch, c_prev, c_out, size, size, 1, stride, 0), 1),
                (f"{L}.x.conv1", ConvShape(batch, c_out, width, small, small, 1, 1, 0), blocks - 1),
                (f"{L}.x.conv2", ConvShape(batch, width, width, small, small, 3, 1, 1), blocks - 1),
                (f"{L}.conv3", ConvShape(batch, width, c_out, small, small, 1, 1, 0), blocks)]
        size, c_prev = small, c_out
    return [r for r in out if r[2] > 0]


def benchmark_shapes(batch: int = 256, linear_m: int = 8192) -> list[tuple[str, str, Any, int]]:
    """(model, layer, shape, count) for WRN-28-2, WRN-28-10, ResNet-50 and square linears 1024..8192."""
    rows = [("WRN-28-2", name, s, c) for name, s, c in wrn_layers(28, 2, batch)]
    rows += [("WRN-28-10", name, s, c) for name, s, c in wrn_layers(28, 10, batch)]
    rows += [("ResNet-50", name, s, c) for name, s, c in resnet50_layers(batch)]
    rows += [("linear", f"{d}x{d}", LinearShape(linear_m, d, d), 1) for d in (1024, 2048, 4096, 8192)]
    return rows


def _slim(pred: dict) -> dict:
    return {k: pred[k] for k in ("flops", "bytes", "seconds", "bound")}


def roofline_report(densities=(0.2, 0.1), blocks=(16, 32, 64), dtype="bf16", device="h100-sxm",
                    batch: int = 256, linear_m: int = 8192) -> dict:
    """Per (layer, density, block): each op's prediction and ceiling; per model: whole-step ceilings."""
    layers, models = [], {}
    for model, name, shape, count in benchmark_shapes(batch, linear_m):
        dense = {op: dense_prediction(op, shape, dtype, device=device) for op in ("fwd", "dgrad", "wgrad")}
        for density in densities:
            for block in blocks:
                try:
                    sparse = {op: predict(op, shape, density, block, dtype, device=device) for op in dense}
                except ValueError:  # block does not tile the layer: it stays dense
                    sparse = None
                row = dict(model=model, layer=name, shape=shape.describe(), count=count, density=density,
                           block=block, tileable=sparse is not None, nnz=sparse["fwd"]["nnz"] if sparse else None,
                           dense={op: _slim(p) for op, p in dense.items()},
                           sparse={op: _slim(p) for op, p in sparse.items()} if sparse else None)
                dense_step = sum(d["seconds"] for d in dense.values())
                sparse_step = sum(s["seconds"] for s in sparse.values()) if sparse else dense_step
                row["ceiling"] = {op: dense[op]["seconds"] / sparse[op]["seconds"] for op in dense} if sparse else None
                row["step_ceiling"] = dense_step / sparse_step
                layers.append(row)
                agg = models.setdefault((model, density, block), dict(model=model, density=density, block=block,
                                                                      dense_s=0.0, sparse_s=0.0, dense_layers=0))
                agg["dense_s"] += count * dense_step
                agg["sparse_s"] += count * sparse_step
                agg["dense_layers"] += 0 if sparse else count
    for agg in models.values():
        agg["step_ceiling"] = agg["dense_s"] / agg["sparse_s"]
    return dict(device=DEVICES[device] | dict(key=device), dtype=dtype, batch=batch, linear_m=linear_m,
                densities=list(densities), blocks=list(blocks), layers=layers, models=list(models.values()))


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


# ---------------------------------------------------------------- worker side (subprocess, no interpreter)
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


def _nvidia_tool(name: str) -> str:
    try:
        from triton import knobs
        return getattr(knobs.nvidia, name).path
    except Exception:  # noqa: BLE001
        import triton
        return str(Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name)


def analyse_cubin(cubin: bytes) -> dict:
    """Registers, stack / local / static shared bytes (cuobjdump) and MMA / spill instruction counts (SASS)."""
    cuobjdump = _nvidia_tool("cuobjdump")
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
                instructions=len(opcodes))


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


def _import_package() -> None:
    """Make ``import blockdpr_kernels`` work from a plain checkout (no ``pip install -e .``)."""
    import importlib.util
    if importlib.util.find_spec(PACKAGE) is None:
        spec = importlib.util.spec_from_file_location(PACKAGE, KERNEL_DIR / "__init__.py",
                                                      submodule_search_locations=[str(KERNEL_DIR)])
        module = importlib.util.module_from_spec(spec)
        sys.modules[PACKAGE] = module
        spec.loader.exec_module(module)


def _worker_main() -> None:
    """Line-delimited JSON requests on stdin, answers on the original stdout (triton's prints go to stderr)."""
    _import_package()
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


# ---------------------------------------------------------------- parent side
class _Worker:
    def __init__(self, log):
        env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
        env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # the GPU default; silences triton's warning
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
        self.proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--_worker"],
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
    def git(*args):
        try:
            return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
        except Exception:  # noqa: BLE001
            return None
    versions = dict(python=platform.python_version(), triton=_triton_version())
    try:
        from importlib.metadata import version
        versions["torch"] = version("torch")
    except Exception:  # noqa: BLE001
        versions["torch"] = None
    try:
        ptxas = subprocess.run([_nvidia_tool("ptxas"), "--version"], capture_output=True, text=True, timeout=30).stdout
        versions["ptxas"] = (re.findall(r"release ([\d.]+)", ptxas) or [None])[0]
    except Exception:  # noqa: BLE001
        versions["ptxas"] = None
    return dict(command=" ".join([Path(sys.argv[0]).name if argv is None else "kernel_report.py",
                                  *(sys.argv[1:] if argv is None else argv)]),
                git_commit=git("rev-parse", "HEAD"), git_dirty=bool(git("status", "--porcelain", "blockdpr_kernels")),
                kernels_source_hash=source_hash(), versions=versions, host=platform.node(),
                date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


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
                          "-", "-", "-", "-", "-", f"[red]{r.get('error_summary') or r['error'][:200]}[/red]")
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


def _t(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def print_roofline(console, report: dict, blocks_shown=None) -> None:
    from rich.table import Table
    dev = report["device"]
    title = (f"Roofline on {dev['name']} ({dev['flops'][report['dtype']] / 1e12:.0f} TFLOP/s {report['dtype']}, "
             f"{dev['bandwidth'] / 1e12:.2f} TB/s); batch {report['batch']}, linear M {report['linear_m']}; "
             f"times in us, ceiling = dense / sparse")
    t = Table(title=title)
    for col in ("model", "layer", "shape", "x", "density", "block", "fwd GFLOP", "fwd MB", "fwd us (dense)",
                "fwd", "dgrad", "wgrad", "step ceiling", "bound fwd/dgrad/wgrad"):
        t.add_column(col, justify="left" if col in ("model", "layer", "shape", "bound fwd/dgrad/wgrad") else "right")
    for r in report["layers"]:
        if blocks_shown and r["block"] not in blocks_shown:
            continue
        if not r["tileable"]:
            t.add_row(r["model"], r["layer"], r["shape"], str(r["count"]), f"{r['density']:.2f}", str(r["block"]),
                      "", "", "", "-", "-", "-", "1.00", "stays dense (not tileable)")
            continue
        s, d = r["sparse"], r["dense"]
        t.add_row(r["model"], r["layer"], r["shape"], str(r["count"]), f"{r['density']:.2f}", str(r["block"]),
                  f"{s['fwd']['flops'] / 1e9:.2f}", f"{s['fwd']['bytes'] / 1e6:.1f}",
                  f"{_t(s['fwd']['seconds'])} ({_t(d['fwd']['seconds'])})",
                  *(f"{r['ceiling'][op]:.2f}x" for op in ("fwd", "dgrad", "wgrad")), f"{r['step_ceiling']:.2f}x",
                  "/".join(s[op]["bound"][:3] for op in ("fwd", "dgrad", "wgrad")))
    console.print(t)
    m = Table(title="Roofline ceiling per model (sparse layers, fwd + dgrad + wgrad, layers not tileable stay dense)")
    for col in ("model", "density", "block", "dense us", "sparse us", "ceiling", "layers kept dense"):
        m.add_column(col)
    for a in report["models"]:
        if blocks_shown and a["block"] not in blocks_shown:
            continue
        m.add_row(a["model"], f"{a['density']:.2f}", str(a["block"]), f"{a['dense_s'] * 1e6:.0f}",
                  f"{a['sparse_s'] * 1e6:.0f}", f"{a['step_ceiling']:.2f}x", str(a["dense_layers"]))
    console.print(m)


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
    if argv is None and sys.argv[1:2] == ["--_worker"]:
        _worker_main()
        return {}
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernels", nargs="+", choices=list(KERNELS), default=None)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=None)
    parser.add_argument("--dtypes", nargs="+", choices=list(DTYPES), default=list(DEFAULT_DTYPES),
                        help="fp32 = TF32 tensor cores; fp32-ieee = CUDA cores (as torch's default for linear)")
    parser.add_argument("--blocks", nargs="+", type=int, default=None, help="default: every supported block size")
    parser.add_argument("--targets", nargs="+", type=int, choices=list(TARGETS), default=list(TARGETS))
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
    parser.add_argument("--densities", nargs="+", type=float, default=[0.2, 0.1], help="fraction of blocks kept")
    parser.add_argument("--roofline-blocks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--device", choices=list(DEVICES), default="h100-sxm")
    parser.add_argument("--roofline-dtype", choices=list(ELEMENT_BYTES), default="bf16")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--linear-m", type=int, default=8192, help="rows (tokens) of the square linears")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "kernel_report.json")
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
            console.print(f"[red]kernel {name} is not in the KERNELS table of bench/kernel_report.py: not compiled[/red]")
        for name, err in comp["kernel_errors"].items():
            console.print(f"[red]kernel {name}: {err}[/red]")
        result["compile"] = comp
    if not args.skip_roofline:
        report = roofline_report(args.densities, args.roofline_blocks, args.roofline_dtype, args.device,
                                 args.batch, args.linear_m)
        print_roofline(console, report)
        result["roofline"] = report
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, default=str, separators=(",", ":")))
        console.print(f"wrote {args.json}")
    return result


if __name__ == "__main__":
    main()
