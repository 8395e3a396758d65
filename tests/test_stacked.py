"""Concurrent trials: T trials as one stacked WRN equal T separate runs (CPU, tiny model)."""

import json

import pytest
import torch
import torch.nn.functional as F

from blockdpr.models import WideResNet
from blockdpr.stacked import (StackedWideResNet, load_trial_optimizer_state_dicts, per_trial_cross_entropy,
                              stacked_input, trial_optimizer_state_dict)
from blockdpr.config import ConfigError
from blockdpr.train import main, parse_configs, train_trials
from tiny import TINY, assert_runs_match, metric_rows

def plain_models(seeds, depth=10, width=1):
    out = []
    for s in seeds:
        torch.manual_seed(s)
        out.append(WideResNet(depth, width))
    return out


def test_stacked_forward_and_backward_equal_separate_models():
    models = plain_models([0, 1, 2])
    stacked = StackedWideResNet(3, 10, 1)
    stacked.load_trial_state_dicts([m.state_dict() for m in models])
    xs = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(3)]
    ys = torch.tensor([[0, 1, 2], [3, 4, 5], [6, 7, 8], [9, 0, 1]])
    logits = stacked(stacked_input(xs))
    assert logits.shape == (4, 3, 10)
    per_trial_cross_entropy(logits, ys).sum().backward()
    for t, (m, x) in enumerate(zip(models, xs)):
        ref = m(x)
        torch.testing.assert_close(logits[:, t], ref, rtol=1e-4, atol=1e-5)
        F.cross_entropy(ref, ys[:, t]).backward()
        # BN running statistics are updated per trial
        sd = stacked.trial_state_dict(t)
        for k, v in m.state_dict().items():
            torch.testing.assert_close(sd[k], v, rtol=1e-4, atol=1e-6)
        # each trial's gradient is its own
        for (name, p), (_, q) in zip(stacked.named_parameters(), m.named_parameters()):
            rows = p.grad.shape[0] // 3
            torch.testing.assert_close(p.grad[t * rows:(t + 1) * rows], q.grad, rtol=1e-3, atol=1e-5, msg=name)


def test_trial_state_and_optimizer_state_round_trip():
    models = plain_models([3, 4])
    stacked = StackedWideResNet(2, 10, 1)
    stacked.load_trial_state_dicts([m.state_dict() for m in models])
    for t, m in enumerate(models):
        assert all(torch.equal(v, m.state_dict()[k]) for k, v in stacked.trial_state_dict(t).items())
    opt = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    stacked(torch.randn(2, 6, 32, 32)).sum().backward()
    opt.step()
    states = [trial_optimizer_state_dict(stacked, opt, t) for t in range(2)]
    plain_opt = torch.optim.SGD(models[0].parameters(), lr=0.1, momentum=0.9)
    plain_opt.load_state_dict(states[0])  # a trial's state is a plain single-run optimizer state
    opt2 = torch.optim.SGD(stacked.parameters(), lr=0.1, momentum=0.9)
    load_trial_optimizer_state_dicts(stacked, opt2, states)
    for p in stacked.parameters():
        assert torch.equal(opt.state[p]["momentum_buffer"], opt2.state[p]["momentum_buffer"])


def test_stacked_trials_equal_separate_runs_with_reallocations(tmp_path, tiny_cifar, float64):
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20", "--epochs", "2",
             "--realloc-periods", "0:2", "--target-pruned", "300"]
    summaries = main([*flags, "--seeds", "0,1", "--out", str(tmp_path / "group-seed{seed}")])
    assert [s["seed"] for s in summaries] == [0, 1]
    for seed in (0, 1):
        main([*flags, "--seed", str(seed), "--out", str(tmp_path / f"alone-seed{seed}")])
        group, alone = tmp_path / f"group-seed{seed}", tmp_path / f"alone-seed{seed}"
        assert metric_rows(alone)[-1]["weights_moved"] > 0, "the test must include reallocations"
        assert_runs_match(group, alone)
        config = json.loads((group / "config.json").read_text())
        assert config["seed"] == seed and config["trained_with_seeds"] == [0, 1]
    assert metric_rows(tmp_path / "group-seed0") != metric_rows(tmp_path / "group-seed1"), "trials must differ"


