"""DPR: dynamic parameter reallocation for any model and training loop, in one object.

    dpr = DPR(model, optimizer, sparsity=0.9)                                    # element mode
    dpr = DPR(model, optimizer, sparsity=0.9, granularity="block", block=32)     # packed blocks
    for x, y in loader:
        optimizer.zero_grad()
        loss_fn(model(x), y).backward()
        dpr.step()          # instead of optimizer.step()

`step()` masks the gradients, runs the optimizer, re-masks the weights (so a pruned weight is
exactly zero through momentum, weight decay and Adam) and, every `period` steps until `stop_step`,
reallocates: prune below the global threshold H, move H toward the target pruned count, regrow as
many units at random, split over the tensors by their surviving units (reallocator.py). Regrown
units start at zero with zero optimizer state (every state tensor shaped like the parameter or its
packed values; scalar state such as Adam's step is kept).

Layers: every nn.Conv2d and nn.Linear except the first conv and the last linear (the input and
output layers, which the paper keeps dense), or those for which `include(module, name)` is true.
Element mode keeps dense weights with masks; block mode replaces the layers in place by
blockdpr_kernels' BlockSparseConv2d / BlockSparseLinear (only the active blocks are stored and
computed); a layer the block does not tile stays dense and is named in `dense_layers`.

Randomness comes from generators seeded by (seed, step): data-parallel ranks get the same masks
without communication, and `state_dict()` (masks, H, step count) is all a resume needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from .blocks import block_grid, weight_to_matrix
from .dense_grad import DenseGradCapture
from .distribution import DISTRIBUTIONS, densities
from .element import ElementSparsity
from .packed import BlockSparsity, _replace_in_optimizer, check_block, to_block_sparse
from .reallocator import DPRConfig, ReallocationResult, Reallocator
from .rules import RULES, DropAndGrow, DropGrowResult
from .schedule import PAPER_REALLOC_PERIODS  # the paper's period by epoch: ((epoch, P), ...)
from .select import seeded_generator
from .structure import SparseStructure, reallocate_structures

# The paper's N_p = 20,000 as a fraction of WRN-28-2's 145,152 active weights at sparsity 0.9.
PAPER_TARGET_FRACTION = 0.138


@dataclass(frozen=True)
class EpochSchedule:
    """A period by epoch as a function of the step: `EpochSchedule(steps_per_epoch)(i)` is the value in
    force at step i (0-based), i.e. in epoch i // steps_per_epoch. Default: the paper's periods."""

    steps_per_epoch: int
    schedule: tuple[tuple[int, int], ...] = PAPER_REALLOC_PERIODS

    def __post_init__(self):
        if self.steps_per_epoch <= 0:
            raise ValueError(f"steps_per_epoch must be positive, got {self.steps_per_epoch}")
        epochs = [e for e, _ in self.schedule]
        if not epochs or epochs[0] != 0 or epochs != sorted(set(epochs)) or any(p <= 0 for _, p in self.schedule):
            raise ValueError(f"schedule must be ((epoch, period), ...) from epoch 0, increasing, periods > 0; "
                             f"got {self.schedule}")

    def __call__(self, step: int) -> int:
        epoch = step // self.steps_per_epoch
        return int([p for e, p in self.schedule if e <= epoch][-1])


def default_include(model: nn.Module) -> Callable[[nn.Module, str], bool]:
    """Every Conv2d and Linear but the first conv and the last linear of `model` (module order)."""
    convs = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    skip = set(convs[:1] + linears[-1:])
    return lambda module, name: isinstance(module, (nn.Conv2d, nn.Linear)) and name not in skip


