"""Several trials trained together in one process: a stacked WRN.

WRN-28-2 is far too small to fill a large GPU, so trials on the same schedule (different seeds,
and possibly different modes and sparsities: their masks are per trial) are trained as one
model: T copies of WRN-d-k placed side by side along the channel axis.

- every conv becomes a grouped conv with groups=T: weight [T * C_out, C_in, kh, kw], and
  output channels t * C_out .. (t + 1) * C_out see only input channels of trial t, so rows
  t * C_out .. (t + 1) * C_out of the weight are exactly trial t's weight;
- every BN has T * C channels; BN statistics are per channel, so this is exactly T separate BNs
  (running statistics included);
- the classifier is a batched matmul: weight [T * classes, C], bias [T * classes], giving logits
  [B, T, classes];
- the input is [B, T * 3, 32, 32]: each trial's own batch (its own data order and augmentation)
  concatenated along channels.

The loss is the sum over trials of each trial's mean cross-entropy, so each trial's gradient is
exactly its own; SGD (momentum, Nesterov, weight decay) is elementwise, so one optimizer over the
stacked parameters is T independent optimizers. Results equal T separate runs up to float
rounding (a grouped conv may sum in another order); tests/test_stacked.py checks this.

Every stacked tensor (parameters, BN buffers, optimizer state) has dim 0 equal to T times the
plain model's, with trial t's part at rows t * n .. (t + 1) * n (0-dim tensors such as BN's
num_batches_tracked are shared: they are equal in all trials). `trial_state_dict` and
`load_trial_state_dicts` convert to and from the plain WideResNet format, so every trial's run
directory holds the same files as a single run, and a trial can be resumed alone or in any group.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
import torch.nn.functional as F
from torch import nn

from .models import WideResNet, sparse_parameters


class StackedLinear(nn.Module):
    """T linear layers on [B, T * C_in] -> [B, T, C_out]; weight [T * C_out, C_in], bias [T * C_out]."""

    def __init__(self, trials: int, in_features: int, out_features: int):
        super().__init__()
        self.trials, self.in_features, self.out_features = trials, in_features, out_features
        self.weight = nn.Parameter(torch.empty(trials * out_features, in_features))
        self.bias = nn.Parameter(torch.zeros(trials * out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t, o, c = self.trials, self.out_features, self.in_features
        x = x.reshape(x.shape[0], t, c)
        return torch.einsum("btc,toc->bto", x, self.weight.view(t, o, c)) + self.bias.view(t, o)


def _stack_modules(module: nn.Module, trials: int) -> None:
    """Replace (recursively, in place) every Conv2d, BatchNorm2d and Linear by its T-trial version."""
    for name, child in module.named_children():
        if isinstance(child, nn.Conv2d):
            new = nn.Conv2d(trials * child.in_channels, trials * child.out_channels, child.kernel_size, child.stride,
                            child.padding, bias=child.bias is not None, groups=trials * child.groups)
        elif isinstance(child, nn.BatchNorm2d):
            new = nn.BatchNorm2d(trials * child.num_features, child.eps, child.momentum)
        elif isinstance(child, nn.Linear):
            new = StackedLinear(trials, child.in_features, child.out_features)
        else:
            _stack_modules(child, trials)
            continue
        setattr(module, name, new)


class StackedWideResNet(WideResNet):
    """T WRN-depth-width side by side: float [B, T * 3, 32, 32] -> logits [B, T, classes].

    Parameter and buffer names are those of WideResNet; trials=1 is an ordinary WRN whose
    output has an extra trial axis. Initialise by loading per-trial state dicts
    (`load_trial_state_dicts`), not by reset_parameters (whose fan-out would count all trials).
    """

    def __init__(self, trials: int, depth: int = 28, width: int = 2, num_classes: int = 10):
        if trials < 1:
            raise ValueError(f"trials must be >= 1, got {trials}")
        super().__init__(depth, width, num_classes)
        self.trials = trials
        _stack_modules(self, trials)

    def reset_parameters(self) -> None:  # the plain init runs once in WideResNet.__init__; stacked weights are loaded
        if not hasattr(self, "trials"):
            super().reset_parameters()

    # ---- per-trial views and conversions ------------------------------------------------
    def _rows(self, tensor: torch.Tensor, t: int) -> torch.Tensor:
        if tensor.ndim == 0:
            return tensor
        n = tensor.shape[0] // self.trials
        return tensor[t * n:(t + 1) * n]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.to(self.conv1.weight.dtype))  # a no-op in float32 (tests run in float64)

    def trial_state_dict(self, t: int) -> dict[str, torch.Tensor]:
        """Trial t's weights and buffers in the plain WideResNet format (copies, on the CPU)."""
        return {k: self._rows(v.detach(), t).cpu().clone() for k, v in self.state_dict().items()}

    @torch.no_grad()
    def load_trial_state_dicts(self, states: list[dict[str, torch.Tensor]]) -> None:
        """Load T plain WideResNet state dicts (one per trial, in order)."""
        if len(states) != self.trials:
            raise ValueError(f"expected {self.trials} trial state dicts, got {len(states)}")
        own = self.state_dict()
        for k, v in own.items():
            parts = [s[k] for s in states]
            v.copy_(parts[0] if v.ndim == 0 else torch.cat([p.to(v.device, v.dtype) for p in parts]))

    def trial_sparse_tensors(self, t: int) -> dict[str, torch.Tensor]:
        """Trial t's sparse weights, name -> tensor sharing storage with the stacked parameter.

        With one trial these are the Parameters themselves. With several they are detached views;
        `link_grads` gives each view a .grad that is the matching view of the stacked gradient, so
        a sparsity object built on them masks weights and gradients in place.
        """
        params = sparse_parameters(self)
        if self.trials == 1:
            return params
        return {n: self._rows(p.detach(), t) for n, p in params.items()}


