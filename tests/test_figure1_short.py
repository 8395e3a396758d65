"""The figure1-short preset of python -m blockdpr.reproduce: plan, predicted time, throughput cache, report (CPU)."""

import json
from pathlib import Path

import pytest

from blockdpr import figure1_short as preset
from blockdpr import matrix, reproduce, results
from blockdpr.figure1_short import PRESETS, compare, orderings, plan_images, predict_seconds, prediction_text, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
CONDITIONS = {"dpr", "reinit", "orig-init", "static", "dense", "gmp"}


@pytest.fixture
def parse():
    """reproduce.parse_args (which applies --preset)."""
    return reproduce.parse_args


def test_the_preset_plans_sparsity_09_three_seeds_of_each_condition_at_30_epochs(parse):
    opts = parse(["--preset", "figure1-short"])
    assert opts.root == Path("runs/figure1-short") and opts.results == Path("results/figure1-short")
    runs = matrix.plan(opts)
    assert len(runs) == len(CONDITIONS) * 3
    assert {(r.condition, r.seed) for r in runs} == {(c, s) for c in CONDITIONS for s in (0, 1, 2)}
    assert {r.sparsity for r in runs if r.condition != "dense"} == {0.9}
    schedule = matrix.Schedule.scaled_from_paper(30, gmp_epochs=8)
    for r in runs:
        assert r.settings["epochs"] == (8 if r.condition == "gmp" else 30), r.out
        if r.condition == "gmp":
            assert (r.settings["gmp_steps"], r.settings["gmp_interval"]) == (schedule.gmp_steps, schedule.gmp_interval)
        else:
            assert r.settings["lr_milestones"] == schedule.milestones
    assert all(r.settings.get("dpr_stop_epoch") == schedule.dpr_stop for r in runs if r.condition == "dpr")
    assert not any("snapshot_epochs" in r.settings for r in runs), "no stop-epoch sweep"


def test_runs_on_one_schedule_train_together_whatever_their_condition(parse, tmp_path):
    """The preset's first wave (DPR, static, dense: 30 epochs each) is one process of 9 stacked trials;
    in the second, reinit and orig-init train together and gmp (its own schedule) apart."""
    opts = parse(["--preset", "figure1-short", "--root", str(tmp_path / "r")])
    runs = matrix.plan(opts)
    waves = [[r for r in runs if not r.depends], [r for r in runs if r.depends]]
    groups = [sorted({r.condition for r in job}) for wave in waves for job in matrix.jobs(wave, 10, opts)]
    assert groups == [["dense", "dpr", "static"], ["orig-init", "reinit"], ["gmp"]]
    assert [len(job) for job in matrix.jobs(waves[0], 4, opts)] == [4, 4, 1]


def test_explicit_flags_override_the_preset(parse, tmp_path, capsys):
    opts = parse(["--preset", "figure1-short", "--trials", "2", "--epochs", "10", "--root", str(tmp_path / "r")])
    assert (opts.trials, opts.epochs, opts.gmp_epochs, opts.sparsities) == (2, 10, 8, [0.9])
    assert opts.results == tmp_path / "r", "another root: not the tracked results/"
    assert parse(["--preset", "figure1-short"]).results == Path("results/figure1-short")
    assert len(matrix.plan(opts)) == len(CONDITIONS) * 2
    assert parse(["--trials", "2"]).sparsities == [0.9, 0.8], "no preset: the paper's defaults"
    with pytest.raises(SystemExit):
        parse(["--preset", "figure1-long"])
    assert "figure1-short" in capsys.readouterr().err


def test_image_count_is_the_sum_over_the_plan(parse):
    runs = matrix.plan(parse(["--preset", "figure1-short"]))
    images = plan_images(runs)
    assert images == sum(r.settings["epochs"] for r in runs) * 50_000
    assert plan_images(runs[:1], images_per_epoch=600) == runs[0].settings["epochs"] * 600


def test_predicted_time_scales_with_throughput(parse):
    runs = matrix.plan(parse(["--preset", "figure1-short"]))
    slow, fast = predict_seconds(runs, 1_000), predict_seconds(runs, 4_000)
    assert slow == pytest.approx(4 * fast) and slow == pytest.approx(plan_images(runs) / 1_000)
    with pytest.raises(ValueError, match="images_per_second must be positive"):
        predict_seconds(runs, 0)


