"""Figure 1 from finished run directories: the table and figures of python -m blockdpr.reproduce.

- `collect(dirs)`: every finished run (summary.json) below `dirs`, with its condition (`classify`)
  and the length of its schedule (`schedule_epochs`).
- `aggregate(runs)`: one row per condition, sparsity, stop epoch and schedule: final test
  accuracy in %, mean +- std (`mean_std`), n, and the published value beside it (PUBLISHED).
- `write_table(rows, out_dir)`: figure1.csv and figure1.md; `write_figures(rows, out_dir)`:
  figure1a.png and one stop-epoch panel per sparsity (figure1b.png, ...).
- `report(dirs, out_dir)`: all of the above, printed.
"""

from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

from rich.console import Console

from .matrix import CONDITIONS, Schedule

console = Console(stderr=True, soft_wrap=True)

LABELS = {"dense": "dense", "dpr": "DPR", "reinit": "final structure + random re-init",
          "orig-init": "final structure + original init", "static": "static random structure",
          "gmp": "compressed (gradual pruning)", "stop": "DPR stopped at epoch E"}
# What the DSR authors published for WRN-28-2 on CIFAR-10 (mean +- std of 5 runs; dense: mean).
PUBLISHED = {("dense", None): (94.70, None), ("dpr", 0.9): (93.59, 0.17), ("dpr", 0.8): (94.40, 0.11),
             ("static", 0.9): (92.04, 0.31), ("static", 0.8): (93.48, 0.11),
             ("gmp", 0.9): (93.75, 0.08), ("gmp", 0.8): (94.13, 0.13)}


def classify(summary: dict, dpr_stop: int | None = None) -> tuple[str, float | None, int | None]:
    """(condition, sparsity, stop epoch) of a finished run from its summary.json.

    A DPR run is the full DPR condition when it stopped reallocating at or after the DPR stop of
    its schedule (dpr_stop, default: 190 scaled to its epochs), otherwise a point of the sweep."""
    mode = summary["mode"]
    if mode == "dense":
        return "dense", None, None
    sparsity = round(float(summary["sparsity"]), 6)
    if mode == "dpr":
        stop = summary.get("dpr_stop_epoch")
        full = dpr_stop if dpr_stop is not None else Schedule.scaled_from_paper(summary["epochs"]).dpr_stop
        stop = min(stop, summary["epochs"]) if stop is not None else summary["epochs"]
        return ("dpr", sparsity, stop) if stop >= full else ("stop", sparsity, stop)
    return mode, sparsity, None


def schedule_epochs(run_dir: Path, summary: dict) -> int:
    """The length of the schedule a run belongs to: its epochs, or for gmp those of its dense run."""
    if summary["mode"] != "gmp":
        return summary["epochs"]
    try:
        dense = Path(json.loads((run_dir / "config.json").read_text())["dense_from"])
        return json.loads((dense / "summary.json").read_text())["epochs"]
    except (OSError, KeyError, TypeError, ValueError):
        return summary["epochs"]


