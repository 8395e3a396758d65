"""One training step and one evaluation, written so that they can be captured as CUDA graphs.

`TrainStep.compute(x, y)` is the whole step on tensors: forward (optionally under bf16
autocast), per-trial cross-entropy, backward, the data-parallel gradient average, masking of the
sparse gradients, the optimizer step, re-masking of the weights, and the epoch accumulators
(loss sum and correct count per trial, on the device). `Evaluation.compute(images, labels)` is
the forward of one test batch into the test accumulators. Neither has a host sync or a Python
branch that depends on tensor values, so each runs three ways (`StaticCall`):

- eager (`static=False`): compute on the batch as given;
- static (`static=True`): the batch is copied into static input buffers (one set per batch
  shape) and compute runs on those: the same function, the same numbers (tested on CPU);
- CUDA graph (`graph=True`, CUDA only): as static, but compute is captured once per batch shape
  (after one eager call has created gradients, optimizer state and cuDNN plans) and replayed.
  Element-mode masks and block mode's packed storage and layouts are device tensors updated in place
  by reallocation, so the graphs stay valid; anything that replaces tensors a graph reads (block
  mode's new storage for a new total under gradual pruning, a new lr: SGD reads it as a Python
  number) must call `invalidate()`, and the next call captures
  again. Each graph keeps its own memory pool.
"""

from __future__ import annotations

from typing import Callable

import torch

from . import data as data_lib
from .distributed import Distributed
from .sparsity import DPR
from .stacked import StackedWideResNet, link_grads, per_trial_cross_entropy, stacked_input

# AUTOCAST: bf16 autocast runs without its cast cache, as torch requires of autocast in CUDA graphs
# (make_graphed_callables refuses the cache); a weight is cast once per forward either way.


class StaticCall:
    """Calls `fn(*tensors)` eagerly, on static copies of the tensors, or as one CUDA graph per input
    shape (see the module docstring). `fn` returns nothing: its results are in-place updates."""

    def __init__(self, fn: Callable[..., None], static: bool = False, graph: bool = False):
        self.fn, self.static, self.graph = fn, static or graph, graph
        self._buffers: dict[tuple, list[torch.Tensor]] = {}
        self._graphs: dict[tuple, torch.cuda.CUDAGraph] = {}

    def __call__(self, *tensors: torch.Tensor) -> None:
        if not self.static:
            self.fn(*tensors)
            return
        key = tuple((t.shape, t.stride()) for t in tensors)
        if key not in self._buffers:
            self._buffers[key] = [torch.empty_like(t) for t in tensors]
        buffers = self._buffers[key]
        for buffer, t in zip(buffers, tensors):
            buffer.copy_(t)
        if not self.graph:
            self.fn(*buffers)
        elif key in self._graphs:
            self._graphs[key].replay()
        else:
            self._graphs[key] = self._eager_then_capture(buffers)

    def _eager_then_capture(self, buffers: list[torch.Tensor]) -> torch.cuda.CUDAGraph:
        """This call eagerly on a side stream (creating gradients, optimizer state and cuDNN plans),
        then capture the next ones (capture records the kernels without running them)."""
        device = buffers[0].device
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(stream):
            self.fn(*buffers)
        torch.cuda.current_stream(device).wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self.fn(*buffers)
        return graph

    def invalidate(self) -> None:
        """Drop the captured graphs (tensors they read were replaced); the next call captures again."""
        self._graphs.clear()


