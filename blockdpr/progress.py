"""Training progress: rich bars on a terminal, plain lines every few seconds otherwise.

With --no-progress, or when stderr is not a terminal (output redirected to a file, a batch job),
a line is printed every `interval` seconds: epoch, step, images/s since the last line, and the ETA
of the epoch and of the run (from the step rate of this process). The bars show the same ETAs,
from the steps this process has done, so the run's ETA appears from the first steps of the first
epoch on. Nothing here syncs the device.

Epochs are numbered from 1 wherever a user reads them ("epoch 3/200": the third of 200); the
code and the files (metrics.jsonl's "epoch", checkpoints) count from 0. :func:`position` words
a point of a run for the stop, resume and error lines.
"""

from __future__ import annotations

from datetime import timedelta
from time import perf_counter

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

NO_ESTIMATE = "-:--:--"


def clock(seconds: float) -> str:
    """Seconds as H:MM:SS (days spelled out)."""
    return str(timedelta(seconds=round(max(seconds, 0))))


def position(epoch: int, step: int, epochs: int | None = None) -> str:
    """Where a run is, for users (epochs from 1): `epoch` is the 0-based epoch in progress with
    `step` of its steps done. "epoch 3/200, step 40", or at an epoch boundary "the end of epoch
    2/200" ("the start of epoch 1/200" before any step)."""
    of = f"/{epochs}" if epochs is not None else ""
    if step == 0:
        return f"the end of epoch {epoch}{of}" if epoch > 0 else f"the start of epoch 1{of}"
    return f"epoch {epoch + 1}{of}, step {step}"


class ProgressReporter:
    """Reports steps of a run of `epochs` epochs of `steps_per_epoch` steps of `images_per_step` images.

    Use as a context manager; call start_epoch(epoch, done_steps), step(epoch, done_steps), end_epoch().
    """

    def __init__(self, console: Console, epochs: int, steps_per_epoch: int, images_per_step: int,
                 bars: bool, interval: float):
        self.console, self.epochs, self.steps, self.images = console, epochs, steps_per_epoch, images_per_step
        self.interval = interval
        self.bars = Progress(
            TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
            TimeElapsedColumn(), TextColumn("ETA {task.fields[eta]}"),
            console=console, disable=not bars, transient=True) if bars and console.is_terminal else None
        self._run_task = self._epoch_task = None
        self._last_time = self._last_steps = None
        self._start_time = self._start_steps = None

    def __enter__(self) -> "ProgressReporter":
        if self.bars is not None:
            self.bars.__enter__()
            self._run_task = self.bars.add_task("run", total=self.epochs, rate="", eta=NO_ESTIMATE)
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def start_epoch(self, epoch: int, done: int) -> None:
        now, total = perf_counter(), epoch * self.steps + done
        self._last_time, self._last_steps = now, total
        if self._start_time is None:
            self._start_time, self._start_steps = now, total
        if self.bars is not None:
            self.bars.update(self._run_task, completed=epoch + done / self.steps)
            self._epoch_task = self.bars.add_task(f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=done,
                                                  rate="", eta=NO_ESTIMATE)

    def step(self, epoch: int, done: int) -> None:
        now, total = perf_counter(), epoch * self.steps + done
        left_epoch, left_run = self.steps - done, self.epochs * self.steps - total
        if self.bars is not None:
            rate = (total - self._start_steps) / max(now - self._start_time, 1e-9)  # steps/s in this process
            self.bars.update(self._epoch_task, completed=done, rate=f"{rate * self.images:,.0f} img/s",
                             eta=clock(left_epoch / max(rate, 1e-9)))
            self.bars.update(self._run_task, completed=epoch + done / self.steps, eta=clock(left_run / max(rate, 1e-9)))
        elif now - self._last_time >= self.interval:
            rate = (total - self._last_steps) / max(now - self._last_time, 1e-9)  # steps/s
            self.console.print(f"epoch {epoch + 1}/{self.epochs} step {done}/{self.steps}  "
                               f"{rate * self.images:,.0f} img/s  ETA epoch {clock(left_epoch / max(rate, 1e-9))}  "
                               f"run {clock(left_run / max(rate, 1e-9))}", highlight=False)
            self._last_time, self._last_steps = now, total

    def end_epoch(self) -> None:
        if self.bars is not None:
            self.bars.remove_task(self._epoch_task)
