"""Figure 1 from finished run directories: the table and figures of python -m blockdpr.reproduce.

- `collect(dirs)`: every finished run (summary.json) below `dirs`, with its condition (`classify`)
  and the length of its schedule (`schedule_epochs`).
- `aggregate(runs)`: one row per setting (model, schedule, training images), condition, sparsity
  and stop epoch: final test accuracy in %, mean +- std (`mean_std`), n, the DPR runs'
  reallocations and units moved (a condition that barely reallocated is marked: `barely_dynamic`),
  its runs, and the published value (PUBLISHED), shown as comparable only for the paper's setting.
- `write_table(rows, out_dir)`: figure1.csv and figure1.md, a titled table per setting;
  `write_figures(rows, out_dir)`: figure1a.png and one stop-epoch panel per sparsity (figure1b.png, ...).
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


class ReportError(ValueError):
    """Nothing to aggregate: a directory that does not exist, or no finished run in it."""

LABELS = {"dense": "dense", "dpr": "DPR", "reinit": "final structure + random re-init",
          "orig-init": "final structure + original init", "static": "static random structure",
          "gmp": "compressed (gradual pruning)", "stop": "DPR stopped at epoch E"}
# What the DSR authors published for WRN-28-2 on CIFAR-10 (mean +- std of 5 runs; dense: mean).
PUBLISHED = {("dense", None): (94.70, None), ("dpr", 0.9): (93.59, 0.17), ("dpr", 0.8): (94.40, 0.11),
             ("static", 0.9): (92.04, 0.31), ("static", 0.8): (93.48, 0.11),
             ("gmp", 0.9): (93.75, 0.08), ("gmp", 0.8): (94.13, 0.13)}
# A DPR condition is marked as barely dynamic below these, per run (see barely_dynamic).
MIN_REALLOCATIONS, MIN_MOVED = 10, 0.5


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


def run_facts(run_dir: Path) -> dict:
    """What a run's config.json says about its setting and provenance (None where it does not)."""
    try:
        config = json.loads((run_dir / "config.json").read_text())
    except (OSError, ValueError):
        config = {}
    prov = config.get("provenance") or {}
    return {"train_images": (config.get("dataset") or {}).get("train_images"),
            "test_images": (config.get("dataset") or {}).get("test_images"),
            "device": device_text(prov.get("device") or {}) or config.get("device_name"),
            "torch": (prov.get("versions") or {}).get("torch"),
            "commit": (prov.get("git") or {}).get("commit"),
            "block_size": config.get("block_size") if config.get("granularity") == "block" else None}


def device_text(device: dict) -> str | None:
    """'NVIDIA H200' or 'CPU x86_64, 2 cores' from a run's provenance (None if not recorded)."""
    if device.get("gpu_name"):
        return device["gpu_name"]
    if device.get("cpu"):
        return f"CPU {device['cpu']}, {device.get('cpu_count', '?')} cores"
    return None


def collect(dirs: list[Path]) -> list[dict]:
    """Every finished run (summary.json) in or below `dirs`, with its condition and setting. Raises
    ReportError naming a directory that does not exist."""
    found = {}
    for d in dirs:
        if not d.is_dir():
            raise ReportError(f"--aggregate-only: no such directory: {d}")
        for path in sorted([d / "summary.json"] if (d / "summary.json").is_file() else d.rglob("summary.json")):
            summary = json.loads(path.read_text())
            condition, sparsity, stop = classify(summary)
            facts = run_facts(path.parent)
            found[path.parent.resolve()] = {**summary, **facts, "condition": condition,
                                           "sparsity": sparsity, "stop": stop, "model": model_name(summary, facts["block_size"]),
                                           "schedule": schedule_epochs(path.parent, summary), "run_dir": str(path.parent)}
    return list(found.values())


def model_name(summary: dict, block_size: int | None = None) -> str:
    """'WRN-28-2', or 'WRN-28-2 block 16' in block mode."""
    name = f"WRN-{summary.get('depth', '?')}-{summary.get('width', '?')}"
    return name + (f" block {block_size or '?'}" if summary.get("granularity") == "block" else "")


def mean_std(values: list[float]) -> tuple[float, float | None]:
    """Mean and sample standard deviation (n - 1; None for a single value)."""
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else None)


def moved_fraction(run: dict) -> float | None:
    """Units DPR moved over the run, as a multiple of its active units (None if not recorded)."""
    if run.get("units_moved") is None or not run.get("active_units"):
        return None
    return run["units_moved"] / run["active_units"]


