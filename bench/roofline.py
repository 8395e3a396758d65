"""The roofline performance model of the block-sparse kernels and their dense peers, gather-aware.

For each op (forward, input gradient, weight gradient) of a block-sparse layer, four limits on a device
of DEVICES, and the time is the largest (``bound`` names it):

- compute: FLOPs / peak tensor throughput;
- memory: the minimum HBM bytes (activations in / out once, packed weights, int32 index arrays) / bandwidth;
- l2: the operand bytes staged from L2 into shared memory / the rate the gathers reached (``l2_rate``). A
  gather re-reads its input tile for every active block, so a 32-wide output tile feeds
  ``tile_intensity(128, 32)`` = 25.6 FLOP per staged byte, against 85 for a dense 128x256 tile; this, not
  HBM, is what bounds a sparse layer, and block 64 roughly doubles the reuse (42.7);
- issue: the inner loops' instructions / (SMs x 4 schedulers x clock).

The dense op (cuDNN / cuBLAS) is modelled at its compute / HBM roofline. The speedup ceiling is dense time
/ predicted block-sparse time: against the dense roofline (:func:`speedup_ceiling`), or against cuDNN /
cuBLAS as measured (``dense_seconds=``, what bench/roofline_plot.py draws). Pure python (no torch or
triton needed):

    from bench.roofline import predict, dense_prediction, ConvShape
    predict("fwd", ConvShape(256, 640, 640, 8, 8), density=0.1, block=32, dtype="bf16", device="h200")

:func:`roofline_report` covers the benchmark layers of :mod:`bench.shapes`; :func:`layer_roofline`
gives the columns of one measured row of bench/throughput.py.
"""
from __future__ import annotations

import dataclasses
from typing import Any

from bench.shapes import SHAPES, LayerShape


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


# Per device: peak dense tensor-core FLOP/s per math type (no 2:4 sparsity), HBM bandwidth (B/s), and the
# two rates of the gather-aware terms. l2_rate: operand bytes per second from L2 into the SMs' shared memory
# that the block-sparse kernels have reached: on the H200 9.0e12, the most any block-sparse forward of the
# 2026-11-28 throughput run reached (linear 4096, block 32, 50%: 8.97 TB/s through the public op; tests
# check that no measured time beats the model). The conv 640 block-32 forward at 90% reached 6.0 TB/s in
# the kernel-only timing of profile.log, and ceilings at that rate are 1.5x lower. Taken as the same on the
# H100 (same die, L2 and clocks) and scaled by SMs x clock for the A100. sms and clock (boost, Hz) give the
# instruction-issue cap (ISSUE_PER_SM_CLOCK).
DEVICES: dict[str, dict[str, Any]] = {
    "h100-sxm": dict(name="H100 SXM", bandwidth=3.35e12, l2_rate=9.0e12, sms=132, clock=1.98e9,
                     flops=dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12)),
    "h200": dict(name="H200", bandwidth=4.8e12, l2_rate=9.0e12, sms=132, clock=1.98e9,
                 flops=dict(bf16=989.4e12, fp16=989.4e12, tf32=494.7e12, fp32=66.9e12)),
    "a100-sxm": dict(name="A100 SXM", bandwidth=2.039e12, l2_rate=9.0e12 * (108 * 1.41) / (132 * 1.98), sms=108,
                     clock=1.41e9, flops=dict(bf16=312e12, fp16=312e12, tf32=156e12, fp32=19.5e12)),
}
ELEMENT_BYTES = dict(bf16=2, fp16=2, tf32=4, fp32=4)
INDEX_BYTES = 4
OPS = {"fwd": "fwd", "forward": "fwd", "dgrad": "dgrad", "grad_input": "dgrad", "input_grad": "dgrad",
       "wgrad": "wgrad", "grad_weight": "wgrad", "weight_grad": "wgrad"}