def test_measure_times_the_plans_process_at_its_batch_and_writes_nothing(parse, tmp_path, tiny_cifar, capsys):
    opts = parse(["--preset", "figure1-cpu", "--root", str(tmp_path / "runs"), "--data", str(tiny_cifar),
                  "--batch-size", "10", "--trials-per-process", "2"])
    m = preset.measure(opts, 2, steps=2, warmup=1)
    assert (m["trials"], m["batch_size"], m["steps"]) == (2, 10, 2), "what the plan runs, not a stand-in batch"
    assert m["step"] > 0 and m["eval_image"] > 0 and m["setup"] > 0
    assert m["reallocation"] > 0, "the first process holds DPR runs: one reallocation is timed"
    assert not (tmp_path / "runs").exists()
    assert "run directory" not in capsys.readouterr().err


def test_prediction_sums_the_processes_as_reproduce_starts_them(parse, monkeypatch):
    opts = parse(["--preset", "figure1-cpu", "--trials-per-process", "3"])
    runs = matrix.plan(opts)
    fake = {"setup": 2.0, "step": 0.1, "reallocation": 0.5, "eval_image": 0.001, "batch_size": 100, "steps": 8,
            "device": "test CPU", "model": "WRN-10-1"}
    measured = []
    monkeypatch.setattr(preset, "measure", lambda opts, T, like=None: measured.append(T) or {**fake, "trials": T})
    seconds, _ = preset.prediction(runs, opts)
    assert measured == [3], "5 conditions x 3 seeds: 5 processes of 3 (dense+dpr+static stack, then reinit+orig-init)"
    realloc = opts.reallocation[0.9].reallocations
    per_process = 2.0 + 12 * (100 * 0.1 + 10_000 * 0.001) + realloc * 0.5
    assert seconds == pytest.approx(5 * per_process)
    text = preset.prediction_text(runs, opts)
    assert f"predicted time on this machine: {preset.duration(seconds)}" in text and "test CPU" in text
    assert "3 trial(s) a process: 3,000 training img/s" in text
    for run in runs:
        run.out = Path("/nonexistent-finished")  # not used: every run finished
    monkeypatch.setattr(matrix.Run, "status", lambda self: "done")
    assert prediction_text(runs, opts) == "training images to do: none (every planned run is finished)"


def row(condition, mean, std, n, sparsity=0.9, schedule=30):
    return {"condition": condition, "sparsity": sparsity, "schedule": schedule, "mean": mean, "std": std, "n": n}


def test_orderings_are_checked_against_the_spread():
    assert compare(row("dpr", 93.0, 0.1, 3), row("orig-init", 92.5, 0.1, 3), "DPR", "orig-init") == \
        "DPR > orig-init: yes (93.00 +- 0.10 vs 92.50 +- 0.10, +0.50 points, n=3 each)"
    assert compare(row("dpr", 92.6, 0.5, 3), row("orig-init", 92.5, 0.5, 3), "DPR", "orig-init").startswith(
        "DPR > orig-init: not resolved at this scale (the mean +- std intervals overlap) (92.60 +- 0.50 vs")
    assert compare(row("dpr", 93.0, 0.3, 3), row("orig-init", 92.5, 0.3, 3), "DPR", "orig-init").startswith(
        "DPR > orig-init: not resolved at this scale"), "apart by less than the two stds"
    assert compare(row("reinit", 91.0, 0.1, 3), row("static", 92.0, 0.1, 2), "reinit", "static") == \
        "reinit > static: no (reversed) (91.00 +- 0.10 vs 92.00 +- 0.10, -1.00 points, n=3 and 2)"
    assert "one trial gives no spread" in compare(row("dpr", 93.0, None, 1), row("static", 92.0, 0.1, 3), "DPR", "static")
    rows = [row("dpr", 93.0, 0.1, 3), row("orig-init", 92.0, 0.1, 3), row("static", 91.0, 0.1, 3),
            row("reinit", 80.0, 0.1, 3, sparsity=0.8)]
    lines = orderings(rows, 0.9)
    assert [line.split(":")[0] for line in lines] == ["DPR > orig-init", "orig-init > reinit", "reinit > static"]
    assert lines[0].startswith("DPR > orig-init: yes")
    assert lines[1] == "orig-init > reinit: not measured (no finished reinit run)"


def fake_run(root: Path, name: str, depth=10, width=1, train_images=10_000, **summary) -> Path:
    """A finished run directory: summary.json and the config.json fields the report reads."""
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"seed": 0, "epochs": 12, "data": "CIFAR-10 (JPEG q75)", "depth": depth,
                                                "width": width, "granularity": "element", **summary}))
    (d / "config.json").write_text(json.dumps({
        "dataset": {"train_images": train_images, "test_images": 10_000}, "device_name": "test CPU",
        "provenance": {"versions": {"torch": "2.13.0"}, "git": {"commit": "0123456789abcdef"}}}))
    return d