def link_grads(model: StackedWideResNet, views: list[dict[str, torch.Tensor]]) -> None:
    """Point views[t][name].grad at trial t's rows of the stacked parameter's gradient.

    Call after backward. Cheap when already linked: gradients must be kept between steps
    (optimizer.zero_grad(set_to_none=False)), so the link is made once.
    """
    if model.trials == 1:
        return
    linked = model.__dict__.setdefault("_linked_grads", {})  # name -> the stacked gradient the views point into
    for name, p in sparse_parameters(model).items():
        if p.grad is None or (linked.get(name) is p.grad and all(v[name].grad is not None for v in views)):
            continue
        for t, trial_views in enumerate(views):
            trial_views[name].grad = model._rows(p.grad, t)
        linked[name] = p.grad


def trial_optimizer(model: StackedWideResNet, optimizer: torch.optim.Optimizer, views: dict[str, torch.Tensor], t: int):
    """What ElementSparsity.reallocate / set_structure needs of an optimizer, for trial t.

    With one trial, the optimizer itself. With several, an object whose .state maps each of
    trial t's sparse views to views of the stacked optimizer state (so zeroing the state of
    pruned and regrown weights touches trial t's rows only). Build it when needed (state tensors
    are created at the first step and replaced by optimizer.load_state_dict).
    """
    if model.trials == 1:
        return optimizer
    state = {}
    for name, p in sparse_parameters(model).items():
        entries = optimizer.state.get(p, {})
        state[views[name]] = {k: model._rows(v, t) for k, v in entries.items()
                              if torch.is_tensor(v) and v.shape == p.shape}
    return SimpleNamespace(state=state)


def trial_optimizer_state_dict(model: StackedWideResNet, optimizer: torch.optim.Optimizer, t: int) -> dict:
    """Trial t's part of the optimizer's state_dict, in the format of a plain single-model run."""
    full = optimizer.state_dict()
    state = {i: {k: (model._rows(v, t).cpu().clone() if torch.is_tensor(v) and v.ndim > 0 else v) for k, v in s.items()}
             for i, s in full["state"].items()}
    return {"state": state, "param_groups": full["param_groups"]}


def load_trial_optimizer_state_dicts(model: StackedWideResNet, optimizer: torch.optim.Optimizer, states: list[dict]) -> None:
    """Load T plain optimizer state dicts (one per trial) into the stacked optimizer."""
    if len(states) != model.trials:
        raise ValueError(f"expected {model.trials} optimizer states, got {len(states)}")
    first = states[0]
    merged = {}
    for i in first["state"]:
        entry = {}
        for k, v in first["state"][i].items():
            entry[k] = torch.cat([s["state"][i][k] for s in states]) if torch.is_tensor(v) and v.ndim > 0 else v
        merged[i] = entry
    optimizer.load_state_dict({"state": merged, "param_groups": first["param_groups"]})


def stacked_input(batches: list[torch.Tensor]) -> torch.Tensor:
    """T batches float [B, 3, H, W] -> [B, T * 3, H, W] (each trial's images in its own channels)."""
    return batches[0] if len(batches) == 1 else torch.cat(batches, dim=1)


def per_trial_cross_entropy(logits: torch.Tensor, labels: torch.Tensor, reduction: str = "mean") -> torch.Tensor:
    """logits [B, T, classes], labels int64 [B, T] -> float [T]: each trial's cross-entropy (mean or sum over B)."""
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))  # at least float32 (bf16 under --amp)
    losses = F.cross_entropy(logits.permute(0, 2, 1), labels, reduction="none")  # [B, T]
    return losses.mean(0) if reduction == "mean" else losses.sum(0)