def barely_dynamic(reallocations: float | None, moved: float | None) -> bool:
    """A DPR condition whose runs reallocated too little to differ from a static structure: fewer
    than MIN_REALLOCATIONS reallocations or less than MIN_MOVED of the active units moved, per run."""
    return (reallocations is not None and reallocations < MIN_REALLOCATIONS) or (moved is not None and moved < MIN_MOVED)


def is_paper_setting(row: dict) -> bool:
    """Runs with the paper's model, data size and schedule: the published values are comparable."""
    return row["model"] == "WRN-28-2" and row["schedule"] == 200 and row["train_images"] in (None, 50_000)


def aggregate(runs: list[dict]) -> list[dict]:
    """One row per (setting, condition, sparsity, stop epoch): final test accuracy in %, mean, std, n;
    the DPR runs' reallocations and units moved (means per run); the runs themselves ("runs").
    The setting is the model, schedule (gmp: that of the dense runs it pruned) and training images."""
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        key = (r["model"], r["schedule"], r.get("train_images"), r["condition"], r["sparsity"], r["stop"])
        groups.setdefault(key, []).append(r)
    order = {c: i for i, c in enumerate(CONDITIONS)}
    rows = []
    for (model, schedule, images, condition, sparsity, stop), members in sorted(
            groups.items(), key=lambda kv: (kv[0][0], kv[0][1], kv[0][2] or 0, order[kv[0][3]], -(kv[0][4] or 0), kv[0][5] or 0)):
        members = sorted(members, key=lambda m: m["seed"])
        mean, std = mean_std([100 * m["final_test_acc"] for m in members])
        paper = PUBLISHED.get((condition, sparsity if condition != "dense" else None))
        dpr = condition in ("dpr", "stop")
        counts = [m["reallocations"] for m in members if m.get("reallocations") is not None] if dpr else []
        moved = [f for f in map(moved_fraction, members) if f is not None] if dpr else []
        realloc = statistics.fmean(counts) if counts else None
        moved_mean = statistics.fmean(moved) if moved else None
        rows.append({"condition": condition, "label": LABELS[condition], "sparsity": sparsity, "stop_epoch": stop,
                     "model": model, "schedule": schedule, "train_images": images,
                     "epochs": sorted({m["epochs"] for m in members}), "n": len(members), "mean": mean, "std": std,
                     "seeds": [m["seed"] for m in members],
                     "reallocations": realloc, "moved_fraction": moved_mean,
                     "barely_dynamic": dpr and barely_dynamic(realloc, moved_mean),
                     "paper_mean": paper[0] if paper else None, "paper_std": paper[1] if paper else None,
                     "data": sorted({m.get("data", "?") for m in members}),
                     "provenance": {k: sorted({str(m[k])[:12] if k == "commit" else m[k] for m in members
                                               if m.get(k) is not None}) for k in ("device", "torch", "commit", "test_images")},
                     "runs": [{"run": Path(m["run_dir"]).name, "seed": m["seed"], "test_acc": 100 * m["final_test_acc"],
                               "reallocations": m.get("reallocations") if dpr else None,
                               "units_moved": m.get("units_moved") if dpr else None,
                               "moved_fraction": moved_fraction(m) if dpr else None} for m in members]})
    return rows


def fmt(mean: float | None, std: float | None) -> str:
    if mean is None:
        return ""
    return f"{mean:.2f}" + (f" +- {std:.2f}" if std is not None else "")


def setting_title(rows: list[dict]) -> str:
    """'WRN-10-1, 12 epochs, 10,000 training images, CIFAR-10 (JPEG q75)' for rows of one setting."""
    r = rows[0]
    images = f"{r['train_images']:,}" if r["train_images"] else "?"
    data = ", ".join(sorted({d for row in rows for d in row["data"]})) or "?"
    return f"{r['model']}, {r['schedule']} epochs, {images} training images, {data}"


def settings(rows: list[dict]) -> list[list[dict]]:
    """The rows split by setting (model, schedule, training images), in order."""
    groups: dict[tuple, list[dict]] = {}
    for r in rows:
        groups.setdefault((r["model"], r["schedule"], r["train_images"]), []).append(r)
    return list(groups.values())


def label(row: dict) -> str:
    """The condition's name, marked when its DPR runs barely reallocated."""
    return row["label"] + (" (almost no reallocation: in effect static)" if row["barely_dynamic"] else "")