def collect(dirs: list[Path]) -> list[dict]:
    """Every finished run (summary.json) in or below `dirs`, with its condition."""
    found = {}
    for d in dirs:
        if not d.exists():
            raise SystemExit(f"no such directory: {d}")
        for path in sorted([d / "summary.json"] if (d / "summary.json").is_file() else d.rglob("summary.json")):
            summary = json.loads(path.read_text())
            condition, sparsity, stop = classify(summary)
            found[path.parent.resolve()] = {**summary, "condition": condition, "sparsity": sparsity, "stop": stop,
                                           "schedule": schedule_epochs(path.parent, summary), "run_dir": str(path.parent)}
    return list(found.values())


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (condition, sparsity, stop epoch, schedule): final test accuracy in %, mean, std, n.
    schedule: the epochs of the runs (gmp: of the dense runs it pruned; its own epochs are `epochs`)."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["condition"], r["sparsity"], r["stop"], r["schedule"]), []).append(r)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows = []
    for (condition, sparsity, stop, schedule), members in sorted(
            groups.items(), key=lambda kv: (kv[0][3], order[kv[0][0]], -(kv[0][1] or 0), kv[0][2] or 0)):
        mean, std = mean_std([100 * m["final_test_acc"] for m in members])
        paper = PUBLISHED.get((condition, sparsity if condition != "dense" else None))
        rows.append({"condition": condition, "label": LABELS[condition], "sparsity": sparsity, "stop_epoch": stop,
                     "schedule": schedule, "epochs": sorted({m["epochs"] for m in members}), "n": len(members), "mean": mean, "std": std,
                     "seeds": sorted(m["seed"] for m in members),
                     "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None,
                     "data": sorted({m.get("data", "?") for m in members})})
    return rows


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else "")


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """figure1.csv (every row) and figure1.md (the table for the results page)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "figure1.csv", out_dir / "figure1.md"
    fields = ["condition", "sparsity", "stop_epoch", "schedule", "epochs", "n", "mean", "std", "paper_mean", "paper_std", "seeds", "data"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]) for k in fields})
    lines = ["| condition | sparsity | DPR stopped after epoch | schedule (epochs) | test accuracy % (mean +- std) | n | published (DSR paper, 200 epochs) |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['label']} | {'' if r['sparsity'] is None else r['sparsity']} | "
                     f"{'' if r['stop_epoch'] is None else r['stop_epoch']} | {r['schedule']}"
                     f"{' + ' + '/'.join(map(str, r['epochs'])) + ' fine-tuning' if r['condition'] == 'gmp' else ''} | "
                     f"{fmt(r['mean'], r['std'])} | "
                     f"{r['n']} | {fmt(r['paper_mean'], r['paper_std'])} |")
    data = sorted({d for r in rows for d in r["data"]})
    lines += ["", f"Final test accuracy after the last epoch; std is the sample standard deviation over trials (n - 1). "
                  f"Data: {', '.join(data) or '?'}."]
    md_path.write_text("\n".join(lines) + "\n")
    return csv_path, md_path


def write_figures(rows: list[dict], out_dir: Path) -> list[Path]:
    """figure1a.png (bars per condition and sparsity) and one stop-epoch panel per sparsity
    (figure1b.png for the first sparsity, figure1c.png for the second, ...)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    schedules = sorted({r["schedule"] for r in rows})
    for epochs in schedules:
        suffix = "" if len(schedules) == 1 else f"-e{epochs}"
        sel = [r for r in rows if r["schedule"] == epochs]
        sparsities = sorted({r["sparsity"] for r in sel if r["sparsity"] is not None}, reverse=True)

        # Figure 1a: bars per condition, one group per sparsity; dense as a line.
        bar_conditions = [c for c in ("dpr", "reinit", "orig-init", "static", "gmp")
                          if any(r["condition"] == c for r in sel)]
        fig, ax = plt.subplots(figsize=(7, 4))
        width = 0.8 / max(1, len(bar_conditions))
        for i, c in enumerate(bar_conditions):
            xs, ys, es = [], [], []
            for j, s in enumerate(sparsities):
                match = [r for r in sel if r["condition"] == c and r["sparsity"] == s]
                if match:
                    xs.append(j + (i - (len(bar_conditions) - 1) / 2) * width)
                    ys.append(match[0]["mean"])
                    es.append(match[0]["std"] or 0.0)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=LABELS[c])
            published = [(x, PUBLISHED[(c, s)][0]) for x, s in zip(xs, [s for s in sparsities if any(
                r["condition"] == c and r["sparsity"] == s for r in sel)]) if (c, s) in PUBLISHED]
            if published:
                ax.scatter(*zip(*published), marker="_", s=200, color="k", zorder=3,
                           label="published (DSR paper)" if c == "dpr" else None)
        for r in sel:
            if r["condition"] == "dense":
                ax.axhline(r["mean"], color="k", ls="--", lw=1, label=f"dense ({r['mean']:.2f})")
        ax.set_xticks(range(len(sparsities)), [f"sparsity {s}" for s in sparsities])
        ax.set_ylabel("test accuracy (%)")
        values = [r["mean"] - (r["std"] or 0) for r in sel] + [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
        if values:
            top = [r["mean"] + (r["std"] or 0) for r in sel] + [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
            ax.set_ylim(max(0.0, min(values) - 2), min(100.0, max(top) + 1.5))
        ax.set_title(f"Figure 1a: {epochs}-epoch schedule, mean +- std over trials")
        ax.legend(fontsize=7, loc="best")
        save(fig, f"figure1a{suffix}.png")

        # Figure 1b, 1c: accuracy against the epoch at which DPR stopped; gmp and static as bands.
        for letter, s in zip("bcdefgh", sparsities):
            points = sorted((r for r in sel if r["sparsity"] == s and r["condition"] in ("stop", "dpr")),
                            key=lambda r: r["stop_epoch"])
            if not points:
                continue
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.errorbar([r["stop_epoch"] for r in points], [r["mean"] for r in points],
                        yerr=[r["std"] or 0.0 for r in points], marker="o", capsize=3, label="DPR stopped after epoch E")
            for c, color in (("gmp", "tab:green"), ("static", "tab:red")):
                for r in (r for r in sel if r["condition"] == c and r["sparsity"] == s):
                    lo, hi = r["mean"] - (r["std"] or 0.0), r["mean"] + (r["std"] or 0.0)
                    ax.axhspan(lo, hi, color=color, alpha=0.25)
                    ax.axhline(r["mean"], color=color, lw=1, label=f"{LABELS[c]} ({fmt(r['mean'], r['std'])})")
            ax.set_xlabel("epoch at which DPR stopped (E)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Figure 1{letter}: sparsity {s}, {epochs} epochs")
            ax.legend(fontsize=7, loc="lower right")
            save(fig, f"figure1{letter}{suffix}.png")
    return written


def report(dirs: list[Path], out_dir: Path) -> list[dict]:
    runs = collect(dirs)
    if not runs:
        raise SystemExit(f"no finished runs (summary.json) in {', '.join(map(str, dirs))}")
    rows = aggregate(runs)
    csv_path, md_path = write_table(rows, out_dir)
    figures = write_figures(rows, out_dir)
    console.print(md_path.read_text())
    console.print(f"wrote {csv_path}, {md_path}, " + ", ".join(str(p) for p in figures))
    return rows
