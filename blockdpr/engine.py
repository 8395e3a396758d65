"""The training engine: what a step computes, with no files and no console.

`Engine(configs)` holds T >= 1 trials trained together (one stacked model, blockdpr/stacked.py):
the data tensors on the device, the model, one `DPR` object per sparse trial (blockdpr.DPR: its
masking, schedule and reallocation; None for a dense trial), the optimizer, the training step
(eager, static buffers or CUDA graph: blockdpr/step.py) and the evaluation. A run
(blockdpr/loop.py: run directory, checkpoints, metrics, signals, printing) drives it; benchmarks
time it directly. It writes nothing and prints nothing; it reads only its data and the finished
runs a mode starts from (reinit, orig-init: final masks; gmp: the dense model).

All randomness is a function of (seed, epoch or step): the data order of an epoch, each step's
augmentation and every reallocation; so an engine loaded from a checkpoint continues exactly.
"""

from __future__ import annotations

import contextlib
import math

import torch
from torch import nn

from . import data as data_lib
from .config import ConfigError, RunConfig, check_trials, value_at
from .distributed import Distributed
from .setup import build_sparsity, initial_state, resolve_device, sgd
from .sparsity import DPR, EpochSchedule, ReallocationResult, gmp_pruning_index, gmp_sparsity
from .sparsity.select import seeded_generator
from .stacked import StackedWideResNet, load_trial_optimizer_state_dicts, trial_optimizer, trial_optimizer_state_dict
from .step import Evaluation, TrainStep