class DPR:
    """Dynamic parameter reallocation over the sparse layers of `model`, driving `optimizer`.

    sparsity: fraction of each chosen layer's weights (element mode) or blocks (block mode) that
    start inactive. granularity: "element" or "block" (with `block` 16, 32 or 64 for convs; 16, 32,
    64 or 128 for linears). include: filter_fn(module, name) -> bool choosing the layers (default:
    see default_include). period: steps between reallocations, an int or a function step -> period
    (EpochSchedule(steps_per_epoch) is the paper's schedule). stop_step: no reallocation after this
    step (None: never stops). target_pruned: N_p, a float fraction of the active units (default
    0.138, the paper's 20,000 of WRN-28-2's 145,152) or an int count. tolerance: delta. initial
    threshold: H at step 0. seed: the initial structure and every regrowth draw (with the step).
    keep_momentum (element mode): leave optimizer state of pruned and regrown weights as it is.

    rule: "dsr" (the paper's global adaptive threshold, above), "set" or "rigl" (per tensor: drop the
    fraction `alpha` of its active units of smallest magnitude, grow as many at random (set) or of
    largest gradient magnitude (rigl), every `period` steps; rigl decays alpha by a cosine and stops
    at `t_end`; see sparsity/rules.py). The DSR settings (target_pruned, tolerance,
    initial_threshold) apply to dsr only. distribution: the initial density per layer, "uniform"
    (the paper's) or "erk" (Erdos-Renyi-Kernel, sparsity/distribution.py).
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, sparsity: float = 0.9, *,
                 granularity: str = "element", block: int = 32,
                 include: Callable[[nn.Module, str], bool] | None = None,
                 period: int | Callable[[int], int] = 100, stop_step: int | None = None,
                 target_pruned: float | int = PAPER_TARGET_FRACTION, tolerance: float = 0.1,
                 initial_threshold: float = 0.001, seed: int = 0, keep_momentum: bool = False,
                 rule: str = "dsr", alpha: float = 0.3, t_end: int | None = None, distribution: str = "uniform"):
        if granularity not in ("element", "block"):
            raise ValueError(f"granularity must be 'element' or 'block', got {granularity!r}")
        if not 0 < sparsity < 1:
            raise ValueError(f"sparsity must be in (0, 1), got {sparsity}")
        check_schedule(period, stop_step, target_pruned, tolerance, initial_threshold)  # before the model changes
        if keep_momentum and granularity == "block":
            raise ValueError("keep_momentum has no meaning in block mode: a pruned block's state is dropped with it")
        include = include or default_include(model)
        chosen = {f"{name}.weight": m for name, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and include(m, name)}
        if not chosen:
            raise ValueError("no layer to make sparse: include chose no nn.Conv2d or nn.Linear of the model")
        drop_and_grow = _drop_and_grow(rule, alpha, t_end)
        if distribution not in DISTRIBUTIONS:
            raise ValueError(f"distribution must be one of {DISTRIBUTIONS}, got {distribution!r}")
        if granularity == "element":
            params = {n: m.weight for n, m in chosen.items()}
            shares = None if distribution == "uniform" else densities(
                distribution, [tuple(p.shape) for p in params.values()], sparsity)
            structure = ElementSparsity.random(params, sparsity, seed, densities=shares)
            dense_layers = []
        else:
            check_block(block, any(isinstance(m, nn.Conv2d) for m in chosen.values()))
            _check_one_group(optimizer, [m.weight for m in chosen.values()
                                         if block_grid(m.weight.shape, (block, block)) is not None])
            structure, dense_layers = to_block_sparse(model, list(chosen), block, sparsity, seed,
                                                      distribution=distribution)
            _move_to_packed(optimizer, chosen, structure)
        self._init(structure, optimizer, dense_layers, period, stop_step, target_pruned, tolerance,
                   initial_threshold, seed, keep_momentum, drop_and_grow=drop_and_grow)
        structure.apply_()

    @classmethod
    def from_structure(cls, structure: SparseStructure, optimizer, *, dynamic: bool = True,
                       period: int | Callable[[int], int] = 100, stop_step: int | None = None,
                       target_pruned: float | int = PAPER_TARGET_FRACTION, tolerance: float = 0.1,
                       initial_threshold: float = 0.001, seed: int = 0, keep_momentum: bool = False,
                       dense_layers: list[str] = (), optimizer_state: Callable[[], object] | None = None,
                       rule: str = "dsr", alpha: float = 0.3, t_end: int | None = None) -> "DPR":
        """DPR over a storage made elsewhere (e.g. the per-trial views of a stacked model).

        dynamic=False: a fixed structure (masking only; static, reinit, gmp baselines). optimizer:
        what step() runs (None: the caller steps its own optimizer, calling mask_gradients, then
        mask_weights, then advance and, when it says so, reallocate); optimizer_state: () -> an object
        whose .state maps this structure's parameters to their state (default: the optimizer)."""
        dpr = cls.__new__(cls)
        dpr._init(structure, optimizer, list(dense_layers), period, stop_step, target_pruned, tolerance,
                  initial_threshold, seed, keep_momentum, dynamic, optimizer_state,
                  _drop_and_grow(rule, alpha, t_end) if dynamic else None)
        return dpr

    def _init(self, structure, optimizer, dense_layers, period, stop_step, target_pruned, tolerance,
              initial_threshold, seed, keep_momentum, dynamic=True, optimizer_state=None, drop_and_grow=None) -> None:
        check_schedule(period, stop_step, target_pruned, tolerance, initial_threshold)
        if keep_momentum and isinstance(structure, BlockSparsity):
            raise ValueError("keep_momentum has no meaning in block mode: a pruned block's state is dropped with it")
        self.structure, self.optimizer, self.dense_layers = structure, optimizer, dense_layers
        self.period, self.stop_step, self.seed, self.keep_momentum = period, stop_step, int(seed), keep_momentum
        self._optimizer_state = optimizer_state or (lambda: self.optimizer)
        self.steps = 0  # optimizer steps taken
        self.reallocator = None
        self.dynamic = dynamic
        self.drop_and_grow: DropAndGrow | None = drop_and_grow  # set / rigl; None: dsr (or fixed)
        self._capture: DenseGradCapture | None = None  # block-mode rigl: open around an update step
        if dynamic and drop_and_grow is None:
            count = resolve_target(target_pruned, lambda: int(structure.flat_mask().sum()))
            self.reallocator = Reallocator(structure.segments.sizes, DPRConfig(count, tolerance, initial_threshold),
                                           self.seed, structure.segments.device)
        self.prepare_step()

    @property
    def rule(self) -> str | None:
        """"dsr", "set" or "rigl"; None for a fixed structure."""
        return None if not self.dynamic else self.drop_and_grow.name if self.drop_and_grow else "dsr"

    # ---- what a training loop calls ------------------------------------------------------
    def step(self) -> ReallocationResult | DropGrowResult | None:
        """Instead of optimizer.step(): mask gradients, step, re-mask weights, reallocate when due
        (returns what the reallocation did, or None). RigL reads the gradient magnitudes of the
        step that ends with an update before they are masked."""
        grads = self.gradient_scores() if self.needs_gradients_next() else None
        self.mask_gradients()
        self.optimizer.step()
        self.mask_weights()
        result = self.reallocate(grads) if self.advance() else None
        self.prepare_step()
        return result

    def needs_gradients_next(self) -> bool:
        """Whether the next optimizer step ends with a RigL update, which needs that step's gradient
        magnitudes (gradient_scores) after backward and before mask_gradients."""
        return self.drop_and_grow is not None and self.drop_and_grow.needs_gradients and self._due(self.steps + 1)

    def prepare_step(self) -> bool:
        """Before the forward of the next optimizer step: whether that step ends with a RigL update
        (needs_gradients_next), and for block-mode RigL, if so, hook the sparse layers for its forward
        and backward (the packed gradient has the active blocks only; see DenseGradCapture). step()
        calls it; a loop that drives DPR without step() (advance / reallocate) calls it before each
        forward and, when it returns True, gradient_scores() after that backward."""
        due = self.needs_gradients_next()
        if due and isinstance(self.structure, BlockSparsity) and self._capture is None:
            self._capture = DenseGradCapture(dict(zip(self.structure.names, self.structure.layers))).__enter__()
        return due

    def gradient_scores(self) -> torch.Tensor:
        """float [n units]: gradient magnitude of every unit at this step (after backward, before
        mask_gradients; block mode: of the step DPR hooked, see step())."""
        if not isinstance(self.structure, BlockSparsity):
            return self.structure.flat_grad_scores()
        if self._capture is None:
            raise RuntimeError("block mode: no dense gradient was captured for this step (DPR hooks the step "
                               "before an update: call dpr.step() once per optimizer step)")
        self._capture.__exit__(None, None, None)
        capture, self._capture = self._capture, None
        return self.structure.flat_grad_scores(capture.matrices())

    def mask_gradients(self) -> None:
        """Zero the gradients of inactive weights (before the optimizer step; no-op in block mode)."""
        self.structure.mask_grads_()

    def mask_weights(self) -> None:
        """Zero the inactive weights (after the optimizer step; no-op in block mode)."""
        self.structure.apply_()

    def advance(self) -> bool:
        """Count one optimizer step; whether a reallocation is due after it."""
        self.steps += 1
        return self._due(self.steps)

    def _due(self, steps: int) -> bool:
        """Whether a reallocation follows optimizer step number `steps` (1-based)."""
        if not self.dynamic or (self.stop_step is not None and steps > self.stop_step):
            return False
        if self.drop_and_grow is not None and not self.drop_and_grow.active_at(steps):
            return False
        period = self.period(steps - 1) if callable(self.period) else self.period
        return steps % period == 0

    def reallocate(self, grad_scores: torch.Tensor | None = None) -> ReallocationResult | DropGrowResult:
        """One reallocation now (seeded by (seed, steps)). dsr: NonFiniteWeights (nothing changed) on NaN
        or inf. set / rigl: one drop-and-grow update, no host sync; rigl needs grad_scores (float [n
        units], see gradient_scores)."""
        if self.drop_and_grow is None:
            return DPR.reallocate_all([self])[0]
        structure = self.structure
        generator = seeded_generator(structure.segments.device, self.seed, self.steps)
        survived, grown = self.drop_and_grow.update(structure.segments, structure.flat_scores(),
                                                    structure.flat_mask(), grad_scores, self.steps, generator)
        structure.set_structure(survived, grown, self._optimizer_state(), self.keep_momentum)
        return DropGrowResult(survived, grown, self.drop_and_grow.drop_fraction(self.steps))

    @staticmethod
    def reallocate_all(dprs: list["DPR"], grad_scores: list[torch.Tensor | None] | None = None
                       ) -> list[ReallocationResult | DropGrowResult]:
        """One reallocation of each of several DPR objects (e.g. the trials of a process, on one step),
        each as if alone, with one host sync for all (dsr); set / rigl objects update alone, rigl with
        its entry of grad_scores."""
        if any(d.drop_and_grow is not None for d in dprs):  # per-tensor rules: each alone, no sync to share
            scores = grad_scores if grad_scores is not None else [None] * len(dprs)
            return [d.reallocate(s) for d, s in zip(dprs, scores, strict=True)]
        return reallocate_structures([d.structure for d in dprs], [d.reallocator for d in dprs], dprs[0].steps,
                                     [d._optimizer_state() for d in dprs], dprs[0].keep_momentum)

    def prune_to_sparsity(self, sparsity: float) -> None:
        """Magnitude pruning: each tensor keeps its initial_keep_count(units, sparsity) strongest active units
        (gradual magnitude pruning calls this with a rising sparsity)."""
        self.structure.prune_to_sparsity(sparsity, self._optimizer_state())

    # ---- reporting -----------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        """The sparse weights, e.g. 'layer1.0.conv1.weight'."""
        return self.structure.names

    @property
    def threshold(self) -> float | None:
        """H (None for a fixed structure)."""
        return None if self.reallocator is None else self.reallocator.threshold

    @property
    def target_pruned(self) -> int | None:
        """N_p in units (elements or blocks)."""
        return None if self.reallocator is None else self.reallocator.config.target_pruned

    def densities(self) -> dict[str, float]:
        return self.structure.densities()

    def nonzero_counts(self) -> list[int]:
        return self.structure.nonzero_counts()

    # ---- persistence ---------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Masks (element masks or block grids, on the CPU), H, the step count and the seed."""
        return {"masks": self.structure.state_dict(), "steps": self.steps, "seed": self.seed, "rule": self.rule,
                "reallocator": None if self.reallocator is None else self.reallocator.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        """Continue from `state_dict()`. Block mode gets new packed Parameters (the optimizer is told):
        load this before the model's and the optimizer's state_dicts."""
        if int(state["seed"]) != self.seed:
            raise ValueError(f"DPR state: seed {state['seed']} differs from this object's {self.seed}")
        saved_rule = state.get("rule", "dsr" if state["reallocator"] is not None else None)  # older states: dsr
        if saved_rule != self.rule:
            if None in (saved_rule, self.rule):
                raise ValueError("DPR state: a fixed structure and a dynamic one do not load into each other")
            raise ValueError(f"DPR state: rule {saved_rule!r} differs from this object's {self.rule!r}")
        self.structure.load_state_dict(state["masks"], self.optimizer)
        if self.reallocator is not None:
            self.reallocator.load_state_dict(state["reallocator"])
        self.steps = int(state["steps"])
        if self._capture is not None:  # hooked for the old step count
            self._capture.__exit__(None, None, None)
            self._capture = None
        self.prepare_step()


def _drop_and_grow(rule: str, alpha: float, t_end: int | None) -> DropAndGrow | None:
    """None for dsr (the reallocator), the per-tensor rule's settings for set / rigl."""
    if rule not in RULES:
        raise ValueError(f"rule must be one of {RULES}, got {rule!r}")
    return None if rule == "dsr" else DropAndGrow(rule, alpha, t_end)


def check_schedule(period, stop_step, target_pruned, tolerance: float, initial_threshold: float) -> None:
    """ValueError / TypeError naming the first bad schedule or DPR setting."""
    if not callable(period) and (isinstance(period, bool) or not isinstance(period, int) or period <= 0):
        raise ValueError(f"period must be a positive int or a function step -> period, got {period!r}")
    if stop_step is not None and stop_step < 0:
        raise ValueError(f"stop_step must be >= 0 or None, got {stop_step}")
    resolve_target(target_pruned, lambda: 1)
    DPRConfig(1, tolerance, initial_threshold)  # its own checks of tolerance and H


def resolve_target(target_pruned: float | int, active_units: Callable[[], int]) -> int:
    """N_p in units: an int is a count; a float is a fraction of active_units() (at least 1)."""
    if isinstance(target_pruned, bool) or not isinstance(target_pruned, (int, float)):
        raise TypeError(f"target_pruned must be an int count or a float fraction, got {target_pruned!r}")
    if isinstance(target_pruned, int):
        if target_pruned <= 0:
            raise ValueError(f"target_pruned must be positive, got {target_pruned}")
        return target_pruned
    if not 0 < target_pruned <= 1:
        raise ValueError(f"target_pruned as a fraction of the active units must be in (0, 1], got {target_pruned}")
    return max(1, round(target_pruned * active_units()))


def _groups_holding(optimizer: torch.optim.Optimizer, tensors: list[torch.Tensor]) -> list[dict]:
    """The optimizer's param groups that hold any of `tensors`, in order."""
    ids = {id(t) for t in tensors}
    return [g for g in optimizer.param_groups if any(id(p) in ids for p in g["params"])]


def _check_one_group(optimizer: torch.optim.Optimizer, weights: list[torch.Tensor]) -> None:
    """ValueError unless the optimizer's groups holding `weights` have the same settings: block mode packs
    them into one Parameter."""
    groups = _groups_holding(optimizer, weights)
    settings = [{k: v for k, v in g.items() if k != "params"} for g in groups]
    if any(s != settings[0] for s in settings[1:]):
        raise ValueError("block mode packs the sparse layers' weights into one Parameter: they must be in one "
                         f"optimizer param group (or groups with the same settings), found {len(groups)} groups "
                         "that differ")


@torch.no_grad()
def _move_to_packed(optimizer: torch.optim.Optimizer, dense: dict[str, nn.Module], structure: BlockSparsity) -> None:
    """The optimizer held the dense layers' weight and bias: give it the packed storage's values (one
    Parameter for all layers, in the group of the first weight; each state tensor packed, zeros for a
    weight that had none) and the bias (state carried) instead (_check_one_group ran before)."""
    weights = [dense[name].weight for name in structure.names]
    groups = _groups_holding(optimizer, weights)
    if groups:
        values = structure.storage.values
        states = [optimizer.state.pop(w, {}) for w in weights]
        packed = {}
        for key in {k for st, w in zip(states, weights) for k, v in st.items() if torch.is_tensor(v) and v.shape == w.shape}:
            packed[key] = torch.cat([layer.layout.pack(weight_to_matrix(st[key]).contiguous()) if key in st
                                     else layer.values.new_zeros(layer.values.shape)
                                     for st, layer in zip(states, structure.layers)])
        rest = {k: v for st in states for k, v in st.items() if k not in packed}  # scalars such as Adam's step
        if packed or rest:
            optimizer.state[values] = {**rest, **packed}
        ids = {id(w) for w in weights}
        first = next(i for i, p in enumerate(groups[0]["params"]) if id(p) in ids)
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        groups[0]["params"].insert(first, values)  # where the first packed weight was
    held = {p for group in optimizer.param_groups for p in group["params"]}
    for name, layer in zip(structure.names, structure.layers):
        old = dense[name]
        if old.bias is not None and old.bias in held:
            _replace_in_optimizer(optimizer, old.bias, layer.bias, lambda t: t)
