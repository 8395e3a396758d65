"""DPR in a plain training loop: the MLPs of a small GPT-style model, block mode on BlockSparseLinear.

    python -m examples.gpt_mlp                               # d = 256, block 32, on the GPU if there is one
    python -m examples.gpt_mlp --granularity element

Each layer is a pre-norm residual MLP as in GPT-2 (LayerNorm, Linear d -> 4d, GELU, Linear 4d -> d);
the model reads random tokens and learns to predict each token's successor (t + 1 mod vocab). DPR's
default layer choice (every Linear but the last) makes both linears of every MLP sparse and leaves
the output head dense; in block mode they become blockdpr_kernels.BlockSparseLinear, which stores
and computes only the active (block x block) tiles. AdamW: its two moment tensors follow the
packed values, regrown blocks starting with zero moments.
"""

from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F
from torch import nn

from blockdpr import DPR


class MLP(nn.Module):
    """GPT-2's feed-forward block: x + W2 GELU(W1 LN(x)), W1 [4d, d], W2 [d, 4d]."""

    def __init__(self, d: int):
        super().__init__()
        self.ln = nn.LayerNorm(d)
        self.fc = nn.Linear(d, 4 * d)
        self.proj = nn.Linear(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.proj(F.gelu(self.fc(self.ln(x))))


class TokenMLP(nn.Module):
    """Embedding, `layers` residual MLPs, final LayerNorm, linear head: int64 [B, S] -> logits [B, S, vocab]."""

    def __init__(self, vocab: int, d: int, layers: int):
        super().__init__()
        self.embed = nn.Embedding(vocab, d)
        self.blocks = nn.Sequential(*[MLP(d) for _ in range(layers)])
        self.ln = nn.LayerNorm(d)
        self.head = nn.Linear(d, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.ln(self.blocks(self.embed(tokens))))


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(prog="python -m examples.gpt_mlp", description=__doc__.split("\n")[0])
    p.add_argument("--granularity", choices=("element", "block"), default="block")
    p.add_argument("--block", type=int, default=32)
    p.add_argument("--sparsity", type=float, default=0.8)
    p.add_argument("--d", type=int, default=256, help="model width (the MLP's hidden width is 4d)")
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=512)
    p.add_argument("--seq", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--period", type=int, default=50)
    p.add_argument("--initial-threshold", type=float, default=0.001, help="H at step 0 (the paper's 0.001)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    device = torch.device(args.device)
    torch.manual_seed(args.seed)
    model = TokenMLP(args.vocab, args.d, args.layers).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    dpr = DPR(model, optimizer, sparsity=args.sparsity, granularity=args.granularity, block=args.block,
              period=args.period, initial_threshold=args.initial_threshold, seed=args.seed)

    generator = torch.Generator(device).manual_seed(args.seed)
    losses, moved = [], 0
    for _ in range(args.steps):
        tokens = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=generator, device=device)
        optimizer.zero_grad()
        loss = F.cross_entropy(model(tokens).flatten(0, 1), ((tokens + 1) % args.vocab).flatten())
        loss.backward()
        result = dpr.step()  # instead of optimizer.step()
        moved += result.pruned if result is not None else 0
        losses.append(loss.item())
    summary = {"granularity": args.granularity, "steps": args.steps, "first_loss": losses[0], "last_loss": losses[-1],
               "units_moved": moved, "sparse_layers": dpr.names, "dense_layers": dpr.dense_layers,
               "nonzero_sparse_weights": sum(dpr.nonzero_counts()),
               "block_sparse_linears": sum(type(m).__name__ == "BlockSparseLinear" for m in model.modules())}
    print(summary)
    return summary


if __name__ == "__main__":
    main()
