"""The training step on static input buffers (the CUDA-graph path) equals the eager step bit for
bit, through a reallocation; element-mode masks stay the same tensors (a graph keeps reading them)."""

import functools

import pytest
import torch

from blockdpr import loop

from blockdpr.distributed import Distributed
from blockdpr.models import WideResNet
from blockdpr.sparsity import DPRConfig, ElementSparsity, Reallocator
from blockdpr.stacked import StackedWideResNet
from blockdpr.step import TrainStep
from blockdpr.train import main
from tiny import TINY


def setup(static: bool, trials: int):
    torch.manual_seed(0)
    model = StackedWideResNet(trials, 10, 1)
    model.load_trial_state_dicts([WideResNet(10, 1).state_dict() for _ in range(trials)])
    views = [model.trial_sparse_tensors(t) for t in range(trials)]
    sparsities = [ElementSparsity.random(v, 0.9, seed=t) for t, v in enumerate(views)]
    for s in sparsities:
        s.apply_()
    reallocators = [Reallocator(s.segments.sizes, DPRConfig(50, 0.1, 0.05), seed=t) for t, s in enumerate(sparsities)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
    step = TrainStep(model, model, optimizer, sparsities, views, Distributed(), static=static)
    return model, sparsities, reallocators, optimizer, step


@pytest.mark.parametrize("trials", [1, 2])
def test_static_buffer_step_equals_eager_step_through_a_reallocation(trials):
    runs = []
    for static in (False, True):
        model, sparsities, reallocators, optimizer, step = setup(static, trials)
        masks = [m for s in sparsities for m in s.masks]
        losses = []
        for i in range(4):
            g = torch.Generator().manual_seed(i)
            xs = [torch.randn(6, 3, 32, 32, generator=g) for _ in range(trials)]
            ys = [torch.randint(0, 10, (6,), generator=g) for _ in range(trials)]
            step(xs, ys)
            losses.append(step.loss_sum.clone())
            if i == 1:
                for s, r in zip(sparsities, reallocators):
                    assert s.reallocate(r, i, optimizer).pruned > 0
        assert all(a is b for a, b in zip(masks, [m for s in sparsities for m in s.masks])), \
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
    monkeypatch.setattr(loop, "TrainStep", functools.partial(TrainStep, static=True))
    main([*flags, "--out", str(tmp_path / "static")])
    a, b = (torch.load(tmp_path / d / "last.pt", weights_only=True) for d in ("eager", "static"))
    assert a["metrics"][-1]["reallocations"] > 0, "the runs must include reallocations"
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    assert all(torch.equal(a["masks"][k], b["masks"][k]) for k in a["masks"])
    assert [r["train_loss"] for r in a["metrics"]] == [r["train_loss"] for r in b["metrics"]]
