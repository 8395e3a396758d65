"""Measured block-sparse layer times set against the gather-aware roofline of bench/roofline.py.

    python -m bench.roofline_plot \\
        --throughput bench/results/nvidia-h200-20261128-before/throughput-nvidia-h200-20261128T162206-quick.json \\
        --profile bench/results/nvidia-h200-20261128-before/profile.log --out bench/results/roofline-h200

For every block-sparse bf16 row of a bench/throughput.py JSON: the measured speedup over the dense op of
the same run, the roofline's ceiling against that measured dense time (dense ms / predicted block-sparse
ms) and the bound, and the ceiling the JSON recorded from the model of its day. ``--profile`` adds the
kernel-only times of profile.log (the launchers alone, without the op's host work). Writes
``<out>.json`` and ``<out>.png`` (one panel per layer, speedup against sparsity).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from bench import roofline
from bench.shapes import by_id

PASS = "fwdbwd"


def compare_rows(throughput: dict) -> list[dict]:
    """One record per block-sparse bf16 row of a throughput JSON that the model covers."""
    device = roofline.device_for(throughput["environment"]["gpu_name"])
    if device is None:
        raise ValueError(f"no roofline device for GPU {throughput['environment']['gpu_name']!r}")
    cfg = throughput["config"]
    out = []
    for r in throughput["layers"]:
        if r["impl"] != "block" or r["dtype"] != "bf16" or r.get("status") != "ok":
            continue
        model = roofline.layer_roofline(by_id(r["layer"]), cfg["conv_batch"], cfg["tokens"], r["density"], r["block"],
                                        r["pass"], "bf16", throughput["environment"]["gpu_name"])
        if "roofline_ms" not in model:
            continue
        out.append(dict(layer=r["layer"], pass_=r["pass"], block=r["block"], sparsity=r["sparsity"],
                        measured_ms=r["median_ms"], dense_ms=r["dense_ms"], predicted_ms=model["roofline_ms"],
                        measured_x_dense=r["dense_ms"] / r["median_ms"],
                        ceiling_x_dense=r["dense_ms"] / model["roofline_ms"],
                        fraction_of_ceiling=model["roofline_ms"] / r["median_ms"],
                        recorded_ceiling=r.get("roofline_ceiling"), device=device))
    return out


def profile_rows(text: str, device: str = "h200") -> list[dict]:
    """Kernel-only fwd + dgrad + wgrad of profile.log (conv 640 8x8 batch 256, 90%) against cuDNN's."""
    lines = [json.loads(line) for line in text.splitlines() if line.startswith("{")]
    cudnn = next(r for r in lines if "cudnn_fwd_ms" in r)
    dense_ms = sum(cudnn[f"cudnn_{op}_ms"] for op in ("fwd", "dgrad", "wgrad"))
    shape = roofline.ConvShape(256, 640, 640, 8, 8)
    out = []
    for r in lines:
        if "fwd_ms" not in r:
            continue
        measured = sum(r[f"{op}_ms"] for op in ("fwd", "dgrad", "wgrad"))
        predicted = sum(roofline.predict(op, shape, 0.1, r["block"], device=device)["seconds"] * 1e3
                        for op in ("fwd", "dgrad", "wgrad"))
        out.append(dict(layer="wrn-28-10/g3", pass_=PASS, block=r["block"], sparsity=0.9, measured_ms=measured,
                        dense_ms=dense_ms, predicted_ms=predicted, measured_x_dense=dense_ms / measured,
                        ceiling_x_dense=dense_ms / predicted, fraction_of_ceiling=predicted / measured,
                        kernels_only=True, device=device))
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted({r["layer"] for r in rows if r["pass_"] == PASS})
    fig, axes = plt.subplots(1, len(layers), figsize=(4.2 * len(layers), 4.2), squeeze=False, sharey=True)
    colours = {32: "tab:blue", 64: "tab:orange"}
    for ax, layer in zip(axes[0], layers):
        for block, colour in colours.items():
            sel = sorted((r for r in rows if r["layer"] == layer and r["pass_"] == PASS and r["block"] == block
                          and not r.get("kernels_only")), key=lambda r: r["sparsity"])
            if not sel:
                continue
            xs = [r["sparsity"] for r in sel]
            ax.plot(xs, [r["ceiling_x_dense"] for r in sel], "-", color=colour, label=f"ceiling, block {block}")
            ax.plot(xs, [r["measured_x_dense"] for r in sel], "o", color=colour, label=f"measured, block {block}")
            if block == 32 and all(r.get("recorded_ceiling") for r in sel):  # the old model: no block term
                ax.plot(xs, [r["recorded_ceiling"] for r in sel], ":", color="grey", label="old HBM-only ceiling")
            for r in rows:
                if r.get("kernels_only") and r["layer"] == layer and r["block"] == block:
                    shift = -0.01 if block == 32 else 0.01  # the two stars sit close together
                    ax.plot([r["sparsity"] + shift], [r["measured_x_dense"]], "*", ms=12, color=colour,
                            label=f"kernels alone (profile.log), block {block}")
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.set_yscale("log")
        ax.set_title(layer, fontsize=11)
        ax.set_xlabel("sparsity (fraction of blocks pruned)")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel(f"{PASS} speedup over the dense op (x)")
    legend = {}
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    fig.legend(legend.values(), legend.keys(), loc="lower center", ncol=4, fontsize=9, frameon=False)
    fig.suptitle(title, fontsize=11)
    fig.tight_layout(rect=(0, 0.12, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.roofline_plot", description=__doc__.split("\n\n")[0])
    parser.add_argument("--throughput", type=Path, required=True, help="a bench/throughput.py JSON (GPU run)")
    parser.add_argument("--profile", type=Path, help="a profile.log with kernel-only times (optional)")
    parser.add_argument("--out", type=Path, required=True, help="output path without suffix: writes OUT.json, OUT.png")
    args = parser.parse_args(argv)
    throughput = json.loads(args.throughput.read_text())
    rows = compare_rows(throughput)
    if args.profile:
        rows += profile_rows(args.profile.read_text(), rows[0]["device"] if rows else "h200")
    env = throughput["environment"]
    device = roofline.DEVICES[rows[0]["device"]] if rows else {}
    result = dict(source=str(args.throughput), profile=str(args.profile) if args.profile else None,
                  measured_commit=throughput["git"]["commit"], gpu=env["gpu_name"],
                  l2_rate=device.get("l2_rate"), rows=rows)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.with_suffix(".json").write_text(json.dumps(result, indent=1) + "\n")
    plot(rows, args.out.with_suffix(".png"),
         f"{env['gpu_name']}, bf16, commit {throughput['git']['commit'][:7]}: measured against the gather-aware "
         f"roofline (L2->SM {device.get('l2_rate', 0) / 1e12:.0f} TB/s)")
    print(f"wrote {args.out.with_suffix('.json')}, {args.out.with_suffix('.png')}")
    return result


if __name__ == "__main__":
    main()
