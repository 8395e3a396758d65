"""The training step on static input buffers (the CUDA-graph path) equals the eager step bit for
bit, through a reallocation; element-mode masks stay the same tensors (a graph keeps reading them)."""

import collections
import functools

import pytest
import torch

from blockdpr import engine

from blockdpr.distributed import Distributed
from blockdpr.models import WideResNet
from blockdpr.sparsity import DPR, ElementSparsity
from blockdpr.stacked import StackedWideResNet, trial_optimizer
from blockdpr.engine import Engine
from blockdpr.step import Evaluation, TrainStep
from blockdpr.setup import sgd
from blockdpr.train import main, parse_configs
from blockdpr_kernels.testing import record_work
from tiny import TINY


def setup(static: bool, trials: int):
    torch.manual_seed(0)
    model = StackedWideResNet(trials, 10, 1)
    model.load_trial_state_dicts([WideResNet(10, 1).state_dict() for _ in range(trials)])
    views = [model.trial_sparse_tensors(t) for t in range(trials)]
    optimizer = sgd(model.parameters())
    dprs = []
    for t, v in enumerate(views):
        structure = ElementSparsity.random(v, 0.9, seed=t)
        structure.apply_()
        dprs.append(DPR.from_structure(structure, None, target_pruned=50, tolerance=0.1, initial_threshold=0.05, seed=t,
                                       optimizer_state=lambda v=v, t=t: trial_optimizer(model, optimizer, v, t)))
    step = TrainStep(model, model, optimizer, dprs, views, Distributed(), static=static)
    return model, dprs, optimizer, step


def _batch(trials: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A random stacked batch of 6 images per trial: x float [6, T * 3, 32, 32], y int64 [6, T]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(6, trials * 3, 32, 32, generator=g), torch.randint(0, 10, (6, trials), generator=g)


@pytest.mark.parametrize("trials", [1, 2])
def test_static_buffer_step_equals_eager_step_through_a_reallocation(trials):
    runs = []
    for static in (False, True):
        model, dprs, optimizer, step = setup(static, trials)
        masks = [m for d in dprs for m in d.structure.masks]
        losses = []
        for i in range(4):
            step(*_batch(trials, i))
            losses.append(step.loss_sum.clone())
            if i == 1:
                for d in dprs:
                    assert d.reallocate().pruned > 0
        assert all(a is b for a, b in zip(masks, [m for d in dprs for m in d.structure.masks])), \
            "masks are updated in place"
        runs.append((losses, [m.clone() for m in masks], {k: v.clone() for k, v in model.state_dict().items()}))
    (loss_a, masks_a, state_a), (loss_b, masks_b, state_b) = runs
    assert all(torch.equal(a, b) for a, b in zip(loss_a, loss_b))
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert all(torch.equal(state_a[k], state_b[k]) for k in state_a)
    assert loss_a[-1].ne(loss_a[1]).all(), "the steps must train"


def test_a_run_on_the_static_step_path_equals_the_eager_run(tmp_path, tiny_cifar, monkeypatch):
    """The whole loop (lr change, reallocations, checkpoints) on the path --cuda-graph uses, on CPU."""
    flags = [*TINY, "--data", str(tiny_cifar), "--train-subset", "60", "--test-subset", "20", "--epochs", "2",
             "--realloc-periods", "0:2", "--target-pruned", "100", "--lr-schedule", "0:0.1,1:0.05"]
    main([*flags, "--out", str(tmp_path / "eager")])
    monkeypatch.setattr(engine, "TrainStep", functools.partial(TrainStep, static=True))
    monkeypatch.setattr(engine, "Evaluation", functools.partial(Evaluation, static=True))
    main([*flags, "--out", str(tmp_path / "static")])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("eager", "static"))
    assert a["metrics"][-1]["reallocations"] > 0, "the runs must include reallocations"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert [r["train_loss"] for r in a["metrics"]] == [r["train_loss"] for r in b["metrics"]]


def _dense_setup(trials: int):
    model, _, optimizer, _ = setup(False, trials)
    views = [model.trial_sparse_tensors(t) for t in range(trials)]
    return model, TrainStep(model, model, optimizer, [None] * trials, views, Distributed())


