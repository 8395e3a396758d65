"""What a training run is: one frozen, validated RunConfig, built from the command line.

`python -m blockdpr.train` parses its flags into one RunConfig per trial (blockdpr/train.py);
`RunConfig.errors()` checks every setting in one place, before anything is written, and
`ConfigError` carries one line per problem (the CLI prints them and exits 2).
`python -m blockdpr.reproduce` builds RunConfigs directly (`RunConfig(...)` / `dataclasses.replace`).

A run directory's config.json holds `to_json()` at its top level; `RunConfig.from_json` reads it
back, so `--resume` continues with the run's own settings (`resume_config`): a flag given on the
command line that contradicts them is refused, naming each difference. PROCESS_SETTINGS may
change between the processes of one run (how it runs, not what it computes); those of
KEPT_ON_RESUME are kept from the run unless given again.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import torch

from blockdpr_kernels import CONV_BLOCKS

from .sparsity.distribution import DISTRIBUTIONS
from .sparsity.rules import RULES
from .sparsity.schedule import PAPER_REALLOC_PERIODS, active_units, default_target_pruned, target_errors


MODES = ("dpr", "static", "reinit", "orig-init", "dense", "gmp")
# The compressed baseline's fine-tuning schedule (DSR paper): 48 epochs, lr 0 / 0.02 / 0.004 / 0.0008.
GMP_EPOCHS = 48
GMP_LR_SCHEDULE = ((0, 0.0), (1, 0.02), (25, 0.004), (35, 0.0008))
# Settings that may differ between the trials trained together in one process (mode: any but gmp,
# whose pruning schedule belongs to the process, so gmp trials train with gmp trials only).
PER_TRIAL = ("seed", "out", "mode", "structure_from", "dense_from", "sparsity", "dpr_stop_epoch", "rule", "alpha",
             "t_end_epoch", "distribution")
# Settings of a process, not of the run: a resumed run may change them.
PROCESS_SETTINGS = ("out", "resume", "overwrite", "device", "compile", "channels_last", "cuda_graph", "no_progress",
                    "progress_seconds", "checkpoint_every", "checkpoint_minutes", "snapshot_epochs", "stop_after",
                    "download")
# Process settings a resumed run keeps from its config.json unless the command line gives them.
KEPT_ON_RESUME = ("snapshot_epochs", "checkpoint_every", "checkpoint_minutes", "progress_seconds")

Schedule = tuple[tuple[int, float], ...]  # ((epoch, value), ...), first epoch 0, increasing


class ConfigError(ValueError):
    """Settings that cannot make a run; `errors` holds one line per problem."""

    def __init__(self, errors: list[str]):
        self.errors = list(errors)
        super().__init__("; ".join(self.errors))


@dataclass(frozen=True)
class RunConfig:
    """Every setting of one training run (one trial). Paper defaults; see `build_parser` for each."""

    # run
    mode: str = "dpr"
    granularity: str = "element"
    block_size: int = 32
    out: Path | None = None  # None: default_out()
    resume: bool = False
    overwrite: bool = False
    seed: int = 0
    device: str = "auto"
    compile: bool = False
    amp: bool = False
    channels_last: bool | None = None  # None: on for CUDA (cuDNN and the block kernels want NHWC), off on CPU
    cuda_graph: bool = False
    no_progress: bool = False
    progress_seconds: float = 30.0
    checkpoint_every: int = 0
    checkpoint_minutes: float = 10.0
    snapshot_epochs: tuple[int, ...] = ()
    stop_after: float | None = None
    structure_from: Path | None = None
    dense_from: Path | None = None
    # data
    data: Path | None = None
    download: bool = False
    train_subset: int | None = None
    test_subset: int | None = None
    # model
    depth: int = 28
    width: int = 2
    # optimisation
    epochs: int | None = None  # None: 200, or GMP_EPOCHS for gmp
    batch_size: int = 100
    lr: float = 0.1
    lr_milestones: tuple[int, ...] = (60, 120, 160)
    lr_gamma: float = 0.2
    lr_schedule: Schedule | None = None  # None: from lr, milestones and gamma (gmp: GMP_LR_SCHEDULE)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # sparsity and DPR
    sparsity: float = 0.9
    target_pruned: int | None = None  # None: the paper's fraction of the active units (sparsity/schedule.py; 20,000 on WRN-28-2)
    tolerance: float = 0.1
    initial_threshold: float = 0.001
    realloc_periods: Schedule = PAPER_REALLOC_PERIODS
    dpr_stop_epoch: int = 190
    keep_momentum: bool = False
    rule: str = "dsr"  # dsr (the paper's), set or rigl: blockdpr/sparsity/rules.py
    alpha: float = 0.3  # set / rigl: drop fraction per update
    t_end_epoch: int | None = None  # rigl: last update (and the cosine's horizon); None: 75% of the epochs
    distribution: str = "uniform"  # initial density per layer: uniform or erk
    gmp_steps: int = 20
    gmp_interval: int = 2

    def resolved(self) -> "RunConfig":
        """This config with every None default filled in (epochs, lr_schedule, target_pruned, out)."""
        epochs = self.epochs if self.epochs is not None else (GMP_EPOCHS if self.mode == "gmp" else 200)
        schedule = self.lr_schedule
        if schedule is None:
            schedule = GMP_LR_SCHEDULE if self.mode == "gmp" else ((0, self.lr),) + tuple(
                (m, self.lr * self.lr_gamma ** (i + 1)) for i, m in enumerate(sorted(self.lr_milestones)))
        target = self.target_pruned
        if target is None:
            target = default_target_pruned(self.depth, self.width, self.sparsity, self.unit_block())
        out = self.out if self.out is not None else default_out(self)
        return dataclasses.replace(self, epochs=epochs, lr_schedule=tuple(schedule), target_pruned=target, out=out)

    def errors(self) -> list[str]:
        """Every problem of these settings, one line each, naming the flag (empty: valid)."""
        e = []

        def need(ok: bool, flag: str, what: str, value: Any) -> None:
            if not ok:
                e.append(f"--{flag} must be {what}, got {value!r}")

        finite = math.isfinite
        need(self.mode in MODES, "mode", f"one of {MODES}", self.mode)
        need(self.granularity in ("element", "block"), "granularity", "element or block", self.granularity)
        need(0 < self.sparsity < 1, "sparsity", "in (0, 1)", self.sparsity)
        for flag, value in (("epochs", self.epochs), ("batch-size", self.batch_size), ("width", self.width),
                            ("target-pruned", self.target_pruned), ("gmp-steps", self.gmp_steps),
                            ("gmp-interval", self.gmp_interval), ("train-subset", self.train_subset),
                            ("test-subset", self.test_subset)):
            need(value is None or value > 0, flag, "positive", value)
        need(self.depth >= 10 and (self.depth - 4) % 6 == 0, "depth", "6n + 4 with n >= 1 (10, 16, 22, 28, ...)", self.depth)
        need(finite(self.lr) and self.lr >= 0, "lr", "finite and >= 0", self.lr)
        need(finite(self.lr_gamma) and self.lr_gamma > 0, "lr-gamma", "finite and > 0", self.lr_gamma)
        if self.lr_schedule is not None:
            bad = [v for _, v in self.lr_schedule if not (finite(v) and v >= 0)]
            need(not bad, "lr-schedule", "learning rates that are finite and >= 0", bad)
            e += schedule_errors(self.lr_schedule, "lr-schedule")
        need(finite(self.momentum) and 0 <= self.momentum < 1, "momentum", "in [0, 1)", self.momentum)
        need(finite(self.weight_decay) and self.weight_decay >= 0, "weight-decay", "finite and >= 0", self.weight_decay)
        need(finite(self.tolerance) and 0 <= self.tolerance < 1, "tolerance", "in [0, 1)", self.tolerance)
        need(finite(self.initial_threshold) and self.initial_threshold > 0, "initial-threshold", "finite and > 0",
             self.initial_threshold)
        e += schedule_errors(self.realloc_periods, "realloc-periods")
        need(all(p > 0 for _, p in self.realloc_periods), "realloc-periods", "positive periods", self.realloc_periods)
        for flag, value in (("dpr-stop-epoch", self.dpr_stop_epoch), ("checkpoint-every", self.checkpoint_every),
                            ("stop-after", self.stop_after), ("checkpoint-minutes", self.checkpoint_minutes),
                            ("progress-seconds", self.progress_seconds)):
            need(value is None or (finite(value) and value >= 0), flag, ">= 0", value)
        need(all(s > 0 for s in self.snapshot_epochs), "snapshot-epochs", "positive epochs", self.snapshot_epochs)
        if self.granularity == "block":
            need(self.block_size in CONV_BLOCKS, "block-size", f"one of {CONV_BLOCKS}", self.block_size)
        elif self.block_size != RunConfig.block_size:
            e.append(f"--block-size {self.block_size} has no meaning in element mode (add --granularity block)")
        if self.granularity == "block" and self.keep_momentum:
            e.append("--keep-momentum has no meaning in block mode: a pruned block's state is dropped with it")
        need(self.rule in RULES, "rule", f"one of {RULES}", self.rule)
        need(finite(self.alpha) and 0 < self.alpha <= 1, "alpha", "in (0, 1]", self.alpha)
        need(self.t_end_epoch is None or self.t_end_epoch > 0, "t-end-epoch", "positive", self.t_end_epoch)
        need(self.distribution in DISTRIBUTIONS, "distribution", f"one of {DISTRIBUTIONS}", self.distribution)
        if self.rule != "dsr" and self.mode != "dpr":
            e.append(f"--rule {self.rule} reallocates: it needs --mode dpr (the structure of --mode {self.mode} is fixed)")
        if self.rule == "rigl" and self.granularity == "block" and self.compile:
            e.append("--rule rigl in block mode hooks the layers at its update steps (the dense weight gradient), "
                     "which would recompile the model each time: drop --compile")
        if self.rule == "rigl" and self.cuda_graph:
            e.append("--rule rigl reads the gradient of its update steps outside the captured step: drop --cuda-graph")
        if self.mode == "dpr" and self.target_pruned is not None and not e:  # the model is buildable
            active = active_units(self.depth, self.width, self.sparsity, self.unit_block())
            e += target_errors(self.target_pruned, active, "weights" if self.granularity == "element" else "blocks")
        if self.mode in ("reinit", "orig-init") and self.structure_from is None:
            e.append(f"--mode {self.mode} needs --structure-from DIR (a finished --mode dpr run)")
        if self.mode == "gmp" and self.dense_from is None:
            e.append("--mode gmp needs --dense-from DIR (a finished --mode dense run)")
        epochs = self.epochs if self.epochs is not None else GMP_EPOCHS  # gmp's default
        if self.mode == "gmp" and self.gmp_steps * self.gmp_interval > epochs:
            e.append(f"--mode gmp prunes until epoch {self.gmp_steps * self.gmp_interval}, beyond --epochs {epochs}")
        if self.resume and self.overwrite:
            e.append("--resume and --overwrite exclude each other: --resume continues the run in --out, "
                     "--overwrite deletes it and starts anew; give one")
        e += device_errors(self.device, self.cuda_graph)
        if self.cuda_graph and self.compile:
            e.append("--cuda-graph and --compile exclude each other (torch.compile has its own graphs: mode='reduce-overhead')")
        return e

    def unit_block(self) -> int | None:
        """The block size of a reallocation unit (None: element mode)."""
        return self.block_size if self.granularity == "block" else None

    def check(self) -> "RunConfig":
        """The resolved config, or ConfigError listing every problem."""
        errors = self.errors()
        if errors:
            raise ConfigError(errors)
        return self.resolved()

    def to_json(self) -> dict:
        """JSON-ready dict of every field (paths as strings, tuples as lists); element mode records
        block_size null (no block size ran)."""
        obj = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self)}
        if self.granularity == "element":
            obj["block_size"] = None
        return obj

    def to_argv(self) -> list[str]:
        """The flags of `python -m blockdpr.train` that train this run (each setting that differs
        from what the command line would default to; not --resume, --overwrite or --stop-after,
        which say how a process runs, not what it trains)."""
        argv = []
        for f in fields(self):
            value = getattr(self, f.name)
            if f.name in ("resume", "overwrite", "stop_after") or value == _default_for(self, f.name):
                continue
            flag = "--" + f.name.replace("_", "-")
            if isinstance(value, bool) and f.name == "channels_last":
                argv.append(flag if value else "--no-channels-last")
            elif isinstance(value, bool):
                argv.append(flag)  # switches default to off
            elif f.name in _SCHEDULES:
                argv += [flag, ",".join(f"{e}:{v}" for e, v in value)]
            elif isinstance(value, tuple):
                argv += [flag, ",".join(str(v) for v in value)]
            else:
                argv += [flag, str(value)]
        return argv

    @classmethod
    def from_json(cls, obj: dict) -> "RunConfig":
        """The config saved by to_json (other keys of config.json are ignored)."""
        kwargs = {}
        for f in fields(cls):
            if f.name in obj and not (f.name == "block_size" and obj[f.name] is None):
                kwargs[f.name] = _from_jsonable(f.name, obj[f.name])
        return cls(**kwargs)


def _default_for(config: RunConfig, name: str) -> Any:
    """What setting `name` of `config` is when its flag is not given: the field's default, or for the
    settings resolved() fills in (epochs, lr_schedule, target_pruned, out), what it fills in."""
    default = next(f.default for f in fields(RunConfig) if f.name == name)
    if name in ("epochs", "lr_schedule", "target_pruned", "out") and getattr(config, name) is not None:
        return getattr(dataclasses.replace(config, **{name: None}).resolved(), name)
    return default


def _jsonable(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple):
        return [_jsonable(v) for v in value]
    return value


_PATHS = ("out", "structure_from", "dense_from", "data")
_SCHEDULES = ("lr_schedule", "realloc_periods")


def _from_jsonable(name: str, value: Any) -> Any:
    if value is None:
        return None
    if name in _PATHS:
        return Path(value)
    if name in _SCHEDULES:
        return tuple((int(e), v) for e, v in value)
    if isinstance(value, list):
        return tuple(value)
    return value


def schedule_errors(schedule: Schedule, flag: str) -> list[str]:
    epochs = [e for e, _ in schedule]
    if not epochs or epochs[0] != 0 or epochs != sorted(set(epochs)):
        return [f"--{flag}: epochs must start at 0 and increase, got {list(epochs)}"]
    return []


def device_errors(name: str, cuda_graph: bool) -> list[str]:
    """Problems with --device (and --cuda-graph, which needs CUDA)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        return [f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"]
    if device.type not in ("cpu", "cuda"):
        return [f"--device must be auto, cpu, cuda or cuda:N, got {name!r}"]
    if device.type == "cuda" and not torch.cuda.is_available():
        return [f"--device {name}: CUDA is not available on this machine (use --device cpu)"]
    if cuda_graph and device.type != "cuda":
        return [f"--cuda-graph needs a CUDA device, got --device {name} (CUDA graphs only run on NVIDIA GPUs)"]
    return []


def default_out(config: RunConfig) -> Path:
    """runs/<mode>[-<granularity>-s<sparsity>]-seed<seed>, e.g. runs/dpr-element-s0.9-seed0, runs/dpr-block32-s0.9-seed0."""
    if config.mode == "dense":
        return Path("runs") / f"dense-seed{config.seed}"
    unit = "element" if config.granularity == "element" else f"block{config.block_size}"
    mode = config.mode if config.rule == "dsr" else f"{config.mode}-{config.rule}"
    mode += "-erk" if config.distribution == "erk" else ""
    return Path("runs") / f"{mode}-{unit}-s{config.sparsity}-seed{config.seed}"


def value_at(schedule: Schedule, epoch: int) -> float:
    """The value of a piecewise-constant schedule at `epoch`."""
    return [v for e, v in schedule if e <= epoch][-1]


def with_seed(path: Path | None, seed: int) -> Path | None:
    """`path` with its {seed} placeholder filled in."""
    return None if path is None else Path(str(path).replace("{seed}", str(seed)))


def differences(run: RunConfig, wanted: RunConfig, keys: set[str]) -> list[str]:
    """'--flag: the run has X, the command line gives Y' for each of `keys` (dests) that differ."""
    a, b = run.resolved(), wanted.resolved()
    out = []
    for k in sorted(keys - set(PROCESS_SETTINGS)):
        k_run, k_new = getattr(a, k, None), getattr(b, k, None)
        if k_run != k_new:
            out.append(f"--{k.replace('_', '-')}: the run has {_jsonable(k_run)!r}, the command line gives {_jsonable(k_new)!r}")
    return out


def resume_config(saved: RunConfig, given: RunConfig, keys: set[str]) -> RunConfig:
    """Resume: the run's saved settings, with the process settings of `given`; ConfigError listing
    each setting in `keys` (given explicitly) that contradicts the run."""
    diff = differences(saved, given, keys)
    if diff:
        raise ConfigError([f"--resume continues the run in {given.out} with its own settings; these flags contradict "
                           "them (drop them, or start a new run in another --out):", *diff])
    process = {k: getattr(given, k) for k in PROCESS_SETTINGS if k in keys or k not in KEPT_ON_RESUME}
    return dataclasses.replace(saved, **process)


def group_settings(config: RunConfig) -> dict:
    """The settings that trials trained together in one process must share: all but PER_TRIAL (and
    resume), plus whether the mode is gmp."""
    skip = set(PER_TRIAL) | {"resume"}
    return {"gmp": config.mode == "gmp", **{f.name: getattr(config, f.name) for f in fields(RunConfig) if f.name not in skip}}


def check_trials(configs: list[RunConfig]) -> RunConfig:
    """The settings shared by trials trained together (they may differ only in PER_TRIAL); returns the first."""
    if not configs:
        raise ValueError("no trials to train")
    first = group_settings(configs[0])
    for c in configs[1:]:
        different = [k for k, v in group_settings(c).items() if first[k] != v]
        if different:
            raise ConfigError([f"trials trained together must share all settings but {PER_TRIAL} (gmp trains "
                               f"with gmp only); these differ: {different}"])
    outs = [c.out for c in configs]
    if len(set(outs)) != len(outs):
        raise ConfigError([f"each trial needs its own run directory, got {[str(o) for o in outs]}"])
    return configs[0]
