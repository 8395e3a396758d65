"""Layer benchmark of one shape in one dtype: the block-sparse layer at each block size and sparsity
against its peers (dense cuDNN / cuBLAS, element-masked dense, torch.sparse BSR for the linear
forward), each pass (fwd, bwd, fwdbwd) timed by bench/timing.py, each block-sparse case first
checked against the dense op (bench/check.py; a wrong case is failed, never timed).

cfg keys read: device, seed, conv_batch, tokens, blocks, sparsities, passes, backend, retune,
warmup_ms, rep_ms, cpu_reps.
"""
from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F

from bench import autotune_cache
from bench.check import check_case
from bench.roofline import layer_roofline
from bench.shapes import LayerShape
from bench.timing import stats, time_ms
from blockdpr_kernels import BlockLayout, block_sparse_conv2d, block_sparse_linear

__all__ = ["DTYPES", "exact_mask", "pass_fns", "layer_rows", "bsr_forward", "add_speedups"]

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


class WrongResult(Exception):
    """A block-sparse case that failed its check against the dense op (its rows are not timed)."""


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
        """One row: fn timed, or failed with fn's error when fn is an exception (a wrong or missing case)."""
        row = dict(base, impl=impl, **{"pass": pass_}, **extra, **(more or {}))
        try:
            if isinstance(fn, Exception):
                raise fn
            row["times_ms"] = time_ms(fn, cfg["device"], warmup_ms=cfg["warmup_ms"], rep_ms=cfg["rep_ms"],
                                     cpu_reps=cfg["cpu_reps"])
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
                autotune_cache.clear()
            layout = BlockLayout(exact_mask(grid, 1 - sparsity, gen).to(device), (block, block))
            values = layout.pack(matrix.contiguous()).contiguous().requires_grad_()
            density = layout.nnz / (grid[0] * grid[1])
            extra = dict(block=block, sparsity=sparsity, density=density, nnz=layout.nnz, ideal=1 / density)
            if shape.kind == "conv":
                forward = lambda: block_sparse_conv2d(x, values, layout, kernel_size=shape.k,  # noqa: E731
                                                      backend=cfg["backend"], **geometry)
            else:
                forward = lambda: block_sparse_linear(x, values, layout, backend=cfg["backend"])  # noqa: E731
            backward = any(p != "fwd" for p in cfg["passes"])
            try:
                extra.update(check_case(shape.kind, forward, x, values, layout, geometry, backward, cfg["seed"]))
            except Exception as e:  # noqa: BLE001 - a crashing kernel is a failed row too
                extra.update(check="failed", check_message=f"the op raised {type(e).__name__}: {str(e)[:300]}")
            for pass_, fn in pass_fns(forward, (x, values), cfg["passes"]).items():
                tf32 = torch.backends.cudnn.allow_tf32 if shape.kind == "conv" else torch.backends.cuda.matmul.allow_tf32
                more = layer_roofline(shape, cfg["conv_batch"], cfg["tokens"], density, block, pass_, dtype, gpu_name,
                                      tf32)
                if extra["check"] == "failed":  # correctness before speed: a wrong result is never timed
                    fn = WrongResult(extra["check_message"])
                record("block", pass_, fn, more, **extra)
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
