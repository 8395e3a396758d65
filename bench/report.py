"""What a throughput result says: the issue's targets, rich tables, PNG plots, the markdown summary,
the JSON layout (one line per measured row) and the merge of shard files.

A result is the dict bench/throughput.py builds: ``provenance`` (blockdpr.runinfo), ``config``,
``smoke`` / ``timings_meaningless``, ``complete``, and the row lists ``layers``, ``training``,
``memory``, plus ``targets``.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from bench.shapes import PASSES, SHAPES
from blockdpr.cli import escape
from blockdpr.runinfo import atomic_write_text, slug

__all__ = ["gpu_name", "targets", "print_tables", "plot", "markdown_summary", "write_outputs", "dump_json",
           "output_stem", "merge"]


def gpu_name(result: dict) -> str | None:
    """The GPU a result was measured on (None: CPU)."""
    return result["provenance"]["device"].get("gpu_name")


def targets(result: dict) -> list[dict]:
    """The issue's targets, checked on the rows present (measured = None when a row is missing)."""
    layers, train, memory = result["layers"], result["training"], result["memory"]

    def layer(layer_id, pass_, impl, sparsity, block, batch):
        return next((r.get("speedup") for r in layers if r["layer"] == layer_id and r.get("pass") == pass_
                     and r["impl"] == impl and r.get("sparsity") == sparsity and r.get("block") == block
                     and r["batch"] == batch and r["dtype"] == "bf16" and r.get("status") == "ok"), None)

    def bsr_ratio():
        mine = next((r for r in layers if r["layer"] == "linear/4096" and r.get("pass") == "fwd" and r["impl"] == "block"
                     and r.get("sparsity") == 0.9 and r.get("block") == 64 and r["batch"] == 8192
                     and r["dtype"] == "bf16" and r.get("status") == "ok"), None)
        bsr = next((r for r in layers if r["layer"] == "linear/4096" and r["impl"] == "bsr" and r.get("sparsity") == 0.9
                    and r.get("block") == 64 and r["batch"] == 8192 and r["dtype"] == "bf16"
                    and r.get("status") == "ok"), None)
        return bsr["median_ms"] / mine["median_ms"] if mine and bsr else None

    out = []

    def add(what, need, measured):
        out.append({"target": what, "required": need, "measured": measured,
                    "met": None if measured is None else measured >= need})

    conv = "conv 3x3 640->640 8x8 batch 256 fwd+bwd bf16 block 32, x cuDNN"
    add(f"{conv} at 90%", 6.0, layer("wrn-28-10/g3", "fwdbwd", "block", 0.9, 32, 256))
    add(f"{conv} at 80%", 3.5, layer("wrn-28-10/g3", "fwdbwd", "block", 0.8, 32, 256))
    add(f"{conv} at 50%", 1.0, layer("wrn-28-10/g3", "fwdbwd", "block", 0.5, 32, 256))
    lin = "linear 4096x4096 8192 tokens bf16 90% block 64"
    add(f"{lin} fwd+bwd, x cuBLAS", 7.0, layer("linear/4096", "fwdbwd", "block", 0.9, 64, 8192))
    add(f"{lin} fwd, x cuBLAS", 7.0, layer("linear/4096", "fwd", "block", 0.9, 64, 8192))
    add(f"{lin} fwd, x torch.sparse BSR", 1.0, bsr_ratio())
    for r in train:
        if r["model"] == "wrn-28-10" and r["mode"] == "block" and r["sparsity"] == 0.9 and r["dtype"] == "bf16":
            add(f"WRN-28-10 step batch {r['batch']} block {r['block']} 90%, x dense img/s", 3.0, r.get("speedup"))
    for r in memory:
        if r["model"] == "WRN-28-10" and r["sparsity"] == 0.9:
            # required is a floor on dense / block, i.e. block <= 13% of dense
            add(f"WRN-28-10 sparse-layer param+grad+opt bytes block {r['block']} 90%, dense / block",
                1 / 0.13, 1 / r["ratio"])
    return out


def fmt_x(v) -> str:
    return "-" if v is None else f"{v:.2f}"


