"""Train a WRN on CIFAR-10 with dynamic parameter reallocation: python -m blockdpr.train --help

One run = one directory (--out) holding config.json, metrics.jsonl (a line per epoch),
checkpoints (last.pt, best.pt, written atomically), init_weights.pt (DPR runs: the dense initial
values, for --mode orig-init), final_masks.pt (sparse runs: the final structure, for --mode
reinit / orig-init) and summary.json (written last: its presence means the run is complete).

All randomness is a function of (--seed, epoch or step): the data order of an epoch, the
augmentation of a step and the regrowth of a reallocation. A run killed at any point and resumed
with --resume therefore continues exactly as if it had never stopped.
"""

from __future__ import annotations

import argparse
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
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

from . import data as data_lib
from .checkpoint import CheckpointError, load_checkpoint, save_atomic, save_checkpoint
from .models import WideResNet, parameter_counts, sparse_parameters
from .sparsity import DPRConfig, ElementSparsity, Reallocator, gmp_pruning_index, gmp_sparsity, initial_keep_count
from .sparsity.select import seeded_generator

MODES = ("dpr", "static", "reinit", "orig-init", "dense", "gmp")
# The compressed baseline's fine-tuning schedule (DSR paper): 48 epochs, lr 0 / 0.02 / 0.004 / 0.0008.
GMP_EPOCHS = 48
GMP_LR_SCHEDULE = "0:0,1:0.02,25:0.004,35:0.0008"
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
    g.add_argument("--granularity", choices=("element",), default="element",
                   help="unit of sparsity (block mode is a separate issue)")
    g.add_argument("--out", type=Path, default=None, help="run directory (default: runs/<mode>-s<sparsity>-seed<seed>)")
    g.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (the paper trains in fp32)")
    g.add_argument("--no-progress", action="store_true", help="no progress bars (epoch lines are still printed)")
    g.add_argument("--checkpoint-every", type=int, default=0, metavar="STEPS",
                   help="also checkpoint every STEPS steps within an epoch (0: at epoch ends only)")
    g.add_argument("--structure-from", type=Path, default=None, help="finished DPR run directory (reinit, orig-init)")
    g.add_argument("--dense-from", type=Path, default=None, help="finished dense run directory (gmp)")

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
    g.add_argument("--lr-milestones", type=lambda s: [int(x) for x in s.split(",") if x], default=[60, 120, 160],
                   help="comma-separated epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=0.2)
    g.add_argument("--lr-schedule", type=piecewise, default=None,
                   help=f"explicit 'epoch:lr,...' schedule, overrides --lr/--lr-milestones (gmp default {GMP_LR_SCHEDULE})")
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--weight-decay", type=float, default=5e-4)

    g = p.add_argument_group("sparsity and DPR (paper defaults)")
    g.add_argument("--sparsity", type=float, default=0.9, help="sparsity of the sparse tensors (the 3x3 convs of the residual blocks)")
    g.add_argument("--target-pruned", type=int, default=20_000, help="N_p: target weights pruned per reallocation")
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
    if errors:
        parser.error("; ".join(errors))
    if args.out is None:
        args.out = Path("runs") / f"{args.mode}-s{args.sparsity}-seed{args.seed}"
    return args


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
    keys = ("granularity", "mode", "depth", "width", "sparsity", "seed", "batch_size", "epochs", "train_subset")
    return {k: getattr(args, k) for k in keys}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
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


def build_sparsity(args, model: WideResNet) -> ElementSparsity | None:
    """The initial structure for each mode (None for dense)."""
    params = sparse_parameters(model)
    if args.mode in ("dpr", "static"):
        return ElementSparsity.random(params, args.sparsity, args.seed)
    if args.mode in ("reinit", "orig-init"):
        masks = torch.load(finished_run_file(args.structure_from, "final_masks.pt", "dpr"), weights_only=True)
        sparsity = ElementSparsity(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
        sparsity.load_state_dict(masks)
        return sparsity
    if args.mode == "gmp":
        return ElementSparsity(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
    return None


def initial_weights(args, model: WideResNet) -> None:
    """Load the weights a mode starts from (orig-init: the DPR run's initial values; gmp: the trained dense model)."""
    if args.mode == "orig-init":
        model.load_state_dict(torch.load(finished_run_file(args.structure_from, "init_weights.pt", "dpr"), weights_only=True))
    elif args.mode == "gmp":
        state = load_checkpoint(finished_run_file(args.dense_from, "last.pt", "dense"))
        if state["identity"].get("mode") != "dense" or (state["identity"]["depth"], state["identity"]["width"]) != (args.depth, args.width):
            raise SystemExit(f"--dense-from {args.dense_from} must be a --mode dense WRN-{args.depth}-{args.width} run, "
                             f"found {state['identity']}")
        model.load_state_dict(state["model"])


# ---- the loop --------------------------------------------------------------------------------
def evaluate(net, images: torch.Tensor, labels: torch.Tensor, amp: bool, batch_size: int = 1000) -> tuple[float, float]:
    """Mean loss and accuracy on uint8 images [N, 32, 32, 3] (one host sync at the end)."""
    net.eval()
    loss_sum = torch.zeros((), device=images.device)
    correct = torch.zeros((), dtype=torch.int64, device=images.device)
    with torch.no_grad(), torch.autocast(images.device.type, torch.bfloat16, enabled=amp):
        for i in range(0, len(images), batch_size):
            logits = net(data_lib.normalize(images[i:i + batch_size])).float()
            y = labels[i:i + batch_size]
            loss_sum += F.cross_entropy(logits, y, reduction="sum")
            correct += (logits.argmax(1) == y).sum()
    net.train()
    return loss_sum.item() / len(images), correct.item() / len(images)


def make_progress(disable: bool) -> Progress:
    return Progress(
        TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
        TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
        console=console, disable=disable, transient=True,
    )


def train(args: argparse.Namespace) -> dict:
    """Run (or resume) one training run; returns its summary."""
    device = resolve_device(args.device)
    out: Path = args.out
    last_path = out / "last.pt"
    if args.resume and not last_path.is_file():
        raise SystemExit(f"--resume: no checkpoint at {last_path}")
    if not args.resume and (last_path.is_file() or (out / "summary.json").is_file()):
        raise SystemExit(f"{out} already holds a run: pass --resume to continue it, or choose another --out")
    out.mkdir(parents=True, exist_ok=True)

    data = data_lib.load_cifar10(args.data, download=args.download, progress=not args.no_progress)
    data = data.subset(args.train_subset, args.test_subset).to(device)

    torch.manual_seed(args.seed)
    model = WideResNet(args.depth, args.width).to(device)
    if device.type == "cuda":
        model = model.to(memory_format=torch.channels_last)
        torch.backends.cudnn.benchmark = True
    if args.mode == "dpr" and not args.resume:
        save_atomic(model.state_dict(), out / "init_weights.pt")
    initial_weights(args, model)
    sparsity = build_sparsity(args, model)
    if sparsity is not None:
        sparsity.apply_()
    reallocator = (Reallocator(sparsity.segments.sizes, DPRConfig(args.target_pruned, args.tolerance, args.initial_threshold),
                               args.seed, device) if args.mode == "dpr" else None)
    optimizer = torch.optim.SGD(model.parameters(), lr=value_at(args.lr_schedule, 0), momentum=args.momentum,
                                nesterov=args.momentum > 0, weight_decay=args.weight_decay)
    net = torch.compile(model) if args.compile else model

    state = RunState()
    if args.resume:
        ckpt = load_checkpoint(last_path, expect=identity(args))
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if sparsity is not None:
            sparsity.load_state_dict(ckpt["masks"])
        if reallocator is not None:
            reallocator.threshold = ckpt["threshold"]
        state = RunState(**ckpt["progress"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        keep = [line for line in (out / "metrics.jsonl").read_text().splitlines() if json.loads(line)["epoch"] < state.epoch]
        (out / "metrics.jsonl").write_text("".join(line + "\n" for line in keep))
        console.print(f"resumed {out} at epoch {state.epoch}, step {state.step_in_epoch} of it")
    else:
        counts = parameter_counts(model, sparsity.names if sparsity is not None else [], args.sparsity)
        config = {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "command": " ".join([sys.executable, "-m", "blockdpr.train", *sys.argv[1:]]),
                  "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
                  "versions": versions(), "git_commit": git_commit(),
                  "data": {"description": data.description, "source": data.source, "sha256": data.checksum,
                           "train_images": len(data.train_images), "test_images": len(data.test_images)},
                  "parameters": counts}
        (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (out / "metrics.jsonl").write_text("")

    def checkpoint(path: Path) -> None:
        save_checkpoint({
            "identity": identity(args), "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "masks": sparsity.state_dict() if sparsity is not None else None,
            "threshold": reallocator.threshold if reallocator is not None else None,
            "progress": vars(state), "rng": {"torch": torch.get_rng_state()},
        }, path)

    n_train = len(data.train_images)
    steps_per_epoch = math.ceil(n_train / args.batch_size)
    started = time.perf_counter()
    with make_progress(args.no_progress) as bars:
        run_bar = bars.add_task("run", total=args.epochs, completed=state.epoch, rate="")
        for epoch in range(state.epoch, args.epochs):
            if state.step_in_epoch == 0:
                state.start_epoch(epoch)
                k = gmp_pruning_index(epoch, args.gmp_steps, args.gmp_interval) if args.mode == "gmp" else None
                if k is not None:
                    s_k = gmp_sparsity(k, args.sparsity, args.gmp_steps)
                    sparsity.prune_to([initial_keep_count(p.numel(), s_k) for p in sparsity.params])
            lr = value_at(args.lr_schedule, epoch)
            for group in optimizer.param_groups:
                group["lr"] = lr
            period = int(value_at(args.realloc_periods, epoch))
            reallocating = reallocator is not None and epoch < args.dpr_stop_epoch
            order = data_lib.epoch_permutation(n_train, args.seed, epoch, device)
            loss_sum = torch.zeros((), device=device)
            correct = torch.zeros((), dtype=torch.int64, device=device)
            epoch_bar = bars.add_task(f"epoch {epoch + 1}/{args.epochs}", total=steps_per_epoch, completed=state.step_in_epoch, rate="")
            tick = time.perf_counter()
            images_this_process = 0
            for step in range(state.step_in_epoch, steps_per_epoch):
                idx = order[step * args.batch_size:(step + 1) * args.batch_size]
                x = data_lib.augment(data.train_images[idx], seeded_generator(device, args.seed, state.global_step))
                y = data.train_labels[idx]
                with torch.autocast(device.type, torch.bfloat16, enabled=args.amp):
                    logits = net(x)
                loss = F.cross_entropy(logits.float(), y)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if sparsity is not None:
                    sparsity.mask_grads_()
                optimizer.step()
                if sparsity is not None:
                    sparsity.apply_()
                loss_sum += loss.detach() * len(y)
                correct += (logits.argmax(1) == y).sum()
                state.seen += len(y)
                images_this_process += len(y)
                state.global_step += 1
                state.step_in_epoch = step + 1
                if reallocating and state.global_step % period == 0:
                    result = sparsity.reallocate(reallocator, state.global_step, optimizer, args.keep_momentum)
                    state.moved += result.pruned
                    state.reallocations += 1
                elapsed = time.perf_counter() - tick
                bars.update(epoch_bar, completed=step + 1, rate=f"{images_this_process / max(elapsed, 1e-9):,.0f} img/s")
                if args.checkpoint_every and state.step_in_epoch % args.checkpoint_every == 0 and step + 1 < steps_per_epoch:
                    state.loss_sum += loss_sum.item()
                    state.correct += int(correct.item())
                    loss_sum.zero_(), correct.zero_()
                    state.epoch_seconds += time.perf_counter() - tick
                    state.epoch_images += images_this_process
                    tick, images_this_process = time.perf_counter(), 0
                    checkpoint(last_path)
            bars.remove_task(epoch_bar)

            # End of epoch: one sync for the accumulators, evaluation, metrics, checkpoints.
            state.loss_sum += loss_sum.item()
            state.correct += int(correct.item())
            state.epoch_seconds += time.perf_counter() - tick
            state.epoch_images += images_this_process
            test_loss, test_acc = evaluate(net, data.test_images, data.test_labels, args.amp)
            record = {
                "epoch": epoch, "train_loss": state.loss_sum / state.seen, "train_acc": state.correct / state.seen,
                "test_loss": test_loss, "test_acc": test_acc, "lr": lr,
                "threshold": reallocator.threshold if reallocator is not None else None,
                "weights_moved": state.moved, "reallocations": state.reallocations,
                "density": sparsity.densities() if sparsity is not None else None,
                "seconds": state.epoch_seconds, "images_per_s": state.epoch_images / max(state.epoch_seconds, 1e-9),
            }
            with open(out / "metrics.jsonl", "a") as f:
                f.write(json.dumps(record) + "\n")
            console.print(
                f"epoch {epoch + 1:>3}/{args.epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.2%}  "
                f"test loss {test_loss:.3f} acc {test_acc:.2%}  lr {lr:g}"
                + (f"  H {record['threshold']:.3g} moved {state.moved}" if reallocator is not None else "")
                + f"  {record['images_per_s']:,.0f} img/s"
            )
            state.seconds += state.epoch_seconds
            is_best = test_acc > state.best_test_acc
            state.best_test_acc = max(state.best_test_acc, test_acc)
            state.epoch, state.step_in_epoch = epoch + 1, 0
            checkpoint(last_path)
            if is_best:
                checkpoint(out / "best.pt")
            bars.update(run_bar, completed=epoch + 1)

    if sparsity is not None:
        save_atomic(sparsity.state_dict(), out / "final_masks.pt")
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    summary = {
        "mode": args.mode, "granularity": args.granularity, "sparsity": args.sparsity if sparsity is not None else 0.0,
        "seed": args.seed, "depth": args.depth, "width": args.width, "epochs": args.epochs,
        "dpr_stop_epoch": args.dpr_stop_epoch if args.mode == "dpr" else None,
        "final_test_acc": metrics[-1]["test_acc"], "best_test_acc": max(m["test_acc"] for m in metrics),
        "final_train_loss": metrics[-1]["train_loss"],
        "nonzero_sparse_weights": sum(sparsity.nonzero_counts()) if sparsity is not None else None,
        "train_seconds": sum(m["seconds"] for m in metrics), "wall_seconds_this_process": time.perf_counter() - started,
        "data": data.description,
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


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    try:
        return train(args)
    except (CheckpointError, data_lib.DataError) as e:
        console.print(f"[red]error:[/red] {e}")
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
