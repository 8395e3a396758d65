"""The rules comparison of python -m blockdpr.reproduce --preset rules: DSR, SET, RigL and static.

Each rule at each sparsity and seed, at two granularities: element mode on WRN-<depth>-<width> and
block mode (32 x 32 blocks) on WRN-<depth>-<block width> (default 4: WRN-28-2's first group has 32
channels, one block row per conv, which 32 tiles badly; at width 4 every group has 2 or more).
Every rule uses the run's scaled reallocation periods (`--realloc-periods` of blockdpr.train is the
update period of every rule) and stops updating at the DPR stop epoch; DSR's N_p is the paper's
fraction of that model's active units (sparsity/schedule.py), set and rigl drop `alpha` (0.3) of
each layer's active units. `plan_rules(opts)` gives the runs (matrix.Run), `write_rules_report`
the table and figure: test accuracy against training images/s, one point per rule, granularity
and sparsity.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
from pathlib import Path

from .matrix import Run, iterations_per_epoch
from .results import collect, fmt, mean_std, setting_title
from .runinfo import atomic_write_text
from .sparsity import schedule as realloc
from .train import piecewise

RULES = ("dsr", "set", "rigl", "static")  # static: the random initial structure, never changed
BLOCK = 32
LABELS = {"dsr": "DSR (DPR)", "set": "SET", "rigl": "RigL", "static": "static"}


def granularities(opts: argparse.Namespace) -> list[tuple[str, dict]]:
    """(unit name, RunConfig settings) of the two granularities compared."""
    return [("element", dict(granularity="element", width=opts.width)),
            (f"block{BLOCK}", dict(granularity="block", block_size=BLOCK, width=opts.block_width))]


def plan_rules(opts: argparse.Namespace) -> list[Run]:
    """Every run of the comparison: rule x granularity x sparsity x seed, no dependencies."""
    sched = opts.schedule
    base = dict(epochs=sched.epochs, lr_milestones=tuple(sched.milestones),
                realloc_periods=piecewise(sched.realloc_periods, int), dpr_stop_epoch=sched.dpr_stop)
    runs = []
    for unit, gran in granularities(opts):
        block = gran.get("block_size")
        for s in opts.sparsities:
            active = realloc.active_units(opts.depth, gran["width"], s, block)
            n_p = realloc.derive(active, iterations_per_epoch(opts), opts.epochs, opts.pruned_fraction,
                                 opts.target_pruned, s).target_pruned
            for rule in opts.rules:
                mode = dict(mode="static") if rule == "static" else dict(mode="dpr", rule=rule)
                for seed in range(opts.first_seed, opts.first_seed + opts.trials):
                    out = opts.root / f"{rule}-{unit}-s{s}-seed{seed}"
                    runs.append(Run("static" if rule == "static" else "dpr", s, seed, sched.dpr_stop, out,
                                    dict(**gran, **mode, sparsity=s, target_pruned=n_p, **base)))
    return runs


def _rule(run_dir: Path) -> str:
    config = json.loads((run_dir / "config.json").read_text())
    return "static" if config["mode"] == "static" else config.get("rule", "dsr")


def aggregate_rules(dirs: list[Path]) -> list[dict]:
    """One row per (setting, granularity, rule, sparsity): accuracy % mean / std / n and training
    images/s (each run's epochs x training images / its train_seconds), mean over runs."""
    groups: dict[tuple, list[dict]] = {}
    for run in collect(dirs):
        run["rule"] = _rule(Path(run["run_dir"]))
        run["images_per_s"] = run["epochs"] * (run["train_images"] or 0) / run["train_seconds"]
        setting = (run["schedule"], run["train_images"], run["depth"])
        groups.setdefault((setting, run["model"], run["rule"], run["sparsity"]), []).append(run)
    rows = []
    for (_, model, rule, sparsity), members in sorted(groups.items(), key=lambda kv: (
            kv[0][0], kv[0][1], RULES.index(kv[0][2]) if kv[0][2] in RULES else 99, -kv[0][3])):
        mean, std = mean_std([100 * m["final_test_acc"] for m in members])
        speed, _ = mean_std([m["images_per_s"] for m in members])
        rows.append({"model": model, "rule": rule, "label": LABELS.get(rule, rule), "sparsity": sparsity,
                     "mean": mean, "std": std, "n": len(members), "images_per_s": speed,
                     "schedule": members[0]["schedule"], "train_images": members[0]["train_images"],
                     "data": sorted({m.get("data", "?") for m in members}),
                     "device": sorted({m["device"] for m in members if m.get("device")}),
                     "seeds": sorted(m["seed"] for m in members)})
    return rows


def _title(rows: list[dict]) -> str:
    """The setting of the rows, models listed: 'WRN-28-2 / WRN-28-4 block 32, 30 epochs, 50,000 ...'."""
    models = " / ".join(dict.fromkeys(r["model"] for r in rows))
    return setting_title([{**rows[0], "model": models}] + rows[1:])


def write_rules_report(rows: list[dict], out_dir: Path, command: str) -> list[Path]:
    """rules.md, rules.csv and rules.png (accuracy against training images/s) in out_dir."""
    out_dir.mkdir(parents=True, exist_ok=True)
    title = _title(rows)
    lines = [f"# Rules beside DSR: {title}", "", f"- command: `{command}`",
             f"- device: {', '.join(sorted({d for r in rows for d in r['device']})) or '?'}", "",
             "| model | rule | sparsity | test accuracy % (mean +- std) | n | training img/s (mean per run) |",
             "| --- | --- | --- | --- | --- | --- |"]
    lines += [f"| {r['model']} | {r['label']} | {r['sparsity']} | {fmt(r['mean'], r['std'])} | {r['n']} | "
              f"{r['images_per_s']:,.0f} |" for r in rows]
    lines += ["", "Final test accuracy after the last epoch; std over seeds (n - 1). img/s: the run's training "
              "images over its training seconds (reallocations included, evaluation excluded), one process per "
              "run group on the device named above.", "", "![accuracy against throughput](rules.png)", ""]
    table = io.StringIO()
    writer = csv.writer(table)
    writer.writerow(["model", "rule", "sparsity", "mean", "std", "n", "images_per_s"])
    writer.writerows([r["model"], r["rule"], r["sparsity"], f"{r['mean']:.4f}", "" if r["std"] is None else
                      f"{r['std']:.4f}", r["n"], f"{r['images_per_s']:.1f}"] for r in rows)
    paths = [out_dir / "rules.md", out_dir / "rules.csv", out_dir / "rules.png"]
    atomic_write_text(paths[0], "\n".join(lines))
    atomic_write_text(paths[1], table.getvalue())
    _figure(rows, title, paths[2])
    return paths


def _figure(rows: list[dict], title: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    markers = {s: m for s, m in zip(sorted({r["sparsity"] for r in rows}, reverse=True), "os^D")}
    colours = {rule: f"C{i}" for i, rule in enumerate(RULES)}
    for r in rows:
        block = "block" in r["model"]
        ax.errorbar(r["images_per_s"], r["mean"], yerr=r["std"] or 0, fmt=markers[r["sparsity"]],
                    color=colours.get(r["rule"], "k"), mfc="none" if block else colours.get(r["rule"], "k"), capsize=3,
                    label=f"{r['label']}, {'block' if block else 'element'}, s={r['sparsity']}")
    ax.set_xlabel("training images/s (per run)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title(f"{title}\nfilled: element, open: block {BLOCK}; mean +- std over seeds", fontsize=9)
    ax.legend(fontsize=7, bbox_to_anchor=(1.02, 1), loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
