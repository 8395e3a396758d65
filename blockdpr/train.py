"""Train a WRN on CIFAR-10 with dynamic parameter reallocation: python -m blockdpr.train --help

One run = one directory (--out) holding config.json, metrics.jsonl (a line per epoch),
checkpoints (last.pt, best.pt, written atomically), init_weights.pt (DPR runs: the dense initial
values, for --mode orig-init), final_masks.pt (sparse runs: the final structure, for --mode
reinit / orig-init) and summary.json (written last: its presence means the run is complete).

All randomness is a function of (--seed, epoch or step): the data order of an epoch, the
augmentation of a step and the regrowth of a reallocation. A run killed at any point and resumed
with --resume therefore continues exactly as if it had never stopped.

--seeds 0,1,2,3,4 trains several trials of one configuration (one per seed) together in one
process, as one stacked model (blockdpr/stacked.py): each trial keeps its own data order,
augmentation, structure, reallocator, metrics and run directory (--out with a {seed}
placeholder), and ends with the same results as if run alone.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import platform
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from blockdpr_kernels import CONV_BLOCKS

from . import data as data_lib
from .checkpoint import CheckpointError, load_checkpoint, save_atomic, save_checkpoint
from .distributed import Distributed
from .models import WideResNet, parameter_counts
from .stacked import (StackedWideResNet, link_grads, load_trial_optimizer_state_dicts, per_trial_cross_entropy,
                      stacked_input, trial_optimizer, trial_optimizer_state_dict)
from .sparsity import DPRConfig, ElementSparsity, Reallocator, SparseStructure, gmp_pruning_index, gmp_sparsity
from .sparsity.blocks import block_grid
from .sparsity.packed import dense_state_dict, to_block_sparse
from .sparsity.select import seeded_generator

MODES = ("dpr", "static", "reinit", "orig-init", "dense", "gmp")
# The compressed baseline's fine-tuning schedule (DSR paper): 48 epochs, lr 0 / 0.02 / 0.004 / 0.0008.
GMP_EPOCHS = 48
GMP_LR_SCHEDULE = "0:0,1:0.02,25:0.004,35:0.0008"
# --mode reinit draws its new initial values with seed + REINIT_SEED_OFFSET, so that they differ
# from those of the DPR run of the same seed (which --mode orig-init uses).
REINIT_SEED_OFFSET = 1_000_000
# Settings that may differ between the trials trained together in one process.
PER_TRIAL = ("seed", "out", "structure_from", "dense_from", "sparsity", "dpr_stop_epoch")
console = Console(stderr=True, soft_wrap=True)


# ---- command line --------------------------------------------------------------------------
def piecewise(text: str, value_type=float) -> list[tuple[int, float]]:
    """Parse 'epoch:value,epoch:value,...' (first epoch 0, increasing) into a list of pairs."""
    try:
        pairs = [(int(e), value_type(v)) for e, v in (item.split(":") for item in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'epoch:value,...' starting at epoch 0, got {text!r}") from None
    epochs = [e for e, _ in pairs]
    if epochs[0] != 0 or epochs != sorted(set(epochs)):
        raise argparse.ArgumentTypeError(f"epochs must start at 0 and increase, got {text!r}")
    return pairs


def value_at(schedule: list[tuple[int, float]], epoch: int) -> float:
    """The value of a piecewise-constant schedule at `epoch`."""
    return [v for e, v in schedule if e <= epoch][-1]


def number_list(text: str, value_type=int) -> list:
    """Parse comma-separated numbers ('1,2,3') for argparse; value_type int or float."""
    kind = "integers" if value_type is int else "numbers"
    try:
        values = [value_type(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated {kind}, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one of the comma-separated {kind}")
    return values


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m blockdpr.train",
        description="Train WRN on CIFAR-10 with dynamic parameter reallocation (Mostafa & Wang) or a baseline.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=MODES, default="dpr",
                   help="dpr: dynamic reallocation; static: fixed random structure; reinit / orig-init: the final "
                        "structure of --structure-from with new random / its original initial values; dense; "
                        "gmp: prune the dense model of --dense-from gradually (Zhu & Gupta) and fine-tune")
    g.add_argument("--granularity", choices=("element", "block"), default="element",
                   help="element: dense tensors with element masks (the paper); block: reallocate whole "
                        "(block x block) blocks, stored packed and run on the blockdpr_kernels Triton kernels")
    g.add_argument("--block-size", type=int, default=32, help="block mode: blocks of block-size x block-size weights "
                   f"(one of {CONV_BLOCKS}); a conv whose channels it does not divide stays dense (reported)")
    g.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<mode>-s<sparsity>-seed<seed>); with several --seeds it must "
                        "contain {seed}, e.g. runs/dpr-seed{seed}")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--seeds", type=number_list, default=None, metavar="S,S,...",
                   help="train one trial per seed together in one process (a stacked model; overrides --seed). "
                        "--out, --structure-from and --dense-from may contain {seed}")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (the paper trains in fp32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps within an epoch (0: at epoch ends only)")
    g.add_argument("--snapshot-epochs", type=number_list, default=[], metavar="E,E,...",
                   help="also keep the checkpoint taken after epoch E as epochE.pt (a DPR run stopped at E can start "
                        "from it: python -m blockdpr.reproduce does)")
    g.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                   help="checkpoint and exit (without summary.json) once this process has run SECONDS; continue "
                        "later with --resume")
    g.add_argument("--structure-from", type=Path, default=None,
                   help="finished DPR run directory (reinit, orig-init); may contain {seed}")
    g.add_argument("--dense-from", type=Path, default=None, help="finished dense run directory (gmp); may contain {seed}")

    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 source: the JPEG zip, cifar-10-batches-py/ or cifar-10-python.tar.gz "
                        "(default: data/cifar10-jpeg-q75.zip in the repo)")
    g.add_argument("--download", action="store_true", help="download the official python CIFAR-10 into --data (a directory)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N", help="use the first N training images (smoke runs)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="use the first N test images (smoke runs)")

    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=28)
    g.add_argument("--width", type=int, default=2)

    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--epochs", type=int, default=None, help=f"default 200; {GMP_EPOCHS} for gmp")
    g.add_argument("--batch-size", type=int, default=100)
    g.add_argument("--lr", type=float, default=0.1)
    g.add_argument("--lr-milestones", type=number_list, default=[60, 120, 160],
                   help="comma-separated epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.2)
    g.add_argument("--lr-schedule", type=piecewise, default=None,
                   help=f"explicit 'epoch:lr,...' schedule, overrides --lr/--lr-milestones (gmp default {GMP_LR_SCHEDULE})")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)

    g = p.add_argument_group("sparsity and DPR (paper defaults)")
    g.add_argument("--sparsity", type=float, default=0.9, help="sparsity of the sparse tensors (the 3x3 convs of the residual blocks)")
    g.add_argument("--target-pruned", type=int, default=None,
                   help="N_p: target units pruned per reallocation (default 20,000 weights: 20,000 in element mode, "
                        "round(20,000 / block-size^2) blocks in block mode)")
    g.add_argument("--tolerance", type=float, default=0.1, help="delta: H adapts when pruned count leaves N_p (1 +- delta)")
    g.add_argument("--initial-threshold", type=float, default=0.001, help="H at the start")
    g.add_argument("--realloc-periods", type=lambda s: piecewise(s, int), default="0:100,25:200,80:400,140:800",
                   help="'epoch:period,...': iterations between reallocations from each epoch on")
    g.add_argument("--dpr-stop-epoch", type=int, default=190, help="freeze the structure after this many epochs")
    g.add_argument("--keep-momentum", action="store_true",
                   help="keep stale optimizer state for regrown weights (as the DSR authors' code did); default zero")
    g.add_argument("--gmp-steps", type=int, default=20, help="gmp: number of prunings")
    g.add_argument("--gmp-interval", type=int, default=2, help="gmp: epochs between prunings")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    args = parser.parse_args(argv)
    if isinstance(args.realloc_periods, str):
        args.realloc_periods = piecewise(args.realloc_periods, int)
    if args.epochs is None:
        args.epochs = GMP_EPOCHS if args.mode == "gmp" else 200
    if args.lr_schedule is None:
        args.lr_schedule = (
            piecewise(GMP_LR_SCHEDULE) if args.mode == "gmp"
            else [(0, args.lr)] + [(m, args.lr * args.lr_gamma ** (i + 1)) for i, m in enumerate(sorted(args.lr_milestones))]
        )
    if args.target_pruned is None:
        args.target_pruned = 20_000 if args.granularity == "element" else max(1, round(20_000 / args.block_size**2))
    errors = []
    if not 0 < args.sparsity < 1:
        errors.append(f"--sparsity must be in (0, 1), got {args.sparsity}")
    if args.epochs <= 0 or args.batch_size <= 0:
        errors.append("--epochs and --batch-size must be positive")
    if any(period <= 0 for _, period in args.realloc_periods):
        errors.append("--realloc-periods must be positive")
    if args.mode in ("reinit", "orig-init") and args.structure_from is None:
        errors.append(f"--mode {args.mode} needs --structure-from DIR (a finished --mode dpr run)")
    if args.mode == "gmp" and args.dense_from is None:
        errors.append("--mode gmp needs --dense-from DIR (a finished --mode dense run)")
    if args.mode == "gmp" and args.gmp_steps * args.gmp_interval > args.epochs:
        errors.append(f"--mode gmp prunes until epoch {args.gmp_steps * args.gmp_interval}, beyond --epochs {args.epochs}")
    for flag in ("train_subset", "test_subset"):
        if getattr(args, flag) is not None and getattr(args, flag) <= 0:
            errors.append(f"--{flag.replace('_', '-')} must be positive")
    seeds = args.seeds or [args.seed]
    if len(set(seeds)) != len(seeds):
        errors.append(f"--seeds must be distinct, got {seeds}")
    if args.granularity == "block":
        if args.block_size not in CONV_BLOCKS:
            errors.append(f"--block-size must be one of {CONV_BLOCKS}, got {args.block_size}")
        if len(seeds) > 1:
            errors.append("--granularity block trains one trial per process (packed layers cannot be stacked): "
                          "give one --seed")
        if args.keep_momentum:
            errors.append("--keep-momentum has no meaning in block mode: a pruned block's state is dropped with it")
    if len(seeds) > 1 and args.out is not None and "{seed}" not in str(args.out):
        errors.append("--out must contain {seed} when training several --seeds (one run directory per trial)")
    if errors:
        parser.error("; ".join(errors))
    return args


def with_seed(path: Path | None, seed: int) -> Path | None:
    return None if path is None else Path(str(path).replace("{seed}", str(seed)))


def parse_trials(argv: list[str] | None = None) -> list[argparse.Namespace]:
    """The command line as one settings namespace per trial (one per --seeds entry, or just --seed)."""
    args = parse_args(argv)
    trials = []
    for seed in args.seeds or [args.seed]:
        trial = copy.copy(args)
        trial.seed, trial.seeds = seed, None
        trial.out = with_seed(args.out, seed) or Path("runs") / f"{args.mode}-s{args.sparsity}-seed{seed}"
        trial.structure_from, trial.dense_from = with_seed(args.structure_from, seed), with_seed(args.dense_from, seed)
        trials.append(trial)
    return trials


# ---- the run's state -------------------------------------------------------------------------
@dataclass
class RunState:
    """Where a run is: saved in every checkpoint; the epoch accumulators make mid-epoch resume exact."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0
    best_test_acc: float = 0.0
    seconds: float = 0.0  # training time before this process
    loss_sum: float = 0.0
    correct: int = 0
    seen: int = 0
    moved: int = 0
    reallocations: int = 0
    epoch_seconds: float = 0.0
    epoch_images: int = 0

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.step_in_epoch = epoch, 0
        self.loss_sum, self.correct, self.seen, self.moved, self.reallocations = 0.0, 0, 0, 0, 0
        self.epoch_seconds, self.epoch_images = 0.0, 0