def fake_matrix(root: Path, reallocations: int = 41, **setting) -> None:
    accuracy = {"dpr": 0.62, "orig-init": 0.615, "reinit": 0.61, "static": 0.60}
    for seed in range(3):
        for mode, acc in accuracy.items():
            extra = {"dpr_stop_epoch": setting.get("epochs", 12) - 1, "reallocations": reallocations, "units_moved": 5_000 * reallocations // 41,
                     "active_units": 7_370} if mode == "dpr" else {}
            fake_run(root, f"{mode}-s0.9-seed{seed}", mode=mode, sparsity=0.9, seed=seed,
                     final_test_acc=acc + 0.001 * seed, **extra, **setting)
        fake_run(root, f"dense-seed{seed}", mode="dense", sparsity=0.0, seed=seed, final_test_acc=0.66, **setting)


def test_report_says_what_ran_every_run_the_reallocation_and_the_orderings(tmp_path):
    root = tmp_path / "runs"
    fake_matrix(root)
    (root / "sessions.jsonl").write_text(
        json.dumps({"event": "start", "utc": "a", "command": "python -m blockdpr.reproduce --preset figure1-cpu"}) + "\n"
        + json.dumps({"event": "end", "utc": "b", "command": "python -m blockdpr.reproduce --preset figure1-cpu",
                      "seconds": 2_520.0}) + "\n")
    out = tmp_path / "results"
    path = write_report(results.aggregate(results.collect([root])), out, "figure1-cpu", [root])
    text = path.read_text()
    assert path == out / "figure1.md"
    assert "## WRN-10-1, 12 epochs, 10,000 training images, CIFAR-10 (JPEG q75)" in text
    assert "device: test CPU; torch 2.13.0; commit 0123456789ab" in text and "wall time: 42.0 min" in text
    assert "command: `python -m blockdpr.reproduce --preset figure1-cpu`" in text
    assert "| DPR | 0.9 | 11 | 62.10 +- 0.10 | 3 | 41 (0.68x) | 93.59 +- 0.17 |" in text
    assert "paper, 200 epochs, WRN-28-2 (not this setting)" in text, "the published values only as labelled"
    assert "| dpr-s0.9-seed2 | DPR | 2 | 62.20 | 41 | 5,000 (0.68x) |" in text, "a row per trial"
    assert "made 41 reallocations per run on average, moving 0.68x its active units" in text
    assert "- DPR > orig-init: yes (62.10 +- 0.10 vs 61.60 +- 0.10" in text
    assert "almost no reallocation" not in text
    assert (out / "figure1a.png").read_bytes()[:8] == PNG_MAGIC and (out / "figure1.csv").is_file()
    assert not (out / "figure1b.png").exists(), "no stop-epoch sweep, no Figure 1b"


def test_a_dpr_condition_that_barely_reallocated_is_marked(tmp_path):
    fake_matrix(tmp_path / "runs", reallocations=5)
    rows = results.aggregate(results.collect([tmp_path / "runs"]))
    dpr = next(r for r in rows if r["condition"] == "dpr")
    assert dpr["barely_dynamic"] and not any(r["barely_dynamic"] for r in rows if r is not dpr)
    results.write_table(rows, tmp_path / "out")
    table = (tmp_path / "out" / "figure1.md").read_text()
    assert "| DPR (almost no reallocation: in effect static) | 0.9 |" in table
    assert "fewer than 10 reallocations or moved less than 50% of the active units" in table


def test_published_values_sit_beside_the_papers_setting_only(tmp_path):
    fake_matrix(tmp_path / "paper", depth=28, width=2, train_images=50_000, epochs=200)
    fake_matrix(tmp_path / "small")
    rows = results.aggregate(results.collect([tmp_path / "paper", tmp_path / "small"]))
    assert len(results.settings(rows)) == 2, "two settings are never averaged together"
    results.write_table(rows, tmp_path / "out")
    table = (tmp_path / "out" / "figure1.md").read_text()
    assert "## Figure 1: WRN-28-2, 200 epochs, 50,000 training images, CIFAR-10 (JPEG q75)" in table
    assert "## Figure 1: WRN-10-1, 12 epochs, 10,000 training images, CIFAR-10 (JPEG q75)" in table
    assert table.count("| published (DSR paper) |") == 1 and table.count("(not this setting) |") == 1
    assert sorted(p.name for p in results.write_figures(rows, tmp_path / "out")) == [
        "figure1a-WRN-10-1-e12-n10000.png", "figure1a-WRN-28-2-e200-n50000.png"]


def test_the_preset_lists_only_options_reproduce_has():
    destinations = {a.dest for a in reproduce.build_parser()._actions}
    for name, values in PRESETS.items():
        assert set(values) <= destinations, name
