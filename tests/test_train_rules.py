"""--rule set / rigl and --distribution erk through the training CLI (element mode, tiny WRN)."""
import json

import pytest
import torch

from blockdpr.train import main
from tiny import TINY, assert_runs_match, metric_rows


def run(tmp_path, name, *flags):
    out = tmp_path / name
    return out, main([*TINY, "--out", str(out), *flags])


@pytest.mark.parametrize("rule", ["set", "rigl"])
def test_rules_train_move_units_and_keep_each_tensors_count(tmp_path, tiny_cifar, rule):
    data = ["--data", str(tiny_cifar), "--epochs", "2", "--realloc-periods", "0:3"]
    out, summary = run(tmp_path, rule, *data, "--rule", rule, "--alpha", "0.3")
    config = json.loads((out / "config.json").read_text())
    assert config["rule"] == rule and config["alpha"] == 0.3
    rows = metric_rows(out)
    assert rows[0]["weights_moved"] > 0, f"{rule} must move weights"
    start = torch.load(out / "init_weights.pt", weights_only=True)
    final = torch.load(out / "final_masks.pt", weights_only=True)
    dense = sum(v.numel() for k, v in start.items() if k in final)
    assert summary["nonzero_sparse_weights"] == sum(int(m.sum()) for m in final.values()) < dense
    static, _ = run(tmp_path, "static", *data, "--mode", "static")
    static_masks = torch.load(static / "final_masks.pt", weights_only=True)
    # per-tensor rules keep every tensor's count: the counts of the (same-seed) static structure
    assert {k: int(m.sum()) for k, m in final.items()} == {k: int(m.sum()) for k, m in static_masks.items()}
    assert any(not torch.equal(final[k], static_masks[k]) for k in final)


def test_rigl_resumes_bit_identically(tmp_path, tiny_cifar):
    """Stopped after each of the first four steps (its first update is at step 3) and resumed: the
    same run as one without stops."""
    data = ["--data", str(tiny_cifar), "--epochs", "2", "--realloc-periods", "0:3", "--rule", "rigl"]
    whole, _ = run(tmp_path, "whole", *data)
    part = tmp_path / "part"
    assert main([*TINY, "--out", str(part), *data, "--stop-after", "0"]) is None
    for _ in range(3):
        main(["--out", str(part), "--resume", "--stop-after", "0"])
    assert torch.load(part / "last.pt", weights_only=True)["progress"]["global_step"] == 4
    main(["--out", str(part), "--resume"])
    assert_runs_match(part, whole)


def test_erk_distribution_is_recorded_and_not_uniform(tmp_path, tiny_cifar):
    out, _ = run(tmp_path, "erk", "--data", str(tiny_cifar), "--epochs", "1", "--mode", "static",
                 "--distribution", "erk")
    assert out.name == "erk"
    masks = torch.load(out / "final_masks.pt", weights_only=True)
    densities = {round(m.float().mean().item(), 3) for m in masks.values()}
    assert len(densities) > 1


@pytest.mark.parametrize("flags,message", [
    (["--rule", "set", "--mode", "static"], "--rule set reallocates: it needs --mode dpr"),
    (["--rule", "rigl", "--granularity", "block", "--block-size", "16", "--compile"], "drop --compile"),
    (["--rule", "rigl", "--cuda-graph"], "drop --cuda-graph"),
    (["--alpha", "0"], "--alpha must be in (0, 1]"),
])
def test_bad_rule_flags_are_named(tmp_path, tiny_cifar, capsys, flags, message):
    with pytest.raises(SystemExit) as e:
        run(tmp_path, "bad", "--data", str(tiny_cifar), *flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "bad").exists()


def test_trials_of_different_rules_train_in_one_process_as_they_would_alone(tmp_path, tiny_cifar, float64):
    from blockdpr.train import parse_configs, train_trials
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20", "--epochs", "2",
             "--realloc-periods", "0:1", "--target-pruned", "300"]
    own = [["--seed", "0"], ["--seed", "1", "--rule", "set"], ["--seed", "2", "--rule", "rigl", "--distribution", "erk"]]
    trials = [parse_configs([*flags, *f, "--out", str(tmp_path / f"group{i}")])[0] for i, f in enumerate(own)]
    train_trials(trials)
    for i, f in enumerate(own):
        main([*flags, *f, "--out", str(tmp_path / f"alone{i}")])
        assert metric_rows(tmp_path / f"alone{i}")[-1]["weights_moved"] > 0
        assert_runs_match(tmp_path / f"group{i}", tmp_path / f"alone{i}")


def test_block_rigl_trains_through_the_cli_with_dense_work_only_at_its_updates(tmp_path, tiny_cifar, monkeypatch):
    """--rule rigl --granularity block: blocks move, every layer keeps its block count, the dense weight
    gradient is captured at the update steps only (counted), and a stopped run resumes bit-identically."""
    from blockdpr.sparsity import dense_grad
    captured = []
    enter = dense_grad.DenseGradCapture.__enter__
    monkeypatch.setattr(dense_grad.DenseGradCapture, "__enter__", lambda self: captured.append(1) or enter(self))
    block = ["--granularity", "block", "--block-size", "16"]
    data = ["--data", str(tiny_cifar), "--epochs", "2", *block]
    whole, _ = run(tmp_path, "whole", *data, "--realloc-periods", "0:3", "--rule", "rigl")
    rows = metric_rows(whole)
    updates = sum(r["reallocations"] for r in rows)
    assert 0 < updates < 20, "an update every 3 of the 20 steps, until 75% of the run"
    assert len(captured) == updates, f"dense gradient captured at {len(captured)} steps, for {updates} updates"
    assert sum(r["weights_moved"] for r in rows) > 0, "rigl must move blocks"
    final = torch.load(whole / "final_masks.pt", weights_only=True)
    static, _ = run(tmp_path, "static", *data, "--mode", "static")
    static_masks = torch.load(static / "final_masks.pt", weights_only=True)
    assert {k: int(m.sum()) for k, m in final.items()} == {k: int(m.sum()) for k, m in static_masks.items()}
    assert any(not torch.equal(final[k], static_masks[k]) for k in final)
    part = tmp_path / "part"
    assert main([*TINY, "--out", str(part), *data, "--realloc-periods", "0:3", "--rule", "rigl",
                 "--stop-after", "0"]) is None
    for _ in range(3):  # stops after steps 1-4: the first update (step 3) straddles a resume
        main(["--out", str(part), "--resume", "--stop-after", "0"])
    main(["--out", str(part), "--resume"])
    assert_runs_match(part, whole)
