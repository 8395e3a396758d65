"""Bytes of parameters + gradients + optimizer state of the sparse layers: dense against block mode.

    python bench/memory.py                       # WRN-28-2 and WRN-28-10, sparsity 0.8 / 0.9, blocks 16 / 32 / 64
    python bench/memory.py --models 28-2 --sparsities 0.9 --blocks 32 --json out.json
    python -m bench.memory --blocks 16,32                  # list flags take commas or spaces

Nothing is estimated from formulas: each configuration takes one real SGD step (momentum,
weight decay) on a batch of 2 images, then the bytes of every tensor that the sparse layers own
are added up: the weights (dense) or packed values plus every tensor of the layout (block mode),
their gradients and their momentum buffers. Runs on the CPU; the byte counts are the same on a GPU.
Layers the block does not tile stay dense in block mode and are counted as dense there too.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

from blockdpr.cli import RawHelpFormatter, add_list_argument
from blockdpr.models import WideResNet, sparse_parameters
from blockdpr.runinfo import atomic_write_json, provenance
from blockdpr.setup import sgd
from blockdpr.sparsity.packed import to_block_sparse
from blockdpr_kernels import CONV_BLOCKS


def nbytes(t: torch.Tensor | None) -> int:
    """Bytes of a tensor's elements (0 for None)."""
    return 0 if t is None else t.numel() * t.element_size()


def layout_nbytes(layouts) -> int:
    """Bytes of every tensor the BlockLayouts hold (masks, index tensors, weight-gradient runs and counters),
    each tensor once: layouts over one PackedStorage share its per-block index tensors."""
    tensors = {id(t): t for layout in layouts for t in vars(layout).values() if torch.is_tensor(t)}
    return sum(nbytes(t) for t in tensors.values())


def train_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    """One SGD step (Nesterov momentum, weight decay) on 2 random 32x32 images; returns the optimizer."""
    optimizer = sgd(model.parameters())
    F.cross_entropy(model(torch.randn(2, 3, 32, 32)), torch.tensor([0, 1])).backward()
    optimizer.step()
    return optimizer


def parameter_state_bytes(params: list[torch.nn.Parameter], optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the parameters, their gradients and their optimizer state tensors."""
    total = 0
    for p in params:
        total += nbytes(p) + nbytes(p.grad)
        total += sum(nbytes(v) for v in optimizer.state.get(p, {}).values() if torch.is_tensor(v) and v.dim() > 0)
    return total


def measure(depth: int, width: int, sparsity: float, block: int) -> dict:
    """Bytes of the sparse layers of WRN-depth-width, dense against block mode (one row of the table)."""
    torch.manual_seed(0)
    dense_model = WideResNet(depth, width)
    names = list(sparse_parameters(dense_model))
    dense_bytes = parameter_state_bytes(list(sparse_parameters(dense_model).values()), train_step(dense_model))

    model = WideResNet(depth, width)
    structure, kept_dense = to_block_sparse(model, names, block, sparsity, seed=0)
    optimizer = train_step(model)
    still_dense = [p for n, p in model.named_parameters() if n in kept_dense]
    layout_bytes = layout_nbytes([m.layout for m in structure.layers])
    # The weight gradient's fp32 workspace is one buffer per device, as large as the packed storage (the
    # layouts over it index its rows).
    workspace_bytes = 4 * structure.params[0].numel()
    block_bytes = parameter_state_bytes(structure.params + still_dense, optimizer) + layout_bytes + workspace_bytes
    density = sum(structure.nonzero_counts()) / sum(structure.dense_numels)
    return {
        "model": f"WRN-{depth}-{width}", "sparsity": sparsity, "block": block,
        "block_density": density, "layers_kept_dense": kept_dense,
        "dense_bytes": dense_bytes, "block_bytes": block_bytes, "layout_bytes": layout_bytes,
        "workspace_bytes": workspace_bytes,
        "ratio": block_bytes / dense_bytes,
        "ratio_over_density": block_bytes / dense_bytes / (1 - sparsity),
    }


def wrn_pair(text: str) -> tuple[int, int]:
    """'28-10' -> (28, 10): a WRN depth = 6n + 4 >= 10 and width >= 1."""
    m = re.fullmatch(r"(\d+)-(\d+)", text)
    if not m or (int(m[1]) - 4) % 6 or int(m[1]) < 10 or int(m[2]) < 1:
        raise ValueError("expected DEPTH-WIDTH with DEPTH = 6n + 4 >= 10, e.g. 28-10")
    return int(m[1]), int(m[2])


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=RawHelpFormatter)
    add_list_argument(parser, "--models", type=wrn_pair, default=[(28, 2), (28, 10)], metavar="D-W",
                      help="WRN depth-width pairs (default: 28-2 28-10)")
    add_list_argument(parser, "--sparsities", type=float, default=[0.8, 0.9], help="fractions of weights pruned")
    add_list_argument(parser, "--blocks", type=int, choices=CONV_BLOCKS, default=[16, 32, 64], help="block sizes")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    if bad := [s for s in args.sparsities if not 0 < s < 1]:
        parser.error(f"--sparsities: every sparsity must be in (0, 1), got {bad}")

    rows = [measure(d, w, s, b) for d, w in args.models for s in args.sparsities for b in args.blocks]
    table = Table(title="sparse layers: parameters + gradients + SGD momentum (bytes)")
    for col in ("model", "sparsity", "block", "dense MB", "block MB", "block / dense", "/ (1 - s)", "kept dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['sparsity']:.2f}", str(r["block"]), f"{r['dense_bytes'] / 1e6:.2f}",
                      f"{r['block_bytes'] / 1e6:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_over_density']:.3f}",
                      str(len(r["layers_kept_dense"])))
    Console(width=140).print(table)
    if args.json:
        record = provenance("cpu", None if argv is None else ["-m", "bench.memory", *argv])
        atomic_write_json(args.json, dict(record, note="byte counts do not depend on the device", rows=rows))
    return rows


if __name__ == "__main__":
    main()