def print_tables(result: dict, console) -> None:
    """Layer table (one row per layer, dtype, pass, sparsity; a column per block), training, targets."""
    from rich.table import Table

    if result["smoke"]:
        console.print("[bold red]SMOKE MODE: tiny shapes on " + result["provenance"]["device"]["device"]
                      + ". These timings mean NOTHING; run on a CUDA GPU for real numbers.[/]")
    if not result.get("complete", True):
        console.print("[bold yellow]INCOMPLETE: this run stopped before all its work items were measured.[/]")
    layers = result["layers"]
    blocks = sorted({r["block"] for r in layers if r["impl"] == "block" and r.get("status") == "ok"})
    t = Table(title=f"layers: speedup vs dense (median; ideal = 1/density) on {gpu_name(result) or 'CPU'}")
    for col in ["layer", "shape", "dtype", "pass", "sparsity", "dense ms", "masked x",
                f"bsr x (b{blocks[-1] if blocks else '-'})"] + \
               [f"b{b} x" for b in blocks] + [f"{c} (b{blocks[-1] if blocks else '-'})" for c in ("ideal x", "ceiling x")]:
        t.add_column(col, justify="right")
    keys = sorted({(r["layer"], r["dtype"], r["pass"]) for r in layers if r["impl"] == "dense" and r.get("status") == "ok"},
                  key=lambda k: ([s.id for s in SHAPES].index(k[0]) if k[0] in [s.id for s in SHAPES] else 999, k[1],
                                 PASSES.index(k[2])))
    for layer_id, dtype, pass_ in keys:
        sel = [r for r in layers if r["layer"] == layer_id and r["dtype"] == dtype and r.get("status") == "ok"]
        dense = next(r for r in sel if r["impl"] == "dense" and r["pass"] == pass_)
        masked = next((r for r in sel if r["impl"] == "masked" and r["pass"] == pass_), None)
        shape = next((s.describe() for s in SHAPES if s.id == layer_id), "")
        for sparsity in sorted({r["sparsity"] for r in sel if r["impl"] == "block"}):
            cell = {b: next((r for r in sel if r["impl"] == "block" and r["pass"] == pass_ and r["block"] == b
                             and r["sparsity"] == sparsity), None) for b in blocks}
            last = cell[blocks[-1]] if blocks else None
            bsr = next((r for r in sel if r["impl"] == "bsr" and r["pass"] == pass_ and r["sparsity"] == sparsity
                        and blocks and r["block"] == blocks[-1]), None)
            t.add_row(layer_id, shape, dtype, pass_, f"{sparsity:.2f}", f"{dense['median_ms']:.3f}",
                      fmt_x(masked and masked.get("speedup")), fmt_x(bsr and bsr.get("speedup")),
                      *[fmt_x(c and c.get("speedup")) for c in cell.values()], fmt_x(last and last["ideal"]),
                      fmt_x(last and last.get("roofline_ceiling")))
    if keys:
        console.print(t)
    skipped = sorted({(r["layer"], r["block"]) for r in layers if r.get("status") == "skipped"})
    if skipped:
        console.print("not tiled by the block (skipped): " + ", ".join(f"{l} b{b}" for l, b in skipped))
    failed = [r for r in layers if r.get("status") == "failed"]
    for r in failed[:10]:
        console.print(f"[yellow]failed:[/] {r['layer']} {r['dtype']} {r['impl']} {r.get('pass')} "
                      f"block {r.get('block')} s={r.get('sparsity')}: {escape(r['error'])}")
    if len(failed) > 10:
        console.print(f"[yellow]... and {len(failed) - 10} more failed layer measurements (see the JSON)[/]")

    if result["training"]:
        t = Table(title="training step (forward, backward, SGD step, reallocation / period)")
        for col in ("model", "batch", "dtype", "mode", "block", "sparsity", "step ms", "realloc ms", "img/s",
                    "x dense", "peak MB", "state MB", "state / dense"):
            t.add_column(col, justify="right")
        for r in result["training"]:
            ok = r["status"] == "ok"
            t.add_row(r["model"], str(r["batch"]), r["dtype"], r["mode"], str(r["block"] or "-"), f"{r['sparsity']:.2f}",
                      f"{r['step_median_ms']:.2f}" if ok else r["status"], f"{r['realloc_ms']:.2f}" if ok else "-",
                      f"{r['images_per_s']:.0f}" if ok else "-", fmt_x(r.get("speedup")),
                      f"{r['peak_bytes'] / 2**20:.0f}" if ok and r["peak_bytes"] else "-",
                      f"{r['state_bytes'] / 2**20:.1f}" if ok else "-", fmt_x(r.get("state_ratio")))
        console.print(t)
    if result["memory"]:
        t = Table(title="sparse layers: parameters + gradients + SGD momentum (bench/memory.py)")
        for col in ("model", "sparsity", "block", "dense MB", "block MB", "block / dense", "kept dense"):
            t.add_column(col, justify="right")
        for r in result["memory"]:
            t.add_row(r["model"], f"{r['sparsity']:.2f}", str(r["block"]), f"{r['dense_bytes'] / 1e6:.2f}",
                      f"{r['block_bytes'] / 1e6:.2f}", f"{r['ratio']:.3f}", str(len(r["layers_kept_dense"])))
        console.print(t)
    t = Table(title="targets (bf16; met = measured >= required)")
    for col in ("target", "required", "measured", "met"):
        t.add_column(col, justify="right")
    for r in result["targets"]:
        t.add_row(r["target"], f">= {r['required']:.2f}", fmt_x(r["measured"]),
                  "-" if r["met"] is None else ("yes" if r["met"] else "NO"))
    console.print(t)