def identity(args: argparse.Namespace) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keys = ("granularity", "block_size", "mode", "depth", "width", "sparsity", "seed", "batch_size", "epochs", "train_subset")
    return {k: getattr(args, k) for k in keys}


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device; under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    return device


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {"python": platform.python_version(), "torch": torch.__version__, "triton": triton_version,
            "numpy": np.__version__, "cuda": torch.version.cuda}


def finished_run_file(run_dir: Path, name: str, mode: str) -> Path:
    """A file of a finished run that this run builds on, with a clear error if it is not there."""
    path = Path(run_dir) / name
    if not (Path(run_dir) / "summary.json").is_file():
        raise SystemExit(f"{run_dir} is not a finished run (no summary.json): finish that --mode {mode} run first")
    if not path.is_file():
        raise SystemExit(f"{run_dir} has no {name}: was it a --mode {mode} run?")
    return path


def build_sparsity(args, params: dict[str, torch.Tensor], model: torch.nn.Module) -> tuple[SparseStructure | None, list[str]]:
    """The initial structure of one trial for each mode (None for dense); params: its sparse tensors.

    Block mode converts those convs of `model` to packed block-sparse layers (in place); the second
    value names the sparse convs that the block does not tile, which stay dense.
    """
    if args.mode == "dense":
        return None, []
    masks = None
    if args.mode in ("reinit", "orig-init"):
        masks = torch.load(finished_run_file(args.structure_from, "final_masks.pt", "dpr"), weights_only=True)
    if args.granularity == "block":
        if args.mode == "gmp":  # start from every block of the dense model
            block = (args.block_size, args.block_size)
            masks = {n: torch.ones(block_grid(p.shape, block), dtype=torch.bool) for n, p in params.items()
                     if block_grid(p.shape, block) is not None}
        return to_block_sparse(model, list(params), args.block_size, args.sparsity, args.seed, masks)
    if args.mode in ("dpr", "static"):
        return ElementSparsity.random(params, args.sparsity, args.seed), []
    sparsity = ElementSparsity(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
    if masks is not None:
        sparsity.load_state_dict(masks)
    return sparsity, []


def init_seed(args) -> int:
    """The seed of a trial's random initial values (reinit: not those of the DPR run of the same seed)."""
    return args.seed + REINIT_SEED_OFFSET if args.mode == "reinit" else args.seed


def initial_state(args, save: bool = True) -> dict[str, torch.Tensor]:
    """A trial's initial weights as a plain WideResNet state dict: random (seeded), or for orig-init the
    DPR run's initial values, for gmp the trained dense model. A fresh DPR run saves its init_weights.pt
    (if `save`: data-parallel ranks other than 0 write nothing)."""
    torch.manual_seed(init_seed(args))
    model = WideResNet(args.depth, args.width)
    if args.mode == "dpr" and not args.resume and save:
        save_atomic(model.state_dict(), args.out / "init_weights.pt")
    if args.mode == "orig-init":
        model.load_state_dict(torch.load(finished_run_file(args.structure_from, "init_weights.pt", "dpr"), weights_only=True))
    elif args.mode == "gmp":
        state = load_checkpoint(finished_run_file(args.dense_from, "last.pt", "dense"))
        if state["identity"].get("mode") != "dense" or (state["identity"]["depth"], state["identity"]["width"]) != (args.depth, args.width):
            raise SystemExit(f"--dense-from {args.dense_from} must be a --mode dense WRN-{args.depth}-{args.width} run, "
                             f"found {state['identity']}")
        model.load_state_dict(state["model"])
    return model.state_dict()


def prepare_run_dir(args) -> None:
    """Refuse to overwrite a run, or to resume one that has no checkpoint."""
    last_path = args.out / "last.pt"
    if args.resume and not last_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {last_path}")
    if not args.resume and (last_path.is_file() or (args.out / "summary.json").is_file()):
        raise SystemExit(f"{args.out} already holds a run: pass --resume to continue it, or choose another --out")
    args.out.mkdir(parents=True, exist_ok=True)


@dataclass
class Trial:
    """One run of a process that may train several: its settings, structure, reallocator and progress."""

    args: argparse.Namespace
    sparse: dict[str, torch.Tensor]  # its sparse weights (views of the stacked model's parameters)
    sparsity: SparseStructure | None
    reallocator: Reallocator | None
    state: RunState
    dense_layers: list[str]  # block mode: sparse convs the block does not tile, kept dense

    @property
    def out(self) -> Path:
        return self.args.out


# ---- the loop --------------------------------------------------------------------------------
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


def make_progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=disable, transient=True,
    )


