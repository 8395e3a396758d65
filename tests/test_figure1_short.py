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
            "device": "test CPU"}
    measured = []
    monkeypatch.setattr(preset, "measure", lambda opts, T: measured.append(T) or {**fake, "trials": T})
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


def test_orderings_say_whether_each_comparison_holds():
    assert compare(row("dpr", 93.0, 0.1, 3), row("orig-init", 92.5, 0.1, 3), "DPR", "orig-init") == \
        "DPR > orig-init: yes (+0.50 points, 2 SE = 0.16, n=3 each)"
    assert compare(row("dpr", 92.6, 0.5, 3), row("orig-init", 92.5, 0.5, 3), "DPR", "orig-init").startswith(
        "DPR > orig-init: not resolved (+0.10 points")
    assert compare(row("reinit", 91.0, 0.1, 3), row("static", 92.0, 0.1, 2), "reinit", "static") == \
        "reinit > static: no (reversed) (-1.00 points, 2 SE = 0.18, n=3 and 2)"
    assert "one trial gives no spread" in compare(row("dpr", 93.0, None, 1), row("static", 92.0, 0.1, 3), "DPR", "static")
    rows = [row("dpr", 93.0, 0.1, 3), row("orig-init", 92.0, 0.1, 3), row("static", 91.0, 0.1, 3),
            row("reinit", 80.0, 0.1, 3, sparsity=0.8)]
    lines = orderings(rows, 0.9, 30)
    assert [line.split(":")[0] for line in lines] == ["DPR > orig-init", "orig-init > reinit", "reinit > static"]
    assert lines[0].startswith("DPR > orig-init: yes")
    assert lines[1] == "orig-init > reinit: not measured (no finished reinit run)"


def fake_run(root: Path, name: str, **summary) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"seed": 0, "epochs": 30, "data": "CIFAR-10 (JPEG q75)", **summary}))
    return d


def test_report_writes_the_table_figure_published_values_and_orderings(tmp_path):
    root = tmp_path / "runs"
    accuracy = {"dpr": 0.92, "orig-init": 0.915, "reinit": 0.91, "static": 0.90, "gmp": 0.925}
    for seed in range(3):
        for mode, acc in accuracy.items():
            extra = {"dpr_stop_epoch": 29} if mode == "dpr" else {}
            fake_run(root, f"{mode}-s0.9-seed{seed}", mode=mode, sparsity=0.9, seed=seed,
                     final_test_acc=acc + 0.001 * seed, **extra)
        fake_run(root, f"dense-seed{seed}", mode="dense", sparsity=0.0, seed=seed, final_test_acc=0.94)
    out = tmp_path / "results"
    path = write_report(results.aggregate(results.collect([root])), out)
    text = path.read_text()
    assert path == out / "figure1-short.md"
    assert "| DPR | 0.9 | 29 | 30 | 92.10 +- 0.10 | 3 | 93.59 +- 0.17 |" in text
    assert "200 epochs on lossless CIFAR-10" in text and "30-epoch schedule on CIFAR-10 (JPEG q75)." in text
    assert "- DPR > orig-init: yes (+0.50 points, 2 SE = 0.16, n=3 each)" in text
    assert "- reinit > static: yes (+1.00 points" in text
    assert "![Figure 1a](figure1a.png)" in text
    assert (out / "figure1a.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "figure1.csv").is_file()


def test_the_preset_lists_only_options_reproduce_has():
    destinations = {a.dest for a in reproduce.build_parser()._actions}
    for name, values in PRESETS.items():
        assert set(values) <= destinations, name
