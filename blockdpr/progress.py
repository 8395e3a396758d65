"""Training progress: rich bars on a terminal, plain lines every few seconds otherwise.

With --no-progress, or when stderr is not a terminal (output redirected to a file, a batch job),
a line is printed every `interval` seconds: epoch, step, images/s since the last line, and the ETA
of the epoch and of the run (from the step rate of this process). Nothing here syncs the device.
"""

from __future__ import annotations

import time
from datetime import timedelta

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def _clock(seconds: float) -> str:
    return str(timedelta(seconds=round(max(seconds, 0))))


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
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, disable=not bars, transient=True) if bars and console.is_terminal else None
        self._run_task = self._epoch_task = None
        self._last_time = self._last_steps = None
        self._start_time = self._start_steps = None

    def __enter__(self) -> "ProgressReporter":
        if self.bars is not None:
            self.bars.__enter__()
            self._run_task = self.bars.add_task("run", total=self.epochs, rate="")
        return self

    def __exit__(self, *exc) -> None:
        if self.bars is not None:
            self.bars.__exit__(*exc)

    def start_epoch(self, epoch: int, done: int) -> None:
        now, total = time.perf_counter(), epoch * self.steps + done
        self._last_time, self._last_steps = now, total
        if self._start_time is None:
            self._start_time, self._start_steps = now, total
        if self.bars is not None:
            self.bars.update(self._run_task, completed=epoch)
            self._epoch_task = self.bars.add_task(f"epoch {epoch + 1}/{self.epochs}", total=self.steps, completed=done, rate="")

    def step(self, epoch: int, done: int) -> None:
        now, total = time.perf_counter(), epoch * self.steps + done
        if self.bars is not None:
            rate = (total - self._start_steps) * self.images / max(now - self._start_time, 1e-9)
            self.bars.update(self._epoch_task, completed=done, rate=f"{rate:,.0f} img/s")
        elif now - self._last_time >= self.interval:
            rate = (total - self._last_steps) / max(now - self._last_time, 1e-9)  # steps/s
            left_epoch, left_run = self.steps - done, self.epochs * self.steps - total
            self.console.print(f"epoch {epoch + 1}/{self.epochs} step {done}/{self.steps}  "
                               f"{rate * self.images:,.0f} img/s  ETA epoch {_clock(left_epoch / max(rate, 1e-9))}  "
                               f"run {_clock(left_run / max(rate, 1e-9))}", highlight=False)
            self._last_time, self._last_steps = now, total

    def end_epoch(self) -> None:
        if self.bars is not None:
            self.bars.remove_task(self._epoch_task)