def check_trials(trials_args: list[argparse.Namespace]) -> argparse.Namespace:
    """The settings shared by all trials (they may differ only in PER_TRIAL); returns the first trial's."""
    if not trials_args:
        raise ValueError("no trials to train")
    shared = {k: v for k, v in vars(trials_args[0]).items() if k not in PER_TRIAL}
    for a in trials_args[1:]:
        different = [k for k, v in shared.items() if vars(a).get(k) != v]
        if different:
            raise ValueError(f"trials trained together must share all settings but {PER_TRIAL}; these differ: {different}")
    outs = [a.out for a in trials_args]
    if len(set(outs)) != len(outs):
        raise SystemExit(f"each trial needs its own run directory, got {[str(o) for o in outs]}")
    return trials_args[0]


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) one training run; returns its summary."""
    return train_trials([args])[0]


def train_trials(trials_args: list[argparse.Namespace]) -> list[dict]:
    """Run (or resume) T >= 1 trials of one configuration together; returns their summaries.

    T = 1 is an ordinary run. With T > 1 the trials form one stacked model (blockdpr/stacked.py)
    trained by one optimizer; each has its own seed, run directory, structure, reallocator and
    metrics, and the results equal those of T separate runs up to float rounding.
    """
    args = check_trials(trials_args)  # the shared settings
    T = len(trials_args)
    dist = Distributed.from_env(resolve_device(args.device).type)  # one rank of 1 without torchrun
    device = resolve_device(args.device, dist.local_rank)
    if dist.is_main:
        for a in trials_args:
            prepare_run_dir(a)

    data = data_lib.load_cifar10(args.data, download=args.download, progress=not args.no_progress)
    data = data.subset(args.train_subset, args.test_subset).to(device)

    model = StackedWideResNet(T, args.depth, args.width)
    model.load_trial_state_dicts([initial_state(a, save=dist.is_main) for a in trials_args])
    model = model.to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    trials = []
    for t, a in enumerate(trials_args):  # views of the parameters: taken after every move of the model
        sparse = model.trial_sparse_tensors(t)
        sparsity, dense_layers = build_sparsity(a, sparse, model)
        if sparsity is not None:
            sparsity.apply_()
        if dense_layers and dist.is_main:
            console.print(f"block size {a.block_size} does not tile {len(dense_layers)} sparse conv(s), kept dense: "
                          + ", ".join(dense_layers))
        reallocator = (Reallocator(sparsity.segments.sizes, DPRConfig(a.target_pruned, a.tolerance, a.initial_threshold),
                                   a.seed, device) if a.mode == "dpr" else None)
        trials.append(Trial(a, sparse, sparsity, reallocator, RunState(), dense_layers))

    ckpts = [load_checkpoint(trial.out / "last.pt", expect=identity(trial.args)) for trial in trials] if args.resume else []
    for trial, ckpt in zip(trials, ckpts):  # structure first: block mode's packed parameters take its shapes
        if trial.sparsity is not None:
            trial.sparsity.load_state_dict(ckpt["masks"])
    optimizer = torch.optim.SGD(model.parameters(), lr=value_at(args.lr_schedule, 0), momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    if args.compile and args.granularity == "block":
        # Packed parameters change shape at every reallocation: let dynamo make that dimension
        # dynamic (one recompile) instead of specialising on each shape.
        torch._dynamo.config.force_parameter_static_shapes = False
    net = torch.compile(model) if args.compile else model

    if args.resume:
        where = {(c["progress"]["epoch"], c["progress"]["step_in_epoch"], c["progress"]["global_step"]) for c in ckpts}
        if len(where) > 1:
            raise SystemExit(f"the trials' checkpoints are at different points {sorted(where)}: resume them separately")
        model.load_trial_state_dicts([c["model"] for c in ckpts])
        load_trial_optimizer_state_dicts(model, optimizer, [c["optimizer"] for c in ckpts])
        for trial, ckpt in zip(trials, ckpts):
            if trial.reallocator is not None:
                trial.reallocator.threshold = ckpt["threshold"]
            trial.state = RunState(**ckpt["progress"])
            if dist.is_main:
                metrics_file = trial.out / "metrics.jsonl"
                keep = [line for line in metrics_file.read_text().splitlines() if json.loads(line)["epoch"] < trial.state.epoch]
                metrics_file.write_text("".join(line + "\n" for line in keep))
                console.print(f"resumed {trial.out} at epoch {trial.state.epoch}, step {trial.state.step_in_epoch} of it")
        torch.set_rng_state(ckpts[0]["rng"]["torch"])
    elif dist.is_main:
        for trial in trials:
            a = trial.args
            with torch.device("meta"):  # shapes only: no memory, no draw from the global generator
                plain = WideResNet(a.depth, a.width)
            sparse_names = trial.sparsity.names + trial.dense_layers if trial.sparsity is not None else []
            counts = parameter_counts(plain, sparse_names, a.sparsity,
                                      (a.block_size, a.block_size) if a.granularity == "block" else None)
            config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(a).items()},
                      "init_seed": init_seed(a), "trained_with_seeds": [b.seed for b in trials_args],
                      "layers_kept_dense": trial.dense_layers, "world_size": dist.world_size,
                      "command": " ".join([sys.executable, "-m", "blockdpr.train", *sys.argv[1:]]),
                      "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                      "versions": versions(), "git_commit": git_commit(),
                      "data": {"description": data.description, "source": data.source, "sha256": data.checksum,
                               "train_images": len(data.train_images), "test_images": len(data.test_images)},
                      "parameters": counts}
            (trial.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
            (trial.out / "metrics.jsonl").write_text("")

    def checkpoint(t: int, name: str) -> None:
        if not dist.is_main:
            return
        trial = trials[t]
        save_checkpoint({
            "identity": identity(trial.args), "model": model.trial_state_dict(t),
            "optimizer": trial_optimizer_state_dict(model, optimizer, t),
            "masks": trial.sparsity.state_dict() if trial.sparsity is not None else None,
            "threshold": trial.reallocator.threshold if trial.reallocator is not None else None,
            "progress": vars(trial.state), "rng": {"torch": torch.get_rng_state()},
        }, trial.out / name)

    def bank_accumulators(loss_sum: torch.Tensor, correct: torch.Tensor, seconds: float, images: int) -> None:
        """Move the device-side epoch accumulators, summed over ranks, into each trial's RunState (one host sync)."""
        dist.sum_(loss_sum), dist.sum_(correct)
        for trial, loss, right in zip(trials, loss_sum.tolist(), correct.tolist()):
            trial.state.loss_sum += loss
            trial.state.correct += int(right)
            trial.state.epoch_seconds += seconds
            trial.state.epoch_images += images
        loss_sum.zero_(), correct.zero_()

    def out_of_time() -> bool:
        return args.stop_after is not None and time.perf_counter() - started >= args.stop_after

    n_train = len(data.train_images)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    progress = trials[0].state  # epoch, step and global step are the same in every trial
    started = time.perf_counter()
    with make_progress(args.no_progress) as bars:
        run_bar = bars.add_task("run", total=args.epochs, completed=progress.epoch, rate="")
        for epoch in range(progress.epoch, args.epochs):
            if progress.step_in_epoch == 0:
                k = gmp_pruning_index(epoch, args.gmp_steps, args.gmp_interval) if args.mode == "gmp" else None
                for t, trial in enumerate(trials):
                    trial.state.start_epoch(epoch)
                    if k is not None:
                        s_k = gmp_sparsity(k, trial.args.sparsity, args.gmp_steps)
                        trial.sparsity.prune_to_sparsity(s_k, trial_optimizer(model, optimizer, trial.sparse, t))
            lr = value_at(args.lr_schedule, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            period = int(value_at(args.realloc_periods, epoch))
            orders = [data_lib.epoch_permutation(n_train, trial.args.seed, epoch, device) for trial in trials]
            # Per trial, summed over the epoch's images; float64 keeps the sum exact whatever the order of
            # additions, so a run resumed mid-epoch reports the same train loss as an uninterrupted one.
            loss_sum = torch.zeros(T, dtype=torch.float64, device=device)
            correct = torch.zeros(T, dtype=torch.int64, device=device)
            epoch_bar = bars.add_task(f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, completed=progress.step_in_epoch, rate="")
            tick = time.perf_counter()
            images_this_process = 0  # per trial
            for step in range(progress.step_in_epoch, steps_per_epoch):
                # Each trial's own batch: its own data order and augmentation, a function of (seed, step).
                xs, ys = [], []
                # Data parallel: every rank draws the whole batch the same way and trains on its share.
                for trial, order in zip(trials, orders):
                    idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                    x = data_lib.augment(data.train_images[idx], seeded_generator(device, trial.args.seed, trial.state.global_step))
                    xs.append(dist.shard(x))
                    ys.append(dist.shard(data.train_labels[idx]))
                batch = len(idx)  # images per trial in this step, over all ranks
                y = torch.stack(ys, 1)  # [B_rank, T]
                with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    logits = net(stacked_input(xs))  # [B, T, classes]
                losses = per_trial_cross_entropy(logits, y)  # [T]; the sum's gradient is each trial's own
                optimizer.zero_grad(set_to_none=False)  # keep the gradient tensors: trials' views of them stay valid
                losses.sum().backward()
                dist.average_gradients_(list(model.parameters()))
                link_grads(model, [trial.sparse for trial in trials])
                for trial in trials:
                    if trial.sparsity is not None:
                        trial.sparsity.mask_grads_()
                optimizer.step()
                for trial in trials:
                    if trial.sparsity is not None:
                        trial.sparsity.apply_()
                loss_sum += losses.detach().double() * len(y)
                correct += (logits.argmax(2) == y).sum(0)
                images_this_process += batch
                for t, trial in enumerate(trials):
                    trial.state.seen += batch
                    trial.state.global_step += 1
                    trial.state.step_in_epoch = step + 1
                    reallocating = trial.reallocator is not None and epoch < trial.args.dpr_stop_epoch
                    if reallocating and trial.state.global_step % period == 0:
                        result = trial.sparsity.reallocate(trial.reallocator, trial.state.global_step,
                                                           trial_optimizer(model, optimizer, trial.sparse, t), args.keep_momentum)
                        trial.state.moved += result.pruned
                        trial.state.reallocations += 1
                        dist.check_replicas([trial.sparsity.flat_mask()], "sparse structures")
                elapsed = time.perf_counter() - tick
                bars.update(epoch_bar, completed=step + 1, rate=f"{T * images_this_process / max(elapsed, 1e-9):,.0f} img/s")
                due = args.checkpoint_every and progress.step_in_epoch % args.checkpoint_every == 0
                if (due or out_of_time()) and step + 1 < steps_per_epoch:
                    bank_accumulators(loss_sum, correct, time.perf_counter() - tick, images_this_process)
                    tick, images_this_process = time.perf_counter(), 0
                    for t in range(T):
                        checkpoint(t, "last.pt")
                    if out_of_time():
                        break
            bars.remove_task(epoch_bar)
            if progress.step_in_epoch < steps_per_epoch:  # stopped by --stop-after within the epoch
                break

            # End of epoch: one sync for the accumulators, evaluation, metrics, checkpoints.
            bank_accumulators(loss_sum, correct, time.perf_counter() - tick, images_this_process)
            dist.broadcast_buffers_(model)  # BN statistics of rank 0, so every rank evaluates the same model
            test_losses, test_accs = evaluate(net, data.test_images, data.test_labels, T, args.amp)
            for t, trial in enumerate(trials):
                state = trial.state
                record = {
                    "epoch": epoch, "train_loss": state.loss_sum / state.seen, "train_acc": state.correct / state.seen,
                    "test_loss": test_losses[t], "test_acc": test_accs[t], "lr": lr,
                    "threshold": trial.reallocator.threshold if trial.reallocator is not None else None,
                    "weights_moved": state.moved, "reallocations": state.reallocations,
                    "density": trial.sparsity.densities() if trial.sparsity is not None else None,
                    "seconds": state.epoch_seconds, "images_per_s": state.epoch_images / max(state.epoch_seconds, 1e-9),
                    "trials_in_process": T,
                }
                if dist.is_main:
                    with open(trial.out / "metrics.jsonl", "a") as f:
                        f.write(json.dumps(record) + "\n")
                    console.print(
                        (f"seed {trial.args.seed}  " if T > 1 else "")
                        + f"epoch {epoch + 1:>3}/{args.epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.2%}  "
                        f"test loss {test_losses[t]:.3f} acc {test_accs[t]:.2%}  lr {lr:g}"
                        + (f"  H {record['threshold']:.3g} moved {state.moved}" if trial.reallocator is not None else "")
                        + f"  {T * record['images_per_s']:,.0f} img/s" + (" (all trials)" if T > 1 else "")
                    )
                state.seconds += state.epoch_seconds
                is_best = test_accs[t] > state.best_test_acc
                state.best_test_acc = max(state.best_test_acc, test_accs[t])
                state.epoch, state.step_in_epoch = epoch + 1, 0
                checkpoint(t, "last.pt")
                if is_best:
                    checkpoint(t, "best.pt")
                if state.epoch in args.snapshot_epochs:
                    checkpoint(t, f"epoch{state.epoch}.pt")
            bars.update(run_bar, completed=epoch + 1)
            if out_of_time():
                break

    dist.check_replicas(list(model.parameters()), "parameters")
    if progress.epoch < args.epochs:
        console.print(f"--stop-after {args.stop_after:g}: stopped at epoch {progress.epoch}, step {progress.step_in_epoch} of it; "
                      "continue with --resume")
        dist.close()
        return [None] * T
    summaries = [finish(trial, model, data.description, time.perf_counter() - started) for trial in trials] \
        if dist.is_main else [None] * T
    dist.close()
    return summaries


def finish(trial: Trial, model: StackedWideResNet, data_description: str, wall_seconds: float) -> dict:
    """Write a trial's final structure and its summary.json (which marks the run finished); block
    mode also exports the final weights as a plain dense state_dict (final_dense.pt)."""
    args, sparsity, out = trial.args, trial.sparsity, trial.out
    if sparsity is not None:
        save_atomic(sparsity.state_dict(), out / "final_masks.pt")
    if args.granularity == "block":
        save_atomic(dense_state_dict(model), out / "final_dense.pt")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "mode": args.mode, "granularity": args.granularity, "sparsity": args.sparsity if sparsity is not None else 0.0,
        "seed": args.seed, "depth": args.depth, "width": args.width, "epochs": args.epochs,
        "dpr_stop_epoch": args.dpr_stop_epoch if args.mode == "dpr" else None,
        "final_test_acc": metrics[-1]["test_acc"], "best_test_acc": max(m["test_acc"] for m in metrics),
        "final_train_loss": metrics[-1]["train_loss"],
        "nonzero_sparse_weights": sum(sparsity.nonzero_counts()) if sparsity is not None else None,
        "train_seconds": sum(m["seconds"] for m in metrics), "wall_seconds_this_process": wall_seconds,
        "data": data_description,
    }
    save_atomic_json(summary, out / "summary.json")
    print_summary(summary)
    return summary


def save_atomic_json(obj: dict, path: Path) -> None:
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def print_summary(summary: dict) -> None:
    table = Table(title="run summary")
    table.add_column("setting")
    table.add_column("value", justify="right")
    for key, value in summary.items():
        table.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    console.print(table)


def main(argv: list[str] | None = None) -> dict | list[dict] | None:
    """The CLI in-process: the run's summary, or a list of summaries when several --seeds are trained
    (None for a run that --stop-after stopped before its end)."""
    trials = parse_trials(argv)
    try:
        summaries = train_trials(trials)
        return summaries[0] if len(summaries) == 1 else summaries
    except (CheckpointError, data_lib.DataError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
