"""One trial of a run (a process may train several, stacked): its settings, progress (RunState, saved
in every checkpoint) and metrics, and the repair of its best.pt. Its model, structure and DPR object
live in the engine (blockdpr/engine.py)."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field

from rich.console import Console

from .checkpoint import load_checkpoint
from .cli import escape
from .config import RunConfig
from .runinfo import atomic_write

console = Console(stderr=True, soft_wrap=True)


@dataclass
class RunState:
    """Where a trial is: saved in every checkpoint; the epoch accumulators make mid-epoch resume exact."""

    epoch: int = 0  # epoch in progress
    step_in_epoch: int = 0  # steps of that epoch already done
    global_step: int = 0
    best_test_acc: float = 0.0
    best_epoch: int = -1  # the epoch best.pt holds (-1: none yet)
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


@dataclass
class Trial:
    """One run of a process that may train several: its settings, progress and metrics."""

    config: RunConfig
    state: RunState = field(default_factory=RunState)
    records: list[dict] = field(default_factory=list)  # metrics.jsonl: one record per finished epoch

    @property
    def out(self):
        return self.config.out


def restore_best(out, state: RunState) -> None:
    """Make best.pt hold the epoch that last.pt says it holds (state.best_epoch). best.pt is written
    before last.pt, so a kill leaves it right or ahead (rewritten when that epoch is trained again);
    if it was lost, last.pt taken at the end of that epoch is the same checkpoint."""
    best = out / "best.pt"
    if state.best_epoch < 0 or (best.is_file() and load_checkpoint(best)["progress"]["best_epoch"] >= state.best_epoch):
        return
    if (state.epoch, state.step_in_epoch) == (state.best_epoch + 1, 0):
        with open(out / "last.pt", "rb") as f:
            atomic_write(best, lambda dst: shutil.copyfileobj(f, dst))
        console.print(f"restored {escape(best)} from last.pt (epoch {state.best_epoch})", highlight=False)
    else:
        console.print(f"[yellow]warning:[/yellow] {escape(best)} (epoch {state.best_epoch}) is missing or stale and "
                      "cannot be rebuilt; it is written again at the next best epoch", highlight=False)