@pytest.mark.parametrize("trials", [1, 2])
def test_the_dpr_step_has_no_host_sync_and_adds_two_foreach_ops_per_trial_to_the_dense_step(trials):
    """What a step makes the device do, counted: nothing waits for the device (a CUDA graph could not
    capture it, and eagerly it would stall the launch queue), and DPR's whole per-step cost over the
    dense step is masking the gradients and the weights, one foreach op each per trial."""
    work = {}
    for name, step in (("dense", _dense_setup(trials)[1]), ("dpr", setup(False, trials)[3])):
        step(*_batch(trials, 0))  # the first step creates gradients and momentum buffers
        with record_work() as work[name]:
            step(*_batch(trials, 1))
        assert not work[name].syncs, name
    extra = work["dpr"].ops - work["dense"].ops
    assert extra == collections.Counter({"aten._foreach_mul_": 2 * trials})
    assert not work["dense"].ops - work["dpr"].ops
    assert work["dense"].ops["aten._foreach_zero_"] == 1 and not work["dense"].ops["aten.zero_"], \
        "zero_grad is one multi-tensor op, not one per parameter"


@pytest.mark.parametrize("seeds", ["0", "0,1,2"])
def test_trainer_steps_have_no_host_sync_and_a_reallocation_syncs_once(tmp_path, tiny_cifar, seeds):
    """The loop between reallocations (batch selection, augmentation, the step, the bookkeeping) never
    waits for the device; the trials' reallocations read their per-tensor counts once, together."""
    configs = parse_configs([*TINY, "--data", str(tiny_cifar), "--train-subset", "100", "--test-subset", "20",
                             "--realloc-periods", "0:4", "--seeds", seeds, "--out", str(tmp_path / "run-{seed}")])
    trainer = Engine(configs)
    trainer.start_epoch(0)
    trainer.step(0)  # creates the gradients and momentum buffers
    with record_work() as steps:
        for step in (1, 2):
            assert trainer.step(step) == {}
    assert steps.ops["aten._foreach_zero_"] == 2, "two steps ran (one zero_grad each)"
    assert not steps.syncs
    with record_work() as realloc:
        results = trainer.step(3)  # the fourth step reallocates
    assert sorted(results) == list(range(len(configs)))
    assert not list(tmp_path.glob("run-*")), "the engine writes no run directory"
    assert realloc.syncs == collections.Counter({"numpy": 1, "from_host": 1})  # the counts out, r_i back


@pytest.mark.parametrize("trials", [1, 2])
def test_static_buffer_evaluation_equals_eager_evaluation_and_syncs_once(trials):
    """Evaluation on static buffers (the CUDA-graph path) gives the eager numbers bit for bit, with a
    last batch of another size; after the first (which makes the normalisation constants and, on a
    GPU, captures), its only host sync is reading the results."""
    model = setup(False, trials)[0]
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (25, 32, 32, 3), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (25,), generator=g)
    results = []
    for static in (False, True):
        evaluation = Evaluation(model, images, labels, trials, batch_size=10, static=static)
        first = evaluation()
        with record_work() as work:
            results.append(evaluation())
        assert work.syncs == collections.Counter({"tolist": 1}) and results[-1] == first
        assert model.training
    assert results[0] == results[1]
    assert len(evaluation.call._buffers) == 2, "batches of 10 and of 5"
    assert all(0 <= acc <= 1 for acc in results[0][1]) and len(results[0][0]) == trials


def test_a_loop_step_grows_only_by_each_trials_own_draws_and_masks(tmp_path, tiny_cifar):
    """The data path is batched over trials (one gather, one normalisation for all): an extra trial adds
    only its three random draws (crop rows, crop columns, flips: from its own generator) with the
    flips' cast to bool, and its two masking ops; nothing else grows with the number of trials."""
    work = {}
    for seeds in ("0,1,2", "0,1,2,3,4"):
        configs = parse_configs([*TINY, "--data", str(tiny_cifar), "--train-subset", "100", "--test-subset", "20",
                                 "--seeds", seeds, "--out", str(tmp_path / f"{len(seeds)}-{{seed}}")])
        trainer = Engine(configs)
        trainer.start_epoch(0)
        trainer.step(0)
        with record_work() as work[seeds]:
            trainer.step(1)
    extra = work["0,1,2,3,4"].ops - work["0,1,2"].ops
    assert extra == collections.Counter({"aten.randint": 3 * 2, "aten._to_copy": 2, "aten._foreach_mul_": 2 * 2})
    assert not work["0,1,2"].ops - work["0,1,2,3,4"].ops
