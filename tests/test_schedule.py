"""blockdpr/sparsity/schedule.py: the reallocation periods and N_p of a run of any length and size."""

import json

import pytest

from blockdpr.config import RunConfig
from blockdpr.sparsity import schedule
from blockdpr.sparsity.schedule import (PAPER_REALLOC_PERIODS, active_units, count_reallocations, derive,
                                        scaled_periods, target_errors)
from blockdpr.train import main as train_main

from tiny import TINY


def test_the_paper_is_its_own_special_case():
    active = active_units(28, 2, 0.9)
    assert active == 145_139, "WRN-28-2's 3x3 residual convs at 0.9, rounded down per tensor"
    paper = derive(active, 500, 200, sparsity=0.9)
    assert paper.periods == PAPER_REALLOC_PERIODS and paper.dpr_stop == 190
    assert paper.target_pruned == 20_000 and paper.pruned_fraction == pytest.approx(0.1378, abs=1e-4)
    assert paper.reallocations == 125 + 138 + 75 + 31, "every 100 its to epoch 25, 200 to 80, 400 to 140, 800 to 190"
    assert derive(active_units(28, 2, 0.8), 500, 200, sparsity=0.8).target_pruned == 20_000, "the paper's N_p at 0.8 too"


@pytest.mark.parametrize("depth, width, sparsity, block, active", [
    (10, 1, 0.9, None, 7_370), (16, 1, 0.9, None, 17_044), (10, 1, 0.8, None, 14_742), (10, 1, 0.9, 16, 27),
    (28, 2, 0.9, 16, 554)])
def test_n_p_is_the_papers_fraction_of_the_active_units(depth, width, sparsity, block, active):
    assert active_units(depth, width, sparsity, block) == active
    n_p = derive(active, 100, 12, sparsity=sparsity).target_pruned
    assert n_p == max(1, round(20_000 / active_units(28, 2, sparsity) * active))
    assert derive(active, 100, 12, pruned_fraction=0.25).target_pruned == max(1, round(0.25 * active))
    assert derive(active, 100, 12, target_pruned=3).target_pruned == 3, "an absolute count is kept as given"


@pytest.mark.parametrize("epochs, train_images", [(12, 10_000), (15, 10_000), (30, 50_000), (4, 200), (200, 10_000)])
def test_count_follows_sqrt_of_the_runs_share_of_the_papers_iterations(epochs, train_images):
    per_epoch = train_images // 100
    plan = derive(7_370, per_epoch, epochs)
    share = epochs * per_epoch / 100_000
    assert plan.reallocations == pytest.approx(369 * share ** 0.5, rel=0.25)  # rounding of short schedules
    assert [e for e, _ in plan.periods] == sorted({e for e, _ in plan.periods}) and plan.periods[0][0] == 0
    assert all(p >= 1 for _, p in plan.periods)


def test_the_cpu_preset_scale_reallocates_enough():
    plan = derive(active_units(10, 1, 0.9), 100, 12)  # WRN-10-1, 10,000 images, batch 100, 12 epochs
    assert plan.periods == ((0, 11), (2, 22), (5, 44), (8, 88)) and plan.dpr_stop == 11
    assert plan.reallocations >= 40 and plan.reallocations * plan.target_pruned >= plan.active_units


def test_count_is_the_training_loops_rule(tmp_path, tiny_cifar):
    """The planned count equals what a real run makes (100 tiny images at batch 20: 5 steps an epoch)."""
    periods = scaled_periods(3, 5)
    out = tmp_path / "run"
    train_main([*TINY, "--data", str(tiny_cifar), "--train-subset", "100", "--test-subset", "20", "--epochs", "3",
                "--dpr-stop-epoch", "2", "--target-pruned", "300",
                "--realloc-periods", ",".join(f"{e}:{p}" for e, p in periods), "--out", str(out)])
    summary = json.loads((out / "summary.json").read_text())
    assert summary["reallocations"] == count_reallocations(periods, 5, 3, 2) == 6
    assert summary["active_units"] == 7_370 and summary["units_moved"] > 0


def test_an_absolute_n_p_at_or_above_the_active_units_is_refused(tmp_path, tiny_cifar, capsys):
    assert target_errors(7_369, 7_370) == [] and target_errors(7_370, 7_370)
    with pytest.raises(ValueError, match="not below the 7,370 active"):
        derive(7_370, 100, 12, target_pruned=20_000)
    assert "--target-pruned 300 is not below the 27 active blocks" in RunConfig(
        depth=10, width=1, granularity="block", block_size=16, target_pruned=300).errors()[0]
    out = tmp_path / "never"
    with pytest.raises(SystemExit) as e:
        train_main([*TINY, "--data", str(tiny_cifar), "--target-pruned", "20000", "--out", str(out)])
    assert e.value.code == 2 and not out.exists()
    assert "--target-pruned 20,000 is not below the 7,370 active weights" in capsys.readouterr().err


def test_the_default_n_p_of_blockdpr_train():
    assert RunConfig().resolved().target_pruned == 20_000, "the paper's settings: unchanged"
    assert RunConfig(sparsity=0.8).resolved().target_pruned == 20_000
    assert RunConfig(depth=10, width=1).resolved().target_pruned == 1_016, "the same fraction of a smaller model"
    assert RunConfig(target_pruned=12_345).resolved().target_pruned == 12_345, "an explicit count means what it says"
    assert schedule.default_target_pruned(10, 1, 0.9, 16) == 4
