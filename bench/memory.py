"""Bytes of parameters + gradients + optimizer state of the sparse layers: dense against block mode.

    python bench/memory.py                       # WRN-28-2 and WRN-28-10, sparsity 0.8 / 0.9, blocks 16 / 32 / 64
    python bench/memory.py --models 28-2 --sparsities 0.9 --blocks 32 --json out.json

Nothing is estimated from formulas: each configuration takes one real SGD step (momentum,
weight decay) on a batch of 2 images, then the bytes of every tensor that the sparse layers own
are added up: the weights (dense) or packed values plus the layout's index tensors (block mode),
their gradients and their momentum buffers. Runs on the CPU; the byte counts are the same on a GPU.
Layers the block does not tile stay dense in block mode and are counted as dense there too.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from blockdpr.models import WideResNet, sparse_parameters  # noqa: E402
from blockdpr.sparsity.packed import to_block_sparse  # noqa: E402
from blockdpr.train import git_commit, versions  # noqa: E402


def nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


def train_step(model: torch.nn.Module) -> torch.optim.Optimizer:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True, weight_decay=5e-4)
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
    torch.manual_seed(0)
    dense_model = WideResNet(depth, width)
    names = list(sparse_parameters(dense_model))
    dense_bytes = parameter_state_bytes(list(sparse_parameters(dense_model).values()), train_step(dense_model))

    model = WideResNet(depth, width)
    structure, kept_dense = to_block_sparse(model, names, block, sparsity, seed=0)
    optimizer = train_step(model)
    still_dense = [p for n, p in model.named_parameters() if n in kept_dense]
    layout_bytes = sum(nbytes(t) for m in structure.layers for t in
                       (m.layout.mask, m.layout.row_ptr, m.layout.col_idx, m.layout.row_idx,
                        m.layout.col_ptr, m.layout.col_row_idx, m.layout.col_perm))
    block_bytes = parameter_state_bytes(structure.params + still_dense, optimizer) + layout_bytes
    density = sum(structure.nonzero_counts()) / sum(structure.dense_numels)
    return {
        "model": f"WRN-{depth}-{width}", "sparsity": sparsity, "block": block,
        "block_density": density, "layers_kept_dense": kept_dense,
        "dense_bytes": dense_bytes, "block_bytes": block_bytes, "layout_bytes": layout_bytes,
        "ratio": block_bytes / dense_bytes,
        "ratio_over_density": block_bytes / dense_bytes / (1 - sparsity),
    }


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["28-2", "28-10"], help="WRN depth-width pairs")
    parser.add_argument("--sparsities", nargs="+", type=float, default=[0.8, 0.9])
    parser.add_argument("--blocks", nargs="+", type=int, default=[16, 32, 64])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows to this JSON file")
    args = parser.parse_args(argv)

    rows = [measure(*map(int, m.split("-")), s, b) for m in args.models for s in args.sparsities for b in args.blocks]
    table = Table(title="sparse layers: parameters + gradients + SGD momentum (bytes)")
    for col in ("model", "sparsity", "block", "dense MB", "block MB", "block / dense", "/ (1 - s)", "kept dense"):
        table.add_column(col, justify="right")
    for r in rows:
        table.add_row(r["model"], f"{r['sparsity']:.2f}", str(r["block"]), f"{r['dense_bytes'] / 1e6:.2f}",
                      f"{r['block_bytes'] / 1e6:.2f}", f"{r['ratio']:.3f}", f"{r['ratio_over_density']:.3f}",
                      str(len(r["layers_kept_dense"])))
    Console(width=140).print(table)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        record = {"command": " ".join([sys.executable, *sys.argv]), "git_commit": git_commit(), "versions": versions(),
                  "device": "cpu (byte counts do not depend on the device)", "rows": rows}
        args.json.write_text(json.dumps(record, indent=2) + "\n")
    return rows


if __name__ == "__main__":
    main()