class TrainStep:
    """The training step of T stacked trials.

    model: the stacked model (its parameters); net: what runs the forward (model, or compiled).
    dprs / views: per trial, its DPR object (None for dense; it masks gradients before the shared
    optimizer's step and weights after it) and sparse-tensor views.
    Accumulators: loss_sum float64 [T] (sum of per-image losses), correct int64 [T].
    """

    def __init__(self, model: StackedWideResNet, net: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 dprs: list[DPR | None], views: list[dict[str, torch.Tensor]], dist: Distributed,
                 amp: bool = False, channels_last: bool = False, static: bool = False, graph: bool = False):
        self.model, self.net, self.optimizer, self.dist = model, net, optimizer, dist
        self.dprs = [d for d in dprs if d is not None]
        self.views = views
        self.amp, self.channels_last = amp, channels_last
        device = next(model.parameters()).device
        self.loss_sum = torch.zeros(model.trials, dtype=torch.float64, device=device)
        self.correct = torch.zeros(model.trials, dtype=torch.int64, device=device)
        self.call = StaticCall(self.compute, static, graph)
        # RigL: the DPR objects whose next update reads this step's gradient magnitudes (set by the
        # engine before the step; eager or static buffers only), and what the step read for them
        self.score_gradients: list[DPR] = []
        self.gradient_scores: dict[int, torch.Tensor] = {}

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One step on the trials' batches: x float [B, T * 3, 32, 32] (trial t in channels 3t..3t+2, as
        data.augment_trials gives it), y int64 [B, T]."""
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        self.call(x, y)

    def compute(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """The step itself on x float [B, T * 3, 32, 32] and y int64 [B, T]."""
        with torch.autocast(x.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=False):  # see AUTOCAST
            logits = self.net(x)  # [B, T, classes]
        losses = per_trial_cross_entropy(logits, y)  # [T]; the sum's gradient is each trial's own
        self.optimizer.zero_grad(set_to_none=False)  # keep the gradient tensors: trials' views of them stay valid
        losses.sum().backward()
        self.dist.average_gradients_(list(self.model.parameters()))
        link_grads(self.model, self.views)
        self.gradient_scores = {id(dpr): dpr.gradient_scores() for dpr in self.score_gradients}  # before masking
        for dpr in self.dprs:
            dpr.mask_gradients()
        self.optimizer.step()
        for dpr in self.dprs:
            dpr.mask_weights()
        self.loss_sum += losses.detach().double() * len(y)
        self.correct += (logits.argmax(2) == y).sum(0)

    def invalidate(self) -> None:
        self.call.invalidate()

    def take_accumulators(self) -> tuple[list[float], list[int]]:
        """The accumulators summed over ranks, as Python numbers (one host sync), then zeroed."""
        self.dist.sum_(self.loss_sum), self.dist.sum_(self.correct)
        losses, correct = torch.stack([self.loss_sum, self.correct.double()]).tolist()  # counts < 2**53: exact
        self.loss_sum.zero_(), self.correct.zero_()
        return losses, [int(c) for c in correct]


class Evaluation:
    """Each trial's mean loss and accuracy on a fixed test set (every trial sees the same images).

    images uint8 [N, 32, 32, 3], labels int64 [N], on the model's device; batches of `batch_size`
    run eagerly, on static buffers, or as CUDA graphs (see StaticCall), in eval mode without
    gradients. Accumulators: loss_sum float64 [T], correct int64 [T]. A captured evaluation keeps its
    graph's memory for the run: the activations of one batch of batch_size x T images.
    """

    def __init__(self, net: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, trials: int,
                 amp: bool = False, batch_size: int = 1000, static: bool = False, graph: bool = False):
        self.net, self.images, self.labels, self.trials = net, images, labels, trials
        self.amp, self.batch_size = amp, batch_size
        self.loss_sum = torch.zeros(trials, dtype=torch.float64, device=images.device)
        self.correct = torch.zeros(trials, dtype=torch.int64, device=images.device)
        self.call = StaticCall(self.compute, static, graph)

    def __call__(self) -> tuple[list[float], list[float]]:
        """(mean loss per trial, accuracy per trial), with one host sync at the end."""
        self.loss_sum.zero_(), self.correct.zero_()
        self.net.eval()
        with torch.no_grad():
            for i in range(0, len(self.images), self.batch_size):
                self.call(self.images[i:i + self.batch_size], self.labels[i:i + self.batch_size])
        self.net.train()
        losses, accuracies = (torch.stack([self.loss_sum, self.correct.double()]) / len(self.images)).tolist()
        return losses, accuracies

    def compute(self, images: torch.Tensor, labels: torch.Tensor) -> None:
        """One test batch: images uint8 [B, 32, 32, 3], labels int64 [B], into the accumulators."""
        with torch.autocast(images.device.type, torch.bfloat16, enabled=self.amp, cache_enabled=False):  # see AUTOCAST
            logits = self.net(stacked_input([data_lib.normalize(images)] * self.trials))  # [B, T, classes]
        y = labels[:, None].expand(-1, self.trials)
        self.loss_sum += per_trial_cross_entropy(logits, y, reduction="sum")
        self.correct += (logits.argmax(2) == y).sum(0)

    def invalidate(self) -> None:
        self.call.invalidate()
