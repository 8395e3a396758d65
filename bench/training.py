"""Training-step benchmark: images/s of a full SGD step of WRN-d-k on 32x32 input, dense against
element mode and block mode (per block size), one DPR reallocation timed separately and amortised
over ``period`` steps; peak allocated bytes of a step and bytes of parameters + gradients +
optimizer state. Also the sparse-layer byte counts of bench/memory.py as rows.

cfg keys read: device, seed, dtypes -> ``dt``, train_modes, train_sparsities, blocks, period,
warmup_ms, train_rep_ms, cpu_reps.
"""
from __future__ import annotations

import re

import torch
import torch.nn.functional as F

from bench.memory import layout_nbytes, measure as memory_measure, nbytes, parameter_state_bytes
from bench.timing import stats, time_ms
from blockdpr.models import WideResNet, sparse_parameters
from blockdpr.setup import sgd
from blockdpr.sparsity import DPR

__all__ = ["TRAIN_MODES", "wrn_spec", "training_rows", "memory_rows"]

TRAIN_MODES = ("dense", "element", "block")


def wrn_spec(name: str) -> tuple[int, int]:
    """'wrn-28-10' -> (28, 10); ValueError when malformed."""
    m = re.fullmatch(r"wrn-(\d+)-(\d+)", name)
    if not m or (int(m[1]) - 4) % 6 or int(m[1]) < 10 or int(m[2]) < 1:
        raise ValueError(f"expected a WRN name wrn-D-K with D = 6n + 4 >= 10, K >= 1, got {name!r}")
    return int(m[1]), int(m[2])



def build_training(model_name: str, mode: str, block: int | None, sparsity: float, cfg: dict):
    """(model, optimizer, DPR object or None) of one training configuration: the library's DPR on the
    WRN's sparse tensors (the residual blocks' 3x3 convs), reallocating only when told (timed apart)."""
    device = torch.device(cfg["device"])
    torch.manual_seed(cfg["seed"])
    model = WideResNet(*wrn_spec(model_name)).to(device).to(memory_format=torch.channels_last)
    optimizer = sgd(model.parameters())
    if mode == "dense":
        return model, optimizer, None
    sparse = set(sparse_parameters(model))
    dpr = DPR(model, optimizer, sparsity, granularity=mode, block=block or 32, seed=cfg["seed"], period=10 ** 9,
              include=lambda module, name: f"{name}.weight" in sparse)
    return model, optimizer, dpr


def training_rows(model_name: str, batch: int, dtype: str, dt: torch.dtype, cfg: dict, log) -> list[dict]:
    """Images/s, peak memory and state bytes of a full step: dense, element and block mode.

    dtype: its name ("bf16"); dt: the torch dtype (autocast to it on CUDA unless float32)."""
    device = torch.device(cfg["device"])
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
    model, optimizer, dpr = build_training(model_name, mode, block, sparsity, cfg)

    def step():
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dt, enabled=amp):
            loss = F.cross_entropy(model(images), labels)
        loss.backward()
        (dpr or optimizer).step()

    for _ in range(3 if device.type == "cuda" else 1):  # warm-up (cuDNN benchmark, Triton autotune)
        step()
    peak = None
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() - baseline
    timer = dict(warmup_ms=cfg["warmup_ms"], cpu_reps=cfg["cpu_reps"])
    out = {"step_times_ms": time_ms(step, cfg["device"], rep_ms=cfg["train_rep_ms"], **timer), "peak_bytes": peak}
    out.update({f"step_{k}": v for k, v in stats(out["step_times_ms"]).items()})
    state = parameter_state_bytes(list(model.parameters()), optimizer)
    if mode == "element":
        state += sum(nbytes(m) for m in dpr.structure.masks)
    if mode == "block":
        state += layout_nbytes([m.layout for m in dpr.structure.layers])
        out["layers_kept_dense"] = dpr.dense_layers
    out["state_bytes"] = state
    realloc_ms = 0.0
    if dpr is not None:  # N_p: the library default, 0.138 of the active units (the paper's 20,000 of WRN-28-2)
        out["realloc_times_ms"] = time_ms(dpr.reallocate, cfg["device"], rep_ms=cfg["rep_ms"], **timer)
        realloc_ms = stats(out["realloc_times_ms"])["median_ms"]
        out["target_pruned"] = dpr.target_pruned
        out["density"] = sum(dpr.nonzero_counts()) / sum(dpr.structure.dense_numels)
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