class Engine:
    """T trials on one schedule (config.check_trials): model, data, DPR objects, optimizer, step.

    initial: each trial's initial weights (plain WideResNet state dicts; default setup.initial_state).
    checkpoints: per trial, a checkpoint dict to continue from ("model", "optimizer", "masks",
    "reallocator", "progress", "rng"; see state_dict), or None to start.
    """

    def __init__(self, configs: list[RunConfig], dist: Distributed | None = None, data: data_lib.CIFAR10 | None = None,
                 initial: list[dict] | None = None, checkpoints: list[dict] | None = None):
        cfg = self.cfg = check_trials(configs)
        self.configs, self.T = list(configs), len(configs)
        self.dist = dist = dist or Distributed()
        if cfg.cuda_graph and dist.enabled:
            raise ConfigError(["--cuda-graph trains one rank per process only (no torchrun)"])
        if dist.enabled and cfg.granularity == "block" and any(c.rule == "rigl" for c in configs):
            raise ConfigError(["--rule rigl in block mode grows by a dense gradient that is not averaged over "
                               "ranks: train it on one rank (no torchrun)"])
        self.device = device = resolve_device(cfg.device, dist.local_rank)
        if data is None:
            data = data_lib.load_cifar10(cfg.data, download=cfg.download, progress=not cfg.no_progress)
        self.data = data.subset(cfg.train_subset, cfg.test_subset).to(device)
        self.steps_per_epoch = math.ceil(len(self.data.train_images) / cfg.batch_size)

        initial = initial if initial is not None else [initial_state(c) for c in configs]
        model = StackedWideResNet(self.T, cfg.depth, cfg.width)
        model.load_trial_state_dicts(initial)
        model = model.to(device)
        self.channels_last = cfg.channels_last if cfg.channels_last is not None else device.type == "cuda"
        if self.channels_last:
            model = model.to(memory_format=torch.channels_last)
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.model = model
        self.views, self.dprs, self.dense_layers = [], [], []
        for t, c in enumerate(configs):  # views of the parameters: taken after every move of the model
            self.views.append(model.trial_sparse_tensors(t))
            dpr, dense_layers = self._trial_dpr(c, t)
            self.dprs.append(dpr)
            self.dense_layers.append(dense_layers)
        for dpr, ckpt in zip(self.dprs, checkpoints or []):  # structure first: block mode's packed parameters take its shapes
            if dpr is not None:
                dpr.load_state_dict({"masks": ckpt["masks"], "reallocator": ckpt["reallocator"], "seed": dpr.seed,
                                     "rule": dpr.rule,  # the config's (resume checks it against config.json)
                                     "steps": ckpt["progress"]["global_step"]})
        self.optimizer = sgd(model.parameters(), value_at(cfg.lr_schedule, 0), cfg.momentum, cfg.weight_decay)
        self.net = torch.compile(model) if cfg.compile else model
        if cfg.compile and cfg.granularity == "block":
            self.net = DynamicParameterShapes(self.net)
        self.global_step = 0
        if checkpoints:
            self._load(checkpoints)
        self.step_fn = TrainStep(model, self.net, self.optimizer, self.dprs, self.views, dist, cfg.amp,
                                 self.channels_last, graph=cfg.cuda_graph)
        self.evaluation = Evaluation(self.net, self.data.test_images, self.data.test_labels, self.T, cfg.amp,
                                     graph=cfg.cuda_graph)

    def _trial_dpr(self, c: RunConfig, t: int) -> tuple[DPR | None, list[str]]:
        """Trial t's DPR object over its sparse views (None for dense; a fixed structure but for dpr),
        and the sparse layers its block does not tile (kept dense)."""
        structure, dense_layers = build_sparsity(c, self.views[t], self.model)
        if structure is None:
            return None, []
        structure.apply_()
        dpr = DPR.from_structure(
            structure, None, dynamic=c.mode == "dpr", period=EpochSchedule(self.steps_per_epoch, c.realloc_periods),
            stop_step=c.dpr_stop_epoch * self.steps_per_epoch, target_pruned=c.target_pruned, tolerance=c.tolerance,
            initial_threshold=c.initial_threshold, seed=c.seed, keep_momentum=c.keep_momentum, dense_layers=dense_layers,
            optimizer_state=lambda: trial_optimizer(self.model, self.optimizer, self.views[t], t),
            rule=c.rule, alpha=c.alpha, t_end=self._t_end(c))
        return dpr, dense_layers

    def _t_end(self, c: RunConfig) -> int | None:
        """RigL's t_end in steps: --t-end-epoch, by default 75% of the run (RigL's choice)."""
        if c.rule != "rigl":
            return None
        epochs = c.t_end_epoch if c.t_end_epoch is not None else max(1, round(0.75 * c.epochs))
        return epochs * self.steps_per_epoch

    def _load(self, ckpts: list[dict]) -> None:
        where = {(c["progress"]["epoch"], c["progress"]["step_in_epoch"], c["progress"]["global_step"]) for c in ckpts}
        if len(where) > 1:
            raise ConfigError([f"the trials' checkpoints are at different points {sorted(where)}: resume them separately"])
        self.model.load_trial_state_dicts([c["model"] for c in ckpts])
        load_trial_optimizer_state_dicts(self.model, self.optimizer, [c["optimizer"] for c in ckpts])
        self.global_step = ckpts[0]["progress"]["global_step"]
        torch.set_rng_state(ckpts[0]["rng"]["torch"])

    def state_dict(self, t: int) -> dict:
        """Trial t's part of a checkpoint, in the plain single-model format: model, optimizer, masks
        (None if dense), reallocator (None unless dpr) and the global RNG."""
        dpr = self.dprs[t]
        state = dpr.state_dict() if dpr is not None else {"masks": None, "reallocator": None}
        return {"model": self.model.trial_state_dict(t),
                "optimizer": trial_optimizer_state_dict(self.model, self.optimizer, t),
                "masks": state["masks"], "reallocator": state["reallocator"], "rng": {"torch": torch.get_rng_state()}}

    # ---- the schedule -------------------------------------------------------------------
    def start_epoch(self, epoch: int, fresh: bool = True) -> None:
        """Epoch start: gmp pruning (at a fresh epoch, not a resumed one), the lr, each trial's data order."""
        cfg = self.cfg
        k = gmp_pruning_index(epoch, cfg.gmp_steps, cfg.gmp_interval) if cfg.mode == "gmp" and fresh else None
        if k is not None:
            for c, dpr in zip(self.configs, self.dprs):
                dpr.prune_to_sparsity(gmp_sparsity(k, c.sparsity, cfg.gmp_steps))
            self.invalidate_graphs()
        self.lr = value_at(cfg.lr_schedule, epoch)
        if any(group["lr"] != self.lr for group in self.optimizer.param_groups):
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            self.step_fn.invalidate()  # SGD reads the lr as a number: a captured step holds the old one
        n = len(self.data.train_images)
        self.orders = torch.stack([data_lib.epoch_permutation(n, c.seed, epoch, self.device)
                                   for c in self.configs])  # int64 [T, n]

    def step(self, step: int) -> dict[int, ReallocationResult]:
        """Step `step` of the epoch for every trial (each on its own batch, a function of (seed, global
        step)), then the reallocations that are due: {trial: what it did}. NonFiniteWeights (nothing
        changed) if a reallocation sees NaN or inf."""
        bs, data, dist = self.cfg.batch_size, self.data, self.dist
        idx = self.orders[:, step * bs:(step + 1) * bs]  # [T, B]; every rank draws the whole batch, trains on its share
        generators = [seeded_generator(self.device, c.seed, self.global_step) for c in self.configs]
        x = data_lib.augment_trials(data.train_images[idx], generators)  # [B, T * 3, 32, 32]
        self.step_fn.score_gradients = [dpr for dpr in self.dprs if dpr is not None and dpr.prepare_step()]
        self.step_fn(dist.shard(x), dist.shard(data.train_labels[idx].T))
        self.global_step += 1
        due = [t for t, dpr in enumerate(self.dprs) if dpr is not None and dpr.advance()]
        return dict(zip(due, self.reallocate(due))) if due else {}

    def batch_size(self, step: int) -> int:
        """Images per trial in step `step` of an epoch, over all ranks."""
        return min(self.cfg.batch_size, len(self.data.train_images) - step * self.cfg.batch_size)

    def reallocate(self, due: list[int]) -> list[ReallocationResult]:
        """One DPR reallocation of each trial in `due`, all at once (outside the captured step; one
        host sync for all of them)."""
        dprs = [self.dprs[t] for t in due]
        results = DPR.reallocate_all(dprs, [self.step_fn.gradient_scores.get(id(d)) for d in dprs])
        if any(dpr.structure.params_replaced for dpr in dprs):
            self.invalidate_graphs()  # block mode gave its packed storage a new Parameter (a new total)
        if self.dist.enabled:
            self.dist.check_replicas([dpr.structure.flat_mask() for dpr in dprs], "sparse structures")
        return results

    def invalidate_graphs(self) -> None:
        """Parameters or masks were replaced: the captured training step and evaluation capture again."""
        self.step_fn.invalidate()
        self.evaluation.invalidate()

    # ---- measurements -------------------------------------------------------------------
    def take_accumulators(self) -> tuple[list[float], list[int]]:
        """Each trial's summed training loss and correct count since the last call (one host sync)."""
        return self.step_fn.take_accumulators()

    def evaluate(self) -> tuple[list[float], list[float]]:
        """Each trial's test loss and accuracy (rank 0's BN statistics on every rank; one host sync)."""
        self.dist.broadcast_buffers_(self.model)
        return self.evaluation()


class DynamicParameterShapes(nn.Module):
    """Calls a compiled block-mode model with dynamo's `force_parameter_static_shapes` off, for those calls
    only (the process-wide value is left as it was): a layer whose block count changes at a reallocation
    gets a new packed Parameter of another shape, and dynamo then makes that dimension dynamic (one
    recompile) instead of specialising on each shape. train()/eval() reach the compiled model (a child)."""

    def __init__(self, compiled: nn.Module):
        super().__init__()
        self.compiled = compiled

    def forward(self, *args, **kwargs):
        # The flag is missing in some torch builds (seen once in a fresh venv): nothing to turn off there.
        flag = hasattr(torch._dynamo.config, "force_parameter_static_shapes")
        scope = torch._dynamo.config.patch(force_parameter_static_shapes=False) if flag else contextlib.nullcontext()
        with scope:
            return self.compiled(*args, **kwargs)
