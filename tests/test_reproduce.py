"""python -m blockdpr.reproduce: planning, dependencies, skip and resume, aggregation, figures (CPU, tiny)."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from blockdpr import reproduce
from blockdpr.config import ConfigError
from blockdpr.matrix import Run, Schedule, plan, trial_config
from blockdpr.reproduce import fork_stop_run, main, parse_args
from blockdpr.results import aggregate, collect
from blockdpr.train import main as train_main

from tiny import TINY, assert_runs_match

REPO = Path(__file__).resolve().parent.parent
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_schedule_is_the_paper_at_200_epochs_and_scaled_below():
    paper = Schedule.scaled_from_paper(200)
    assert paper.milestones == (60, 120, 160)
    assert paper.realloc_periods == "0:100,25:200,80:400,140:800"
    assert paper.dpr_stop == 190
    assert paper.stop_epochs == (10, 20, 40, 60, 80, 100, 120, 140, 160, 180)
    assert (paper.gmp_epochs, paper.gmp_steps, paper.gmp_interval) == (48, 20, 2)
    assert paper.gmp_lr == "0:0,1:0.02,25:0.004,35:0.0008"

    short = Schedule.scaled_from_paper(30)
    assert short.milestones == (9, 18, 24)
    assert short.realloc_periods == "0:39,4:77,12:155,21:310", "periods x sqrt(30 x 500 / 100,000)"
    assert short.dpr_stop == 29
    assert short.stop_epochs == (2, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    assert short.gmp_epochs == 48, "gmp keeps its own schedule unless --gmp-epochs"
    assert Schedule.scaled_from_paper(30, gmp_epochs=12).gmp_lr == "0:0,1:0.02,6:0.004,9:0.0008"


def test_plan_lists_the_matrix_with_dependencies_in_order(tmp_path):
    opts = parse_args(["--trials", "2", "--sparsities", "0.9,0.8", "--epochs", "30", "--root", str(tmp_path)])
    runs = plan(opts)
    names = [r.out.name for r in runs]
    assert len(names) == len(set(names)) == 2 + 2 * (2 + 2 + 10 * 2 + 2 + 2 + 2)
    for s in (0.9, 0.8):
        for seed in (0, 1):
            for name in (f"dpr-s{s}-seed{seed}", f"static-s{s}-seed{seed}", f"dpr-stop2-s{s}-seed{seed}",
                         f"dpr-stop27-s{s}-seed{seed}", f"reinit-s{s}-seed{seed}", f"orig-init-s{s}-seed{seed}",
                         f"gmp-s{s}-seed{seed}", f"dense-seed{seed}"):
                assert name in names
    by_name = {r.out.name: r for r in runs}
    assert by_name["reinit-s0.8-seed1"].depends == [tmp_path / "dpr-s0.8-seed1"]
    assert by_name["orig-init-s0.9-seed0"].depends == [tmp_path / "dpr-s0.9-seed0"]
    assert by_name["gmp-s0.8-seed1"].depends == [tmp_path / "dense-seed1"]
    assert by_name["dpr-stop6-s0.9-seed1"].depends == [tmp_path / "dpr-s0.9-seed1"], "stop runs continue their DPR run"
    settings = by_name["dpr-s0.9-seed0"].settings
    assert settings["dpr_stop_epoch"] == 29
    assert settings["snapshot_epochs"] == (2, 3, 6, 9, 12, 15, 18, 21, 24, 27)
    no_fork = {r.out.name: r for r in plan(parse_args(["--trials", "1", "--epochs", "30", "--no-fork", "--root", str(tmp_path)]))}
    assert no_fork["dpr-stop6-s0.9-seed0"].depends == [] and "snapshot_epochs" not in no_fork["dpr-s0.9-seed0"].settings
    for i, run in enumerate(runs):  # every dependency is planned before the runs that need it
        assert all(names.index(d.name) < i for d in run.depends)
    # a subset of conditions brings in what it depends on
    opts = parse_args(["--trials", "1", "--sparsities", "0.9", "--conditions", "reinit,gmp", "--root", str(tmp_path)])
    assert sorted(r.out.name for r in plan(opts)) == ["dense-seed0", "dpr-s0.9-seed0", "gmp-s0.9-seed0", "reinit-s0.9-seed0"]


def fake_run(root: Path, name: str, **summary) -> Path:
    d = root / name
    d.mkdir(parents=True)
    (d / "summary.json").write_text(json.dumps({"seed": 0, "epochs": 30, "data": "CIFAR-10 (JPEG q75)", **summary}))
    return d


def test_aggregation_mean_std_n_and_figures_from_summaries(tmp_path, capsys):
    root = tmp_path / "runs"
    for seed, acc in enumerate((0.90, 0.92, 0.94)):
        fake_run(root, f"dpr-s0.9-seed{seed}", mode="dpr", sparsity=0.9, seed=seed, dpr_stop_epoch=29, final_test_acc=acc)
        fake_run(root, f"dpr-stop6-s0.9-seed{seed}", mode="dpr", sparsity=0.9, seed=seed, dpr_stop_epoch=6, final_test_acc=acc - 0.01)
    fake_run(root, "static-s0.9-seed0", mode="static", sparsity=0.9, final_test_acc=0.88)
    dense = fake_run(root, "dense-seed0", mode="dense", sparsity=0.0, final_test_acc=0.95)
    gmp = fake_run(root, "gmp-s0.9-seed0", mode="gmp", sparsity=0.9, epochs=48, final_test_acc=0.93)
    (gmp / "config.json").write_text(json.dumps({"dense_from": str(dense)}))

    rows = {(r["condition"], r["stop_epoch"]): r for r in aggregate(collect([root]))}
    dpr = rows[("dpr", 29)]
    assert dpr["n"] == 3 and dpr["mean"] == pytest.approx(92.0) and dpr["std"] == pytest.approx(2.0)
    assert (dpr["paper_mean"], dpr["paper_std"]) == (93.59, 0.17)
    assert rows[("stop", 6)]["mean"] == pytest.approx(91.0)
    assert rows[("static", None)]["n"] == 1 and rows[("static", None)]["std"] is None
    assert rows[("gmp", None)]["schedule"] == 30, "gmp belongs to the schedule of the dense run it pruned"

    results = tmp_path / "results"
    assert main(["--aggregate-only", str(root), "--results", str(results)]) == 0
    table = (results / "figure1.md").read_text()
    assert "## Figure 1: WRN-?-?, 30 epochs, ? training images, CIFAR-10 (JPEG q75)" in table, "what ran, as known"
    assert "| DPR | 0.9 | 29 | 92.00 +- 2.00 | 3 |  | 93.59 +- 0.17 |" in table
    assert "| static random structure | 0.9 |  | 88.00 | 1 |  | 92.04 +- 0.31 |" in table
    assert "| compressed (gradual pruning) (48 fine-tuning epochs) | 0.9 |" in table
    assert (results / "figure1.csv").read_text().startswith("model,schedule,train_images,condition,sparsity,stop_epoch")
    for name in ("figure1a.png", "figure1b.png"):
        assert (results / name).read_bytes()[:8] == PNG_MAGIC


def test_end_to_end_tiny_matrix_skips_and_resumes(tmp_path, tiny_cifar, monkeypatch):
    root, results = tmp_path / "runs", tmp_path / "results"
    argv = ["--data", str(tiny_cifar), "--depth", "10", "--width", "1", "--batch-size", "20", "--train-subset", "60",
            "--test-subset", "20", "--device", "cpu", "--no-progress", "--epochs", "2", "--gmp-epochs", "2",
            "--trials", "2", "--sparsities", "0.9", "--stop-epochs", "100", "--root", str(root), "--results", str(results),
            "--trials-per-process", "10",
            "--train-args", "--realloc-periods 0:1 --target-pruned 300"]
    calls = []
    real = reproduce.train_lib.train_trials
    monkeypatch.setattr(reproduce.train_lib, "train_trials", lambda trials: calls.append(trials) or real(trials))

    # 1. Cut short: the first process (dense and static: one schedule, no snapshots) stops mid-run, checkpointed.
    first = ["dense-seed0", "dense-seed1", "static-s0.9-seed0", "static-s0.9-seed1"]
    assert main([*argv, "--time-limit", "0.01"]) == 3
    assert [[a.out.name for a in c] for c in calls] == [first]
    assert (root / "dense-seed0" / "last.pt").is_file() and not (root / "dense-seed0" / "summary.json").exists()

    # 2. Again: resumes those runs, runs everything else in dependency order, writes table and figures.
    calls.clear()
    assert main(argv) == 0
    groups = [sorted(a.out.name for a in c) for c in calls]
    assert groups[0] == first and all(a.resume for a in calls[0])
    assert groups[1] == ["dpr-s0.9-seed0", "dpr-s0.9-seed1"]  # apart: DPR keeps epoch snapshots for the forks
    assert sorted(groups[2:]) == [["dpr-stop1-s0.9-seed0", "dpr-stop1-s0.9-seed1"], ["gmp-s0.9-seed0", "gmp-s0.9-seed1"],
                                  ["orig-init-s0.9-seed0", "orig-init-s0.9-seed1", "reinit-s0.9-seed0", "reinit-s0.9-seed1"]]
    forked = json.loads((root / "dpr-stop1-s0.9-seed0" / "config.json").read_text())
    assert forked["forked_from"].endswith("epoch1.pt") and forked["dpr_stop_epoch"] == 1
    rows = [json.loads(x) for x in (root / "dense-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    stopped = [json.loads(x) for x in (root / "dpr-stop1-s0.9-seed0" / "metrics.jsonl").read_text().splitlines()]
    full = [json.loads(x) for x in (root / "dpr-s0.9-seed0" / "metrics.jsonl").read_text().splitlines()]
    assert stopped[0]["weights_moved"] > 0 and stopped[1]["weights_moved"] == 0 < full[1]["weights_moved"]
    reinit = json.loads((root / "reinit-s0.9-seed0" / "config.json").read_text())
    assert reinit["init_seed"] != 0, "reinit must not reuse the DPR run's initial values"
    table = (results / "figure1.md").read_text()
    for label in ("final structure + random re-init", "final structure + original init", "static random structure",
                  "compressed (gradual pruning) (2 fine-tuning epochs)", "dense"):
        assert f"| {label} |" in table
    for label in ("DPR", "DPR stopped at epoch E"):  # 3 steps an epoch: 6 and 3 reallocations
        assert f"| {label} (almost no reallocation: in effect static) |" in table
    assert "## Figure 1: WRN-10-1, 2 epochs, 60 training images" in table
    assert "| 2 |" in table  # n = 2 trials
    for name in ("figure1a.png", "figure1b.png"):
        assert (results / name).read_bytes()[:8] == PNG_MAGIC

    # 3. Once more: nothing to do.
    calls.clear()
    assert main(argv) == 0
    assert calls == []

    # 4. Only aggregate what is there.
    (results / "figure1.md").unlink()
    assert main(["--aggregate-only", str(root), "--results", str(results)]) == 0
    assert (results / "figure1.md").read_text() == table

    # 5. A run directory that holds another configuration is refused, not skipped.
    with pytest.raises(SystemExit, match="holds a run with other settings"):
        main([*argv[:-2], "--epochs", "3"])


def test_benchmark_reports_aggregate_throughput(tmp_path, tiny_cifar):
    out = tmp_path / "bench.json"
    main(["--benchmark", "--bench-trials", "1,2", "--bench-images", "40", "--bench-epochs", "1", "--data", str(tiny_cifar),
          "--depth", "10", "--width", "1", "--batch-size", "20", "--device", "cpu", "--no-progress", "--bench-out", str(out)])
    results = json.loads(out.read_text())
    assert [r["trials"] for r in results] == [1, 2]
    assert all(r["aggregate_images_per_s"] > 0 for r in results)
    assert results[1]["aggregate_images_per_s"] == pytest.approx(2 * results[1]["per_trial_images_per_s"])


@pytest.mark.parametrize("flags, message", [
    (["--sparsities", "0.9,1.5"], "--sparsities must be in (0, 1)"),
    (["--conditions", "dpr,foo"], "unknown condition(s) ['foo']"),
    (["--trials", "0"], "--trials must be >= 1"),
    (["--epochs", "x"], "invalid int value"),
    (["--depth", "10", "--width", "1", "--target-pruned", "20000"], "--target-pruned 20,000 is not below the 7,370 active"),
    (["--pruned-fraction", "1.5"], "--pruned-fraction must be in (0, 1)"),
    (["--pruned-fraction", "0.2", "--target-pruned", "100"], "exclude each other"),
])
def test_bad_flags_are_named(flags, message, capsys, tmp_path):
    with pytest.raises(SystemExit) as e:
        main([*flags, "--root", str(tmp_path / "r")])
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "r").exists(), "refused before anything is written"


def test_the_plan_gives_dpr_runs_the_derived_periods_and_n_p(tmp_path):
    opts = parse_args(["--preset", "figure1-cpu", "--root", str(tmp_path)])
    runs = {r.out.name: r for r in plan(opts)}
    assert opts.schedule.realloc_periods == "0:11,2:22,5:44,8:88"
    config = trial_config(runs["dpr-s0.9-seed0"], opts)
    assert config.realloc_periods == ((0, 11), (2, 22), (5, 44), (8, 88)) and config.dpr_stop_epoch == 11
    assert config.target_pruned == 1_016 and opts.reallocation[0.9].reallocations == 41
    assert trial_config(runs["static-s0.9-seed0"], opts).target_pruned == 1_016, "one N_p: they stack"
    explicit = parse_args(["--preset", "figure1-cpu", "--root", str(tmp_path), "--target-pruned", "500"])
    assert trial_config(plan(explicit)[3], explicit).target_pruned == 500
    assert trial_config(runs["dpr-s0.9-seed0"], parse_args(
        ["--preset", "figure1-cpu", "--root", str(tmp_path), "--train-args", "--target-pruned 300"])).target_pruned == 300


def test_aggregate_only_without_runs_is_a_clear_error(tmp_path, capsys):
    for where, message in ((tmp_path, "no finished runs"), (tmp_path / "missing", "no such directory")):
        with pytest.raises(SystemExit) as e:
            main(["--aggregate-only", str(where), "--results", str(tmp_path / "r")])
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and message in err and "Traceback" not in err
    assert not (tmp_path / "r").exists()


def test_help_and_dry_run_from_the_command_line(tmp_path):
    out = subprocess.run([sys.executable, "-m", "blockdpr.reproduce", "--help"], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "--aggregate-only" in out.stdout and "--trials-per-process" in out.stdout
    out = subprocess.run([sys.executable, "-m", "blockdpr.reproduce", "--dry-run", "--epochs", "30", "--trials", "1",
                          "--depth", "10", "--width", "1", "--batch-size", "10", "--device", "cpu", "--root",
                          str(tmp_path / "r")], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "plan: 31 runs" in out.stderr and "predicted time on this machine" in out.stderr
    assert "run directory:" not in out.stderr, "the measurement's temporary runs are not shown"
    assert not (tmp_path / "r").exists(), "a dry run writes nothing"


def test_a_forked_stop_run_equals_one_trained_from_scratch(tmp_path, tiny_cifar, float64):
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20", "--epochs", "3",
             "--realloc-periods", "0:2", "--target-pruned", "300"]
    dpr = tmp_path / "dpr"
    train_main([*flags, "--out", str(dpr), "--snapshot-epochs", "2"])
    assert (dpr / "epoch2.pt").is_file()
    stop = Run("stop", 0.9, 0, 2, tmp_path / "forked", {}, [dpr])
    assert fork_stop_run(stop) and stop.status() == "partial"
    train_main([*flags, "--out", str(stop.out), "--dpr-stop-epoch", "2", "--resume"])
    train_main([*flags, "--out", str(tmp_path / "scratch"), "--dpr-stop-epoch", "2"])
    assert_runs_match(stop.out, tmp_path / "scratch")
    assert not fork_stop_run(stop), "only a new run is forked"


def test_a_garbled_config_of_a_planned_run_is_a_clear_error(tmp_path, capsys):
    from blockdpr.checkpoint import save_checkpoint
    run = tmp_path / "r" / "dense-seed0"
    save_checkpoint({"progress": {"epoch": 0, "step_in_epoch": 1, "global_step": 1}}, run / "last.pt")
    (run / "config.json").write_text('{"mode": "dense", "seed"')
    with pytest.raises(SystemExit) as e:
        main(["--conditions", "dense", "--trials", "1", "--epochs", "2", "--device", "cpu", "--root", str(tmp_path / "r")])
    err = capsys.readouterr().err
    assert e.value.code == 2 and "config.json is unreadable or garbled" in err and "Traceback" not in err


def test_help_shows_each_default_once():
    entries = reproduce.build_parser().format_help().split("\n  --")[1:]
    assert len(entries) > 15
    for entry in entries:
        assert entry.lower().count("(default") <= 1, entry


def test_training_flags_reach_every_run(tmp_path):
    opts = parse_args(["--root", str(tmp_path), "--amp", "--device", "cpu"])
    assert all(trial_config(run, opts).amp for run in plan(opts))
    opts = parse_args(["--root", str(tmp_path), "--cuda-graph", "--device", "cpu"])
    with pytest.raises(ConfigError, match="--cuda-graph needs a CUDA device"):  # passed on, and refused on a CPU
        trial_config(plan(opts)[0], opts)


def test_trials_of_one_process_get_one_summary_table(capsys):
    from blockdpr.loop import print_summaries
    print_summaries([{"seed": s, "final_test_acc": 0.5 + s / 100, "reallocations": 41} for s in range(5)])
    err = capsys.readouterr().err
    assert err.count("run summaries (5 trials)") == 1 and "run summary\n" not in err
    assert all(f"seed {s}" in err for s in range(5)) and "0.5400" in err
