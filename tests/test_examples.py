"""The examples run at tiny sizes: DPR in plain loops on models blockdpr did not design."""

import pytest

from examples import gpt_mlp, resnet18_cifar10
from examples.resnet18_cifar10 import ResNet18


def test_resnet18_has_torchvisions_layers_and_parameter_count():
    model = ResNet18(num_classes=1000)
    assert sum(p.numel() for p in model.parameters()) == 11_689_512  # torchvision.models.resnet18()
    names = [n for n, _ in model.named_parameters()]
    assert names[:2] == ["conv1.weight", "bn1.weight"] and "layer2.0.downsample.0.weight" in names
    assert names[-2:] == ["fc.weight", "fc.bias"]


@pytest.mark.parametrize("granularity", ["element", "block"])
def test_resnet18_trains_a_few_steps_on_cifar10_from_our_loader(granularity, tiny_cifar):
    summary = resnet18_cifar10.main(["--data", str(tiny_cifar), "--granularity", granularity, "--block", "16",
                                     "--width", "16", "--batch-size", "8", "--steps", "6", "--period", "2",
                                     "--sparsity", "0.5", "--initial-threshold", "0.02", "--device", "cpu"])
    assert summary["sparse_layers"] == 19, "every conv but the stem (16 3x3, 3 downsample), not the fc"
    assert summary["dense_layers"] == [] and summary["units_moved"] > 0
    assert 0 <= summary["test_accuracy"] <= 1


@pytest.mark.parametrize("granularity", ["block", "element"])
def test_gpt_mlp_trains_with_block_sparse_linears(granularity):
    summary = gpt_mlp.main(["--granularity", granularity, "--block", "16", "--d", "32", "--layers", "2", "--vocab", "64",
                            "--seq", "8", "--batch-size", "8", "--steps", "20", "--period", "2", "--device", "cpu"])
    assert summary["sparse_layers"] == ["blocks.0.fc.weight", "blocks.0.proj.weight", "blocks.1.fc.weight",
                                        "blocks.1.proj.weight"], "both MLP linears of every layer; the head stays dense"
    assert summary["block_sparse_linears"] == (4 if granularity == "block" else 0)
    assert summary["units_moved"] > 0
    assert summary["last_loss"] < summary["first_loss"]
