"""Data parallelism for `torchrun --nproc-per-node N -m blockdpr.train ...`.

Each rank computes the gradient of its share of the global batch; gradients are averaged with
one all-reduce per step over a flat buffer (not torch's DDP wrapper, whose buckets assume that
parameter shapes never change, while block mode repacks its parameters at every reallocation).
Since every rank starts from the same seed and applies the same averaged gradient, weights stay
identical, and the reallocator, seeded by (seed, step), makes the same decisions everywhere:
masks never diverge and no mask traffic is needed. `check_replicas` verifies that cheaply.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors


@dataclass(frozen=True)
class Distributed:
    """This process's place in the job (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_env(cls, device_type: str) -> "Distributed":
        """Join the torchrun job described by the environment (WORLD_SIZE, RANK, LOCAL_RANK), if any.
        NCCL for CUDA devices, gloo for CPU."""
        world_size = int(os.environ.get("WORLD_SIZE", "1"))
        if world_size == 1:
            return cls()
        if not dist.is_initialized():
            dist.init_process_group("nccl" if device_type == "cuda" else "gloo")
        return cls(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))

    def shard(self, batch: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (all shares equal when it divides)."""
        return batch.tensor_split(self.world_size)[self.rank] if self.enabled else batch

    @torch.no_grad()
    def average_gradients_(self, params: list[torch.Tensor]) -> None:
        """Average the gradients of `params` over ranks, in place (one all-reduce)."""
        if not self.enabled:
            return
        grads = [p.grad for p in params if p.grad is not None]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat)
        flat /= self.world_size
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    @torch.no_grad()
    def broadcast_buffers_(self, module: torch.nn.Module) -> None:
        """Give every rank rank 0's buffers (BN running statistics, which each rank updates from its own share)."""
        if self.enabled:
            for buffer in module.buffers():
                dist.broadcast(buffer, 0)

    def sum_(self, values: torch.Tensor) -> torch.Tensor:
        """Sum a tensor over ranks, in place (for epoch accumulators)."""
        if self.enabled:
            dist.all_reduce(values)
        return values

    @torch.no_grad()
    def check_replicas(self, tensors: list[torch.Tensor], what: str) -> None:
        """Raise if `tensors` differ between ranks (compares per-tensor float64 checksums)."""
        if not self.enabled:
            return
        sums = torch.stack([t.detach().double().sum() for t in tensors] +
                           [(t.detach().double() * torch.arange(t.numel(), device=t.device, dtype=torch.float64)
                             .view_as(t)).sum() for t in tensors])
        low, high = sums.clone(), sums.clone()
        dist.all_reduce(low, dist.ReduceOp.MIN)
        dist.all_reduce(high, dist.ReduceOp.MAX)
        if not torch.equal(low, high):
            raise RuntimeError(f"data-parallel ranks diverged: {what} differ between ranks (rank {self.rank})")

    def close(self) -> None:
        """Leave together: a barrier first, so no rank tears down its connections while another (rank 0
        writing the run's final files) still holds the group; gloo aborts a rank whose peer vanishes."""
        if self.enabled and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()
