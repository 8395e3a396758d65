"""DPR in a plain training loop: torchvision's ResNet-18 on CIFAR-10, element or block mode.

    python -m examples.resnet18_cifar10                                  # element mode, 200 steps
    python -m examples.resnet18_cifar10 --granularity block --block 32 --device cuda

The model is ResNet-18 as torchvision defines it (torchvision.models.resnet18: 7x7 stem conv with
stride 2, max-pool, four stages of two BasicBlocks with 64, 128, 256, 512 channels, 1x1 downsample
convs, average pool, one linear), written out here so that nothing needs torchvision; `--width`
scales the channels (64 is torchvision's). The data comes from blockdpr's loader (the bundled
CIFAR-10 JPEG zip by default) with its on-device augmentation. The loop is ordinary PyTorch;
DPR adds one line to build it and replaces optimizer.step() by dpr.step().
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from blockdpr import DPR
from blockdpr.data import augment, epoch_permutation, load_cifar10, normalize


class BasicBlock(nn.Module):
    """torchvision.models.resnet.BasicBlock: conv3x3-BN-ReLU-conv3x3-BN, plus the (downsampled) input."""

    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.downsample = None
        if stride != 1 or c_in != c_out:
            self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), nn.BatchNorm2d(c_out))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.downsample is None else self.downsample(x)))


class ResNet18(nn.Module):
    """torchvision's resnet18 (same layers, names and initialisation), `width` channels in the first stage."""

    def __init__(self, num_classes: int = 10, width: int = 64):
        super().__init__()
        self.conv1 = nn.Conv2d(3, width, 7, 2, 3, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.maxpool = nn.MaxPool2d(3, 2, 1)
        stages, c_in = [], width
        for i in range(4):
            c_out = width * 2 ** i
            stride = 1 if i == 0 else 2
            stages.append(nn.Sequential(BasicBlock(c_in, c_out, stride), BasicBlock(c_out, c_out, 1)))
            c_in = c_out
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c_in, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.maxpool(F.relu(self.bn1(self.conv1(x))))
        x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
        return self.fc(torch.flatten(self.avgpool(x), 1))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m examples.resnet18_cifar10", description=__doc__.split("\n")[0])
    p.add_argument("--data", default=None, help="CIFAR-10 source (default: the bundled JPEG zip)")
    p.add_argument("--granularity", choices=("element", "block"), default="element")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.9)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--period", type=int, default=50, help="steps between reallocations")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--width", type=int, default=64, help="channels of the first stage (torchvision: 64)")
    p.add_argument("--initial-threshold", type=float, default=0.001, help="H at step 0 (the paper's 0.001)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    data = load_cifar10(args.data, progress=False).to(device)
    torch.manual_seed(args.seed)
    model = ResNet18(width=args.width).to(device).to(memory_format=torch.channels_last)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    dpr = DPR(model, optimizer, sparsity=args.sparsity, granularity=args.granularity, block=args.block,
              period=args.period, initial_threshold=args.initial_threshold, seed=args.seed)

    generator = torch.Generator(device).manual_seed(args.seed)
    order = epoch_permutation(len(data.train_images), args.seed, 0, device)
    losses, moved = [], 0
    for step in range(args.steps):
        idx = order[(step * args.batch_size) % len(order):][:args.batch_size]
        x, y = augment(data.train_images[idx], generator), data.train_labels[idx]
        optimizer.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        result = dpr.step()  # instead of optimizer.step()
        moved += result.pruned if result is not None else 0
        losses.append(loss.item())
    model.eval()
    with torch.no_grad():
        test = data.test_images[:1000]
        accuracy = (model(normalize(test)).argmax(1) == data.test_labels[:len(test)]).float().mean().item()
    summary = {"granularity": args.granularity, "steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1],
               "units_moved": moved, "sparse_layers": len(dpr.names), "dense_layers": dpr.dense_layers,
               "nonzero_sparse_weights": sum(dpr.nonzero_counts()), "test_accuracy": accuracy}
    print(summary)
    return summary


if __name__ == "__main__":
    main()