def plot(result: dict, path_stem: Path) -> list[Path]:
    """A PNG per dtype: one panel per layer, speedup vs density, a line per block size (the last of the
    run's passes, fwdbwd by default), the masked-dense peer and the ideal 1/density line."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (used as matplotlib.ticker)

    layers = [r for r in result["layers"] if r.get("status") == "ok"]
    paths = []
    for dtype in sorted({r["dtype"] for r in layers}):
        rows = [r for r in layers if r["dtype"] == dtype]
        passes = [p for p in PASSES if any(r["pass"] == p and r["impl"] == "block" for r in rows)]
        if not passes:
            continue
        pass_ = passes[-1]
        ids = [s.id for s in SHAPES if any(r["layer"] == s.id for r in rows)]
        ncols = min(4, len(ids))
        nrows = math.ceil(len(ids) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.4 * nrows), squeeze=False)
        for ax, layer_id in zip(axes.flat, ids):
            sel = [r for r in rows if r["layer"] == layer_id and r["pass"] == pass_]
            densities = sorted({r["density"] for r in sel if r["impl"] == "block"})
            for block in sorted({r["block"] for r in sel if r["impl"] == "block"}):
                pts = sorted((r["density"], r["speedup"]) for r in sel
                             if r["impl"] == "block" and r["block"] == block and "speedup" in r)
                if pts:
                    ax.plot(*zip(*pts), "o-", label=f"block {block}")
            if densities:
                d = np.geomspace(min(densities), 1, 50)
                ax.plot(d, 1 / d, "k--", lw=1, label="ideal 1/density")
            masked = next((r for r in sel if r["impl"] == "masked" and "speedup" in r), None)
            if masked:
                ax.axhline(masked["speedup"], color="gray", ls=":", label="masked dense")
            ax.axhline(1, color="k", lw=0.5)
            ax.set_xscale("log")
            ax.set_yscale("log")
            ticks = [t for t in (0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0) if min(densities or [1]) <= t]
            ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
            ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            # log y: labels at 1-2-5 steps only (the default labels every minor tick, overlapping)
            ax.yaxis.set_major_locator(matplotlib.ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
            ax.yaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter("%g"))
            ax.yaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
            shape = next(s for s in SHAPES if s.id == layer_id)
            ax.set_title(f"{layer_id}: {shape.describe()}", fontsize=9)
            ax.set_xlabel("density")
            ax.set_ylabel(f"{pass_} speedup vs dense")
        for ax in list(axes.flat)[len(ids):]:
            ax.axis("off")
        legend = {}  # one legend for the figure, readable, from every panel's lines
        for ax in list(axes.flat)[:len(ids)]:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=min(6, len(legend)), fontsize=10,
                   frameon=False)
        device = gpu_name(result) or "CPU"
        title = f"block-sparse {pass_} speedup over dense, {dtype}, {device}"
        if result["smoke"]:
            title = "SMOKE MODE (timings meaningless): " + title
        fig.suptitle(title)
        fig.tight_layout(rect=(0, 0.06, 1, 1))  # room for the legend below the panels
        path = path_stem.with_name(f"{path_stem.name}-{dtype}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def markdown_summary(result: dict, json_name: str) -> str:
    """README-ready summary: targets and training steps, with the device and the results file."""
    dev, ver = result["provenance"]["device"], result["provenance"]["versions"]
    lines = ["**SMOKE MODE: tiny shapes, these timings mean nothing.**", ""] if result["timings_meaningless"] else []
    lines += [f"Device: {dev.get('gpu_name') or 'CPU'} (driver {dev.get('driver')}, CUDA {ver.get('cuda')}, "
             f"torch {ver.get('torch')}, triton {ver.get('triton')}); git {result['provenance']['git']['commit']}; "
             f"results `{json_name}`.", "",
             "| target | required | measured | met |", "| --- | --- | --- | --- |"]
    for r in result["targets"]:
        met = "-" if r["met"] is None else ("yes" if r["met"] else "no")
        lines.append(f"| {r['target']} | >= {r['required']:.2f} | {fmt_x(r['measured'])} | {met} |")
    if result["training"]:
        lines += ["", "| model | batch | mode | block | sparsity | img/s | x dense | peak MiB |",
                  "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in result["training"]:
            if r["status"] == "ok":
                peak = f"{r['peak_bytes'] / 2**20:.0f}" if r["peak_bytes"] else "-"
                lines.append(f"| {r['model']} | {r['batch']} | {r['mode']} | {r['block'] or '-'} | {r['sparsity']} | "
                             f"{r['images_per_s']:.0f} | {fmt_x(r.get('speedup'))} | {peak} |")
    return "\n".join(lines) + "\n"


def write_outputs(result: dict, out_dir: Path, stem: str, console, make_plot: bool = True) -> dict:
    """JSON, PNGs and the markdown summary; returns their paths."""
    json_path = out_dir / f"{stem}.json"
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": json_path}
    if make_plot:
        paths["png"] = plot(result, out_dir / stem)
    result["outputs"] = {k: [str(p) for p in v] if isinstance(v, list) else str(v) for k, v in paths.items()}
    atomic_write_text(json_path, dump_json(result))
    md = out_dir / f"{stem}.md"
    atomic_write_text(md, markdown_summary(result, json_path.name))
    paths["md"] = md
    console.print(f"wrote {json_path}, {md}" + "".join(f", {p}" for p in paths.get("png", [])))
    return paths


def dump_json(result: dict) -> str:
    """JSON with one line per measured row (the raw timings make rows long, the file stays diffable)."""
    parts = []
    for key, value in result.items():
        if key in ("layers", "training", "memory") and value:
            text = "[\n  " + ",\n  ".join(json.dumps(r) for r in value) + "\n ]"
        else:
            text = json.dumps(value, indent=1).replace("\n", "\n ")
        parts.append(f" {json.dumps(key)}: {text}")
    return "{\n" + ",\n".join(parts) + "\n}\n"


def output_stem(result: dict) -> str:
    """throughput-<device>-<UTC time>[-tag]; smoke runs always write throughput-smoke[-tag]."""
    tag = f"-{result['config']['tag']}" if result["config"].get("tag") else ""
    if result["smoke"]:
        return f"throughput-smoke{tag}"
    device = slug(gpu_name(result) or "cpu")
    created = result["provenance"]["time_utc"].replace(":", "").replace("-", "")[:15]
    return f"throughput-{device}-{created}{tag}"


def merge(paths: list[Path]) -> dict:
    """One result from several result files (shards of one sweep): rows concatenated, device checked."""
    parts = [json.loads(p.read_text()) for p in paths]
    gpus = {gpu_name(p) for p in parts}
    if len(gpus) > 1:
        raise SystemExit(f"--report: the files come from different devices {sorted(map(str, gpus))}; "
                         "speedups are only comparable within one device")
    result = dict(parts[0])
    result.update(complete=all(p.get("complete", True) for p in parts), smoke=any(p["smoke"] for p in parts),
                  timings_meaningless=any(p["timings_meaningless"] for p in parts),
                  sources=[{"file": str(path), "provenance": p["provenance"], "config": p["config"]}
                           for path, p in zip(paths, parts)],
                  layers=[r for p in parts for r in p["layers"]], training=[r for p in parts for r in p["training"]],
                  memory=[r for p in parts for r in p["memory"]])
    result["targets"] = targets(result)
    return result