# How the block-sparse kernels stage operands (blockdpr_kernels/conv.py, matmul.py). Each program owns an
# output tile; per inner-loop iteration it stages one (bn x bk) weight block and the operand tile that
# block multiplies, read again from L2 for every active block (nothing is shared between blocks):
#   fwd    y tile [TILE_M x bn] of one block row; per active block: x tile [TILE_M x bk] (gathered at the
#          block's tap) + the block.
#   dgrad  dx tile [TILE_M x bk] of one block column; per active block: dy tile [TILE_M x bn] + the block.
#   wgrad  runs of up to wgrad_group(bk) blocks of one block row; per TILE_M rows of M: one dy tile
#          [TILE_M x bn] for the run + an x tile [TILE_M x bk] per block; split programs add fp32 partials.
# TILE_M: the BLOCK_M the H200 autotuner chose for conv 640 block 32 (profile.log).
TILE_M = {"fwd": 128, "dgrad": 128, "wgrad": 64}
WARPS = 4  # num_warps of those configs
# sm_90 SASS instructions per inner-loop iteration at block 32, bf16, in the configs of TILE_M / WARPS
# (bench.sass through `python -m bench.aot --targets 90 --dtypes bf16 --blocks 32`: forward BM128 w4 92 for
# its 4 HGMMA 64x32x16, input gradient BM128 w4 91, weight gradient BM64 w4 86 for a tile of whole 8x8
# images; at commit 15495b9 they were 208, 91 and 316, see bench/results/aot-loops-before.json). Other block
# sizes: scaled by the elements staged per iteration (the loop is address work).
LOOP_INSTRUCTIONS = {"fwd": 92, "dgrad": 91, "wgrad": 86}
ISSUE_PER_SM_CLOCK = 4  # warp schedulers per SM, one warp instruction each per clock
# cuBLAS / cuDNN: a 128 x 256 output tile, whose staged operands feed tile_intensity(128, 256) = 85 FLOP/B.
DENSE_TILE = (128, 256)


def tile_intensity(tile_m: int, tile_n: int, dtype="bf16") -> float:
    """FLOP per byte staged into shared memory by a ``tile_m x tile_n`` output tile: each K step stages
    ``(tile_m + tile_n) * bk`` elements for ``2 * tile_m * tile_n * bk`` FLOP. (128, 32) bf16: 25.6;
    (128, 256): 85.3."""
    return 2 * tile_m * tile_n / (ELEMENT_BYTES[_as_dtype(dtype)] * (tile_m + tile_n))