def test_trials_of_one_process_may_differ_in_mode_sparsity_and_stop_epoch(tmp_path, tiny_cifar, float64):
    """As blockdpr.reproduce packs them: DPR trials with their own sparsity and DPR stop epoch, a
    static and a dense trial in the same process; each ends as it would alone."""
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20", "--epochs", "2",
             "--realloc-periods", "0:1", "--target-pruned", "300"]
    own = [["--seed", "0", "--sparsity", "0.8", "--dpr-stop-epoch", "1"], ["--seed", "3", "--sparsity", "0.9"],
           ["--seed", "1", "--mode", "static"], ["--seed", "0", "--mode", "dense"]]
    trials = [parse_configs([*flags, *f, "--out", str(tmp_path / f"group{i}")])[0] for i, f in enumerate(own)]
    train_trials(trials)
    for i, f in enumerate(own):
        main([*flags, *f, "--out", str(tmp_path / f"alone{i}")])
        assert_runs_match(tmp_path / f"group{i}", tmp_path / f"alone{i}")
    assert [r["weights_moved"] > 0 for r in metric_rows(tmp_path / "group0")] == [True, False]
    assert all(r["weights_moved"] > 0 for r in metric_rows(tmp_path / "group1"))
    assert metric_rows(tmp_path / "group2")[-1]["weights_moved"] == 0 and metric_rows(tmp_path / "group3")[-1]["density"] is None
    mismatched = parse_configs([*flags, "--seed", "1", "--lr", "0.05", "--out", str(tmp_path / "x")])
    with pytest.raises(ConfigError, match="these differ"):
        train_trials([trials[0], *mismatched])
    gmp = parse_configs([*flags, "--seed", "1", "--mode", "gmp", "--dense-from", str(tmp_path / "alone3"),
                         "--gmp-steps", "1", "--gmp-interval", "1", "--out", str(tmp_path / "gmp")])
    with pytest.raises(ConfigError, match=r"gmp only\); these differ: \['gmp'"):
        train_trials([trials[3], *gmp])


def test_stacked_gmp_and_stop_then_resume(tmp_path, tiny_cifar, float64):
    """gmp (magnitude pruning on views) in a group; a group stopped mid-epoch resumes to the same end."""
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20"]
    main([*flags, "--mode", "dense", "--epochs", "1", "--seeds", "0,1", "--out", str(tmp_path / "dense-seed{seed}")])
    gmp = [*flags, "--mode", "gmp", "--dense-from", str(tmp_path / "dense-seed{seed}"), "--epochs", "2",
           "--gmp-steps", "2", "--gmp-interval", "1"]
    main([*gmp, "--seeds", "0,1", "--out", str(tmp_path / "ref-seed{seed}")])
    assert main([*gmp, "--seeds", "0,1", "--out", str(tmp_path / "cut-seed{seed}"), "--stop-after", "0"]) == [None, None]
    assert not (tmp_path / "cut-seed0" / "summary.json").exists()
    main([*gmp, "--seed", "1", "--out", str(tmp_path / "cut-seed1"), "--resume"])  # a group's trial resumes alone
    main([*gmp, "--seed", "0", "--out", str(tmp_path / "cut-seed0"), "--resume"])
    for seed in (0, 1):
        assert_runs_match(tmp_path / f"cut-seed{seed}", tmp_path / f"ref-seed{seed}")
        assert json.loads((tmp_path / f"cut-seed{seed}" / "summary.json").read_text())["nonzero_sparse_weights"] > 0


@pytest.mark.parametrize("flags, message", [
    (["--seeds", "0,1", "--out", "runs/x"], "must contain {seed}"),
    (["--seeds", "0,0", "--out", "runs/x{seed}"], "must be distinct"),
    (["--seeds", "a,b"], "'a' is not a valid int"),
])
def test_bad_seed_flags(flags, message, capsys):
    with pytest.raises(SystemExit) as e:
        main(flags)
    assert e.value.code == 2
    assert message in capsys.readouterr().err
