"""Wide residual networks (Zagoruyko & Komodakis, 2016) as used in the DPR paper.

WRN-d-k has a 3x3 stem conv (3 -> 16 channels) and three groups of (d - 4) / 6 pre-activation
basic blocks with 16k, 32k and 64k channels (the first block of groups 2 and 3 has stride 2),
then BN-ReLU, global average pooling and a linear classifier. A block whose input and output
widths differ has a 1x1 shortcut conv.

Which tensors are sparse follows the DSR authors' code: the two 3x3 convs inside every residual
block (24 tensors, 1,451,520 weights for WRN-28-2). The stem conv, the 1x1 shortcuts, BN and the
classifier stay dense. `sparse_parameters` returns them in a fixed order.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .sparsity.blocks import block_grid
from .sparsity.structure import initial_keep_count


class BasicBlock(nn.Module):
    """Pre-activation block: BN-ReLU-conv3x3(stride)-BN-ReLU-conv3x3, plus the shortcut."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_channels != out_channels:
            self.shortcut = nn.Conv2d(in_channels, out_channels, 1, stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(x))
        # As in the reference WRN code, the shortcut conv sees the pre-activated input.
        residual = x if self.shortcut is None else self.shortcut(out)
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + residual


class WideResNet(nn.Module):
    """WRN-depth-width for 32x32 inputs: float [B, 3, 32, 32] -> logits float [B, num_classes]."""

    def __init__(self, depth: int = 28, width: int = 2, num_classes: int = 10):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0:
            raise ValueError(f"WRN depth must be 6n + 4 with n >= 1 (10, 16, 22, 28, ...), got {depth}")
        if width < 1:
            raise ValueError(f"WRN width must be a positive integer, got {width}")
        self.depth, self.width = depth, width
        blocks_per_group = (depth - 4) // 6
        widths = [16, 16 * width, 32 * width, 64 * width]

        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, padding=1, bias=False)
        groups = []
        for g in range(3):
            blocks = [
                BasicBlock(widths[g] if i == 0 else widths[g + 1], widths[g + 1], (1 if g == 0 else 2) if i == 0 else 1)
                for i in range(blocks_per_group)
            ]
            groups.append(nn.Sequential(*blocks))
        self.group1, self.group2, self.group3 = groups
        self.bn = nn.BatchNorm2d(widths[3])
        self.fc = nn.Linear(widths[3], num_classes)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """He init as in the WRN code: conv weights ~ N(0, 2 / (kh * kw * C_out)); BN (1, 0); fc bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / fan_out))
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                m.reset_parameters()
                nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.group3(self.group2(self.group1(self.conv1(x))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


def sparse_parameters(model: WideResNet) -> dict[str, nn.Parameter]:
    """The sparse tensors: both 3x3 convs of every residual block, name -> weight [C_out, C_in, 3, 3]."""
    return {
        name: p
        for name, p in model.named_parameters()
        if name.endswith(("conv1.weight", "conv2.weight")) and name.startswith("group")
    }


def parameter_counts(model: nn.Module, sparse_names, sparsity: float, block: tuple[int, int] | None = None) -> dict[str, float]:
    """Counts of all parameters and of the sparse ones, and the global sparsity that `sparsity`
    (of the sparse tensors) amounts to. Uses the same rounding as the initial structure, in
    elements or, with `block`, in blocks (a tensor the block does not tile counts as dense)."""
    sparse = {n: p for n, p in model.named_parameters() if n in set(sparse_names)}
    total = sum(p.numel() for p in model.parameters())
    kept = 0
    for p in sparse.values():
        grid = block_grid(p.shape, block) if block is not None else None
        if block is None:
            kept += initial_keep_count(p.numel(), sparsity)
        elif grid is None:
            kept += p.numel()
        else:
            kept += initial_keep_count(grid[0] * grid[1], sparsity) * block[0] * block[1]
    sparse_total = sum(p.numel() for p in sparse.values())
    nonzero = total - sparse_total + kept
    return {
        "total_parameters": total,
        "sparse_tensor_parameters": sparse_total,
        "nonzero_parameters": nonzero,
        "sparse_tensor_sparsity": 1 - kept / sparse_total if sparse_total else 0.0,
        "global_sparsity": 1 - nonzero / total,
    }
