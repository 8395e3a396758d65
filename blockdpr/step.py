"""One training step, written so that it can be captured as a CUDA graph; and evaluation.

`TrainStep.compute(x, y)` is the whole step on tensors: forward (optionally under bf16
autocast), per-trial cross-entropy, backward, the data-parallel gradient average, masking of the
sparse gradients, the optimizer step, re-masking of the weights, and the epoch accumulators
(loss sum and correct count per trial, on the device). It has no host sync and no Python branch
that depends on tensor values, so:

- eager (`static=False`): compute on the batch as given;
- static (`static=True`): the batch is copied into static input buffers (one pair per batch
  size) and the step runs on those: the same function, the same numbers (tested on CPU);
- CUDA graph (`graph=True`, CUDA only): as static, but the step is captured once per batch size
  (after one eager step has created gradients and optimizer state) and replayed. Element-mode
  masks are device tensors updated in place by reallocation, so the graph stays valid; anything
  that replaces tensors the graph reads (block mode's repacking at a reallocation, a new lr: SGD
  reads it as a Python number) must call `invalidate()`, and the next step captures again.
"""

from __future__ import annotations

import torch

from . import data as data_lib
from .distributed import Distributed
from .sparsity import SparseStructure
from .stacked import StackedWideResNet, link_grads, per_trial_cross_entropy, stacked_input


class TrainStep:
    """The training step of T stacked trials.

    model: the stacked model (its parameters); net: what runs the forward (model, or compiled).
    sparsities / views: per trial, its sparse structure (None for dense) and sparse-tensor views.
    Accumulators: loss_sum float64 [T] (sum of per-image losses), correct int64 [T].
    """

    def __init__(self, model: StackedWideResNet, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 sparsities: list[SparseStructure | None], views: list[dict[str, torch.Tensor]], dist: Distributed,
                 amp: bool = False, channels_last: bool = False, static: bool = False, graph: bool = False):
        self.model, self.net, self.optimizer, self.dist = model, net, optimizer, dist
        self.sparsities = [s for s in sparsities if s is not None]
        self.views = views
        self.amp, self.channels_last = amp, channels_last
        self.static, self.graph = static or graph, graph
        device = next(model.parameters()).device
        self.device = device
        self.loss_sum = torch.zeros(model.trials, dtype=torch.float64, device=device)
        self.correct = torch.zeros(model.trials, dtype=torch.int64, device=device)
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._warm: set[int] = set()

    def __call__(self, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> None:
        """One step on each trial's batch: xs float [B, 3, 32, 32], ys int64 [B] (T of each)."""
        x, y = stacked_input(xs), torch.stack(ys, 1)  # [B, T * 3, 32, 32], [B, T]
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        if not self.static:
            self.compute(x, y)
            return
        batch = len(y)
        if batch not in self._buffers:
            self._buffers[batch] = (torch.empty_like(x), torch.empty_like(y))
        static_x, static_y = self._buffers[batch]
        static_x.copy_(x)
        static_y.copy_(y)
        if not self.graph:
            self.compute(static_x, static_y)
        elif batch in self._graphs:
            self._graphs[batch].replay()
        else:
            self._eager_then_capture(batch, static_x, static_y)

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The step itself on x float [B, T * 3, 32, 32] and y int64 [B, T]."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp):
            logits = self.net(x)  # [B, T, classes]
        losses = per_trial_cross_entropy(logits, y)  # [T]; the sum's gradient is each trial's own
        self.optimizer.zero_grad(set_to_none=False)  # keep the gradient tensors: trials' views of them stay valid
        losses.sum().backward()
        self.dist.average_gradients_(list(self.model.parameters()))
        link_grads(self.model, self.views)
        for sparsity in self.sparsities:
            sparsity.mask_grads_()
        self.optimizer.step()
        for sparsity in self.sparsities:
            sparsity.apply_()
        self.loss_sum += losses.detach().double() * len(y)
        self.correct += (logits.argmax(2) == y).sum(0)

    def _eager_then_capture(self, batch: int, x: torch.Tensor, y: torch.Tensor) -> None:
        """This step eagerly on a side stream (creating gradients and optimizer state), then capture
        the next ones (capture records the kernels without running them)."""
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            self.compute(x, y)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.compute(x, y)
        self._graphs[batch] = graph

    def invalidate(self) -> None:
        """Drop the captured graphs (tensors they read were replaced); the next step captures again."""
        self._graphs.clear()

    def take_accumulators(self) -> tuple[list[float], list[int]]:
        """The accumulators summed over ranks, as Python numbers (one host sync), then zeroed."""
        self.dist.sum_(self.loss_sum), self.dist.sum_(self.correct)
        values = self.loss_sum.tolist(), self.correct.tolist()
        self.loss_sum.zero_(), self.correct.zero_()
        return values


def evaluate(net, images: torch.Tensor, labels: torch.Tensor, trials: int, amp: bool,
             batch_size: int = 1000) -> tuple[list[float], list[float]]:
    """Each trial's mean loss and accuracy on uint8 images [N, 32, 32, 3] (one host sync at the end)."""
    net.eval()
    loss_sum = torch.zeros(trials, device=images.device)
    correct = torch.zeros(trials, dtype=torch.int64, device=images.device)
    with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
        for i in range(0, len(images), batch_size):
            x = data_lib.normalize(images[i:i + batch_size])
            logits = net(stacked_input([x] * trials))  # every trial sees the same test images
            y = labels[i:i + batch_size, None].expand(-1, trials)
            loss_sum += per_trial_cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(2) == y).sum(0)
    net.train()
    return (loss_sum / len(images)).tolist(), (correct.double() / len(images)).tolist()