def wgrad_group(bk: int) -> int:
    """Blocks of one block row per weight-gradient program (= blockdpr_kernels.layout.wgrad_group)."""
    return max(1, 64 // bk)


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


def _model(op: str, shape, nnz_elems: int, index_bytes: int, dtype: str, device: str, staged=None,
           l2_rate: float | None = None) -> dict:
    """The roofline terms of one launch; ``staged`` = (L2->SM bytes, warp instructions) of a gather kernel
    (None for the dense library: see dense_prediction); ``l2_rate`` overrides the device's."""
    op, shape, dtype = _as_op(op), _as_shape(shape), _as_dtype(dtype)
    dev = _device(device)
    m, n, _ = shape.gemm
    e = ELEMENT_BYTES[dtype]
    x_bytes, y_bytes, w_bytes = e * shape.in_elems, e * m * n, e * nnz_elems
    flops = 2 * m * nnz_elems
    # forward reads x and W, writes y; dgrad reads dy and W, writes dx; wgrad reads x and dy, writes dW
    moved = x_bytes + y_bytes + w_bytes + index_bytes
    terms = dict(compute=flops / dev["flops"][dtype], memory=moved / dev["bandwidth"])
    l2_bytes, instructions = staged if staged else (None, None)
    if staged:
        terms.update(l2=l2_bytes / (l2_rate or dev["l2_rate"]), issue=instructions / (dev["sms"] * ISSUE_PER_SM_CLOCK * dev["clock"]))
    bound = max(terms, key=terms.get)
    return dict(op=op, shape=shape.describe(), dtype=dtype, device=device, flops=flops, bytes=moved,
                intensity=flops / moved if moved else 0.0, l2_bytes=l2_bytes, instructions=instructions,
                l2_intensity=flops / l2_bytes if l2_bytes else None,
                **{f"{k}_s": v for k, v in terms.items()}, seconds=terms[bound], bound=bound)


def _device(device: str) -> dict:
    if device not in DEVICES:
        raise ValueError(f"device: expected one of {sorted(DEVICES)}, got {device!r}")
    return DEVICES[device]


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


def staged_traffic(op: str, m: int, nnz: int, rows: int, block, dtype="bf16", *, device: str = "h100-sxm"):
    """(L2->SM bytes, warp instructions) of one block-sparse launch over M rows with ``nnz`` active blocks in
    ``rows`` block rows (spread evenly), from the tiling described at TILE_M.

    Bytes: iterations x elements staged per iteration x element size (+ the weight gradient's fp32 partials
    when its M is split). Instructions: iterations x LOOP_INSTRUCTIONS[op] (scaled from block 32 by the
    elements staged per iteration) x WARPS."""
    op, e = _as_op(op), ELEMENT_BYTES[_as_dtype(dtype)]
    bn, bk = (block, block) if isinstance(block, int) else tuple(block)
    tm = TILE_M[op]
    tiles_m = -(-m // tm)
    if op == "fwd":
        iterations, elements, at32 = tiles_m * nnz, bk * (tm + bn), 32 * (tm + 32)
        extra = 0
    elif op == "dgrad":
        iterations, elements, at32 = tiles_m * nnz, bn * (tm + bk), 32 * (tm + 32)
        extra = 0
    else:
        g = wgrad_group(bk)
        runs = rows * -(-nnz // (rows * g))  # runs of up to g blocks per block row, rows evenly filled
        iterations = runs * tiles_m
        elements, at32 = tm * (bn + bk * nnz / runs), tm * (32 + 32 * wgrad_group(32))
        n_groups = nnz // g + rows + 1  # the layout's bound, which sets the split count (layout.wgrad_splits)
        splits = max(1, -(-4 * _device(device)["sms"] // n_groups))
        extra = 0 if splits == 1 else 4 * splits * nnz * bn * bk  # fp32 partials added in L2
    l2_bytes = iterations * elements * e + extra
    instructions = iterations * LOOP_INSTRUCTIONS[op] * (elements / at32) * WARPS
    return l2_bytes, instructions


def predict(op: str, shape, density: float, block, dtype="bf16", *, device: str = "h100-sxm",
            l2_rate: float | None = None) -> dict:
    """Roofline prediction for one block-sparse kernel launch.

    op: "fwd" | "dgrad" | "wgrad" (aliases forward / grad_input / grad_weight, "linear_"/"conv_" prefix ok).
    shape: ConvShape, LinearShape, (m, n, k) for a linear, (batch, c_in, c_out, h, w[, kernel, stride,
        padding]) for a conv, or a dict of either's fields.
    density: fraction of weight blocks kept (1 - sparsity); nnz = max(1, round(density * blocks)).
    block: int or (bn, bk). dtype: "bf16" | "fp16" | "tf32" | "fp32" (CUDA-core fp32) or a torch dtype.
    Returns dict(flops, bytes, l2_bytes, instructions, seconds, compute_s, memory_s, l2_s, issue_s, bound,
    intensity, l2_intensity, nnz, density, ...): bytes = the HBM minimum (activations read / written once,
    packed weights or their gradient, the int32 index arrays the op reads); l2_bytes and instructions from
    :func:`staged_traffic`; seconds = the largest of flops / peak, bytes / bandwidth, l2_bytes / l2_rate and
    instructions / issue rate, bound = which. ``l2_rate`` (B/s) overrides the device's.
    """
    shape = _as_shape(shape)
    op = _as_op(op)
    nnz, rows, cols = block_count(shape, density, block)
    bn, bk = (block, block) if isinstance(block, int) else tuple(block)
    index = {"fwd": (rows + 1) + nnz,            # row_ptr, col_idx
             "dgrad": (cols + 1) + 2 * nnz,      # col_ptr, col_row_idx, col_perm
             "wgrad": 2 * nnz}[op]               # row_idx, col_idx
    staged = staged_traffic(op, shape.gemm[0], nnz, rows, (bn, bk), dtype, device=device)
    out = _model(op, shape, nnz * bn * bk, INDEX_BYTES * index, dtype, device, staged, l2_rate)
    out.update(nnz=nnz, blocks=rows * cols, density=nnz / (rows * cols), block=[bn, bk])
    return out


def dense_prediction(op: str, shape, dtype="bf16", *, device: str = "h100-sxm") -> dict:
    """Roofline prediction for the dense op (cuBLAS / cuDNN): full weight, no indices, bound by compute or
    HBM only. Its DENSE_TILE operands feed tile_intensity(*DENSE_TILE) = 85 FLOP per staged byte (given as
    ``l2_bytes`` / ``l2_intensity``), 3.3x the block-32 gather's (cuDNN moved 8 TB/s of them on the H200,
    at 69% of peak): the L2 does not bound it first, so no L2 or issue term is applied."""
    shape = _as_shape(shape)
    m, n, k = shape.gemm
    out = _model(op, shape, n * k, 0, dtype, device)
    out["l2_bytes"] = 2 * m * n * k / tile_intensity(*DENSE_TILE, dtype)
    out["l2_intensity"] = out["flops"] / out["l2_bytes"]
    out.update(nnz=None, blocks=None, density=1.0, block=None)
    return out


def speedup_ceiling(op: str, shape, density: float, block, dtype="bf16", *, device: str = "h100-sxm",
                    dense_seconds: float | None = None, l2_rate: float | None = None) -> float:
    """The best speedup the model allows: the dense time / predicted block-sparse time. The dense time is
    ``dense_seconds`` when given (cuDNN / cuBLAS as measured: "x cuDNN"), else the dense roofline (an
    ideal library at peak, so this ceiling is the lower of the two)."""
    dense = dense_prediction(op, shape, dtype, device=device)["seconds"] if dense_seconds is None else dense_seconds
    return dense / predict(op, shape, density, block, dtype, device=device, l2_rate=l2_rate)["seconds"]


def roofline_fraction(measured_seconds: float, prediction: dict) -> float:
    """Fraction of the roofline reached: predicted seconds / measured seconds (1.0 = at the roofline)."""
    return prediction["seconds"] / measured_seconds




def geometry(shape: LayerShape, conv_batch: int, tokens: int) -> ConvShape | LinearShape:
    """The model's shape of one benchmark layer at a conv batch / linear token count."""
    if shape.kind == "conv":
        return ConvShape(conv_batch, shape.c_in, shape.c_out, shape.hw, shape.hw, shape.k, shape.stride,
                         shape.padding)
    return LinearShape(tokens, shape.c_out, shape.c_in)


def benchmark_shapes(batch: int = 256, linear_m: int = 8192) -> list[tuple[str, str, Any, int]]:
    """(model, layer, shape, count) of every real row of bench.shapes.SHAPES (smoke rows excluded)."""
    return [(s.model, s.name, geometry(s, batch, linear_m), s.count) for s in SHAPES if s.model != "smoke"]


# GPU name substring -> entry of DEVICES.
GPU_DEVICES = {"H200": "h200", "H100": "h100-sxm", "A100": "a100-sxm"}
PASS_OPS = {"fwd": ("fwd",), "bwd": ("dgrad", "wgrad"), "fwdbwd": ("fwd", "dgrad", "wgrad")}


def device_for(gpu_name: str | None) -> str | None:
    """The DEVICES key of a GPU name (H100 SXM when there is no GPU); None for GPUs the model lacks."""
    return next((key for name, key in GPU_DEVICES.items() if name in (gpu_name or "H100")), None)


def layer_roofline(shape: LayerShape, conv_batch: int, tokens: int, density: float, block: int, pass_: str,
                   dtype: str, gpu_name: str | None, tf32: bool = True) -> dict:
    """Roofline columns of one block-sparse benchmark row: pass_ in PASS_OPS (bwd = dgrad + wgrad);
    dtype "bf16" | "fp16" | "fp32" (fp32 runs as TF32 when ``tf32``). Empty for GPUs the model lacks;
    ``roofline_error`` when the model does not cover the case."""
    device = device_for(gpu_name)
    if device is None:
        return {}
    if dtype == "fp32" and tf32:
        dtype = "tf32"
    geo = geometry(shape, conv_batch, tokens)
    ops = PASS_OPS[pass_]
    try:
        sparse = sum(predict(op, geo, density, block, dtype, device=device)["seconds"] for op in ops)
        dense = sum(dense_prediction(op, geo, dtype, device=device)["seconds"] for op in ops)
    except (ValueError, KeyError, TypeError) as e:
        return {"roofline_error": f"{type(e).__name__}: {e}"}
    return {"roofline_device": device, "roofline_ms": sparse * 1e3, "roofline_dense_ms": dense * 1e3,
            "roofline_ceiling": dense / sparse}


def _slim(pred: dict) -> dict:
    return {k: pred[k] for k in ("flops", "bytes", "l2_bytes", "seconds", "bound")}


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


def _t(seconds: float) -> str:
    return f"{seconds * 1e6:.1f}"


def print_roofline(console, report: dict, blocks_shown=None) -> None:
    from rich.table import Table
    dev = report["device"]
    title = (f"Roofline on {dev['name']} ({dev['flops'][report['dtype']] / 1e12:.0f} TFLOP/s {report['dtype']}, "
             f"HBM {dev['bandwidth'] / 1e12:.2f} TB/s, gather L2->SM {dev['l2_rate'] / 1e12:.1f} TB/s); batch "
             f"{report['batch']}, linear M {report['linear_m']}; times in us, ceiling = dense roofline / sparse")
    t = Table(title=title)
    for col in ("model", "layer", "shape", "x", "density", "block", "fwd GFLOP", "fwd L2 MB", "fwd us (dense)",
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
                  f"{s['fwd']['flops'] / 1e9:.2f}", f"{s['fwd']['l2_bytes'] / 1e6:.1f}",
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

