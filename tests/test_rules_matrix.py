"""--preset rules / rules-short of blockdpr.reproduce: the plan of DSR, SET, RigL and static at both
granularities, and its report (accuracy against training images/s) from finished runs."""
import json

import pytest

from blockdpr.matrix import plan, trial_config
from blockdpr.reproduce import main, parse_args


def test_rules_preset_plans_every_rule_granularity_sparsity_and_seed(tmp_path):
    opts = parse_args(["--preset", "rules", "--root", str(tmp_path)])
    runs = {r.out.name: r for r in plan(opts)}
    assert len(runs) == 4 * 2 * 2 * 3  # rules x granularities x sparsities x seeds, names distinct
    rigl = trial_config(runs["rigl-block32-s0.8-seed2"], opts)
    assert (rigl.mode, rigl.rule, rigl.granularity, rigl.block_size, rigl.width, rigl.sparsity, rigl.seed, rigl.epochs) \
        == ("dpr", "rigl", "block", 32, 4, 0.8, 2, 30)
    element = trial_config(runs["set-element-s0.9-seed0"], opts)
    assert (element.rule, element.granularity, element.width, element.depth) == ("set", "element", 2, 28)
    static = trial_config(runs["static-element-s0.9-seed0"], opts)
    assert static.mode == "static"
    dsr_element, dsr_block = (trial_config(runs[f"dsr-{u}-s0.9-seed0"], opts) for u in ("element", "block32"))
    assert dsr_element.target_pruned > dsr_block.target_pruned > 0, "N_p: the paper's fraction of each model's units"
    assert all(not r.depends for r in runs.values())
    short = parse_args(["--preset", "rules-short", "--root", str(tmp_path)])
    assert short.train_subset == 10_000 and short.epochs == 10 and len(plan(short)) == 48


def test_rules_flag_refuses_unknown_rules(capsys):
    with pytest.raises(SystemExit) as e:
        parse_args(["--rules", "dsr,magic"])
    assert e.value.code == 2 and "expected rules from dsr,set,rigl,static" in capsys.readouterr().err


def fake_run(root, name, rule, granularity, acc, seconds, seed=0, sparsity=0.9):
    d = root / name
    d.mkdir(parents=True)
    width = 4 if granularity == "block" else 2
    (d / "summary.json").write_text(json.dumps({
        "mode": "static" if rule == "static" else "dpr", "granularity": granularity, "sparsity": sparsity, "seed": seed,
        "depth": 28, "width": width, "epochs": 10, "dpr_stop_epoch": 9, "final_test_acc": acc, "train_seconds": seconds,
        "data": "CIFAR-10 (JPEG q75)"}))
    (d / "config.json").write_text(json.dumps({
        "mode": "static" if rule == "static" else "dpr", "rule": "dsr" if rule == "static" else rule,
        "granularity": granularity, "block_size": 32, "dataset": {"train_images": 10_000, "test_images": 10_000}}))


def test_rules_report_puts_each_rule_and_granularity_on_one_point(tmp_path):
    root, out = tmp_path / "runs", tmp_path / "results"
    for seed, acc in enumerate((0.80, 0.84)):
        fake_run(root, f"rigl-block32-s0.9-seed{seed}", "rigl", "block", acc, 50.0, seed)
        fake_run(root, f"dsr-element-s0.9-seed{seed}", "dsr", "element", acc + 0.05, 20.0, seed)
    fake_run(root, "static-element-s0.9-seed0", "static", "element", 0.70, 25.0)
    assert main(["--preset", "rules-short", "--aggregate-only", str(root), "--results", str(out)]) == 0
    text = (out / "rules.md").read_text()
    assert "WRN-28-2 / WRN-28-4 block 32, 10 epochs, 10,000 training images, CIFAR-10 (JPEG q75)" in text
    assert "| WRN-28-4 block 32 | RigL | 0.9 | 82.00 +- 2.83 | 2 | 2,000 |" in text  # 10 x 10,000 / 50 s
    assert "| WRN-28-2 | DSR (DPR) | 0.9 | 87.00 +- 2.83 | 2 | 5,000 |" in text
    assert "| WRN-28-2 | static | 0.9 | 70.00 | 1 | 4,000 |" in text
    assert len((out / "rules.csv").read_text().splitlines()) == 4
    assert (out / "rules.png").stat().st_size > 0