def realloc_text(reallocations: float | None, moved: float | None) -> str:
    if reallocations is None:
        return ""
    return f"{reallocations:.0f}" + (f" ({moved:.2f}x)" if moved is not None else "")


def markdown_table(rows: list[dict]) -> list[str]:
    """The table of one setting: a row per condition (mean +- std, n, reallocations, the paper's values)."""
    paper = "published (DSR paper)" if is_paper_setting(rows[0]) else "paper, 200 epochs, WRN-28-2 (not this setting)"
    lines = [f"| condition | sparsity | DPR stopped after epoch | test accuracy % (mean +- std) | n | "
             f"DPR reallocations per run (units moved / active units) | {paper} |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        gmp = f" ({'/'.join(map(str, r['epochs']))} fine-tuning epochs)" if r["condition"] == "gmp" else ""
        lines.append(f"| {label(r)}{gmp} | {'' if r['sparsity'] is None else r['sparsity']} | "
                     f"{'' if r['stop_epoch'] is None else r['stop_epoch']} | {fmt(r['mean'], r['std'])} | {r['n']} | "
                     f"{realloc_text(r['reallocations'], r['moved_fraction'])} | {fmt(r['paper_mean'], r['paper_std'])} |")
    return lines


def per_run_table(rows: list[dict]) -> list[str]:
    """Every run of one setting: test accuracy and, for DPR, its reallocations and units moved."""
    lines = ["| run | condition | seed | test accuracy % | reallocations | units moved (x active units) |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        for m in r["runs"]:
            moved = "" if m["units_moved"] is None else f"{m['units_moved']:,}" + (
                f" ({m['moved_fraction']:.2f}x)" if m["moved_fraction"] is not None else "")
            lines.append(f"| {m['run']} | {r['label']} | {m['seed']} | {m['test_acc']:.2f} | "
                         f"{'' if m['reallocations'] is None else m['reallocations']} | {moved} |")
    return lines


def table_notes(rows: list[dict]) -> list[str]:
    notes = ["Final test accuracy after the last epoch; std is the sample standard deviation over trials (n - 1). "
             "Units are weights (element mode) or blocks; the reallocations and units moved are means per run."]
    if any(r["barely_dynamic"] for r in rows):
        notes.append(f"Marked conditions made fewer than {MIN_REALLOCATIONS} reallocations or moved less than "
                     f"{MIN_MOVED:.0%} of the active units per run: their structure barely changed, so they do not "
                     "test dynamic reallocation.")
    if not is_paper_setting(rows[0]):
        notes.append("The paper's values are for WRN-28-2, 200 epochs, 50,000 training images of lossless CIFAR-10 "
                     "(mean +- std of 5 runs): another setting, shown for reference only.")
    return notes


def write_table(rows: list[dict], out_dir: Path) -> tuple[Path, Path]:
    """figure1.csv (every row) and figure1.md (a titled table per setting)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path, md_path = out_dir / "figure1.csv", out_dir / "figure1.md"
    fields = ["model", "schedule", "train_images", "condition", "sparsity", "stop_epoch", "epochs", "n", "mean", "std",
              "reallocations", "moved_fraction", "barely_dynamic", "paper_mean", "paper_std", "seeds", "data"]
    with open(csv_path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=fields)
        writer.writeheader()
        for r in rows:
            writer.writerow({k: (" ".join(map(str, r[k])) if isinstance(r[k], list) else r[k]) for k in fields})
    lines = []
    for group in settings(rows):
        lines += [f"## Figure 1: {setting_title(group)}", "", *markdown_table(group), "", *table_notes(group), ""]
    md_path.write_text("\n".join(lines))
    return csv_path, md_path


def write_figures(rows: list[dict], out_dir: Path) -> list[Path]:
    """figure1a.png (bars per condition and sparsity) and one stop-epoch panel per sparsity
    (figure1b.png for the first sparsity, figure1c.png for the second, ...), per setting (a suffix
    -<model>-e<epochs>-n<images> when there are several). Titles name the setting; the published
    values are drawn only for runs of the paper's setting."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    out_dir.mkdir(parents=True, exist_ok=True)
    written = []

    def save(fig, name: str) -> None:
        fig.tight_layout()
        fig.savefig(out_dir / name, dpi=120)
        plt.close(fig)
        written.append(out_dir / name)

    groups = settings(rows)
    for sel in groups:
        first = sel[0]
        suffix = "" if len(groups) == 1 else f"-{first['model'].replace(' ', '')}-e{first['schedule']}-n{first['train_images']}"
        title = setting_title(sel)
        paper = is_paper_setting(first)
        sparsities = sorted({r["sparsity"] for r in sel if r["sparsity"] is not None}, reverse=True)

        # Figure 1a: bars per condition, one group per sparsity; dense as a line.
        bar_conditions = [c for c in ("dpr", "reinit", "orig-init", "static", "gmp")
                          if any(r["condition"] == c for r in sel)]
        fig, ax = plt.subplots(figsize=(10, 4.5))
        width = 0.8 / max(1, len(bar_conditions))
        for i, c in enumerate(bar_conditions):
            xs, ys, es, ss = [], [], [], []
            for j, s in enumerate(sparsities):
                match = [r for r in sel if r["condition"] == c and r["sparsity"] == s]
                if match:
                    xs.append(j + (i - (len(bar_conditions) - 1) / 2) * width)
                    ys.append(match[0]["mean"])
                    es.append(match[0]["std"] or 0.0)
                    ss.append(s)
            ax.bar(xs, ys, width, yerr=es, capsize=3, label=label(next(r for r in sel if r["condition"] == c)))
            published = [(x, PUBLISHED[(c, s)][0]) for x, s in zip(xs, ss) if (c, s) in PUBLISHED]
            if paper and published:
                ax.scatter(*zip(*published), marker="_", s=200, color="k", zorder=3,
                           label="published (DSR paper)" if c == "dpr" else None)
        for r in sel:
            if r["condition"] == "dense":
                ax.axhline(r["mean"], color="k", ls="--", lw=1, label=f"dense ({fmt(r['mean'], r['std'])})")
        ax.set_xticks(range(len(sparsities)), [f"sparsity {s}" for s in sparsities])
        ax.set_ylabel("test accuracy (%)")
        low = [r["mean"] - (r["std"] or 0) for r in sel]
        high = [r["mean"] + (r["std"] or 0) for r in sel]
        if paper:
            low += [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
            high += [PUBLISHED[k][0] for k in PUBLISHED if k[1] in sparsities]
        if low:
            ax.set_ylim(max(0.0, min(low) - 2), min(100.0, max(high) + 1.5))
        ax.set_title(f"Figure 1a: {title}\nmean +- std over trials", fontsize=10)
        ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
        save(fig, f"figure1a{suffix}.png")

        # Figure 1b, 1c: accuracy against the epoch at which DPR stopped; gmp and static as bands.
        for letter, s in zip("bcdefgh", sparsities):
            points = sorted((r for r in sel if r["sparsity"] == s and r["condition"] in ("stop", "dpr")),
                            key=lambda r: r["stop_epoch"])
            if not any(r["condition"] == "stop" for r in points):  # no stop-epoch sweep at this sparsity
                continue
            fig, ax = plt.subplots(figsize=(9, 4.5))
            ax.errorbar([r["stop_epoch"] for r in points], [r["mean"] for r in points],
                        yerr=[r["std"] or 0.0 for r in points], marker="o", capsize=3, label="DPR stopped after epoch E")
            for c, color in (("gmp", "tab:green"), ("static", "tab:red")):
                for r in (r for r in sel if r["condition"] == c and r["sparsity"] == s):
                    lo, hi = r["mean"] - (r["std"] or 0.0), r["mean"] + (r["std"] or 0.0)
                    ax.axhspan(lo, hi, color=color, alpha=0.25)
                    ax.axhline(r["mean"], color=color, lw=1, label=f"{LABELS[c]} ({fmt(r['mean'], r['std'])})")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs are whole
            ax.set_xlabel("epoch at which DPR stopped (E)")
            ax.set_ylabel("test accuracy (%)")
            ax.set_title(f"Figure 1{letter}: sparsity {s}\n{title}", fontsize=10)
            ax.legend(fontsize=9, loc="upper left", bbox_to_anchor=(1.01, 1.0))
            save(fig, f"figure1{letter}{suffix}.png")
    return written


def report(dirs: list[Path], out_dir: Path) -> list[dict]:
    runs = collect(dirs)
    if not runs:
        raise ReportError(f"no finished runs (summary.json) in {', '.join(map(str, dirs))}")
    rows = aggregate(runs)
    csv_path, md_path = write_table(rows, out_dir)
    figures = write_figures(rows, out_dir)
    console.print(md_path.read_text())
    console.print(f"wrote {csv_path}, {md_path}, " + ", ".join(str(p) for p in figures))
    return rows
