"""Stopping a run by signal: SIGINT, SIGTERM and SIGHUP only set a flag while training runs; the
loop checkpoints at the next step and raises Stopped (the CLI exits 128 + the signal number)."""

from __future__ import annotations

import signal
import threading

from .progress import position

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(Exception):
    """A signal stopped the run after a checkpoint; `signum` is the signal's number."""

    def __init__(self, signum: int, outs: list, epoch: int, step: int, epochs: int | None = None):
        """epoch: the 0-based epoch in progress, step: its steps done, epochs: the run's (worded by progress.position)."""
        self.signum, self.outs = signum, outs
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at {position(epoch, step, epochs)} (checkpointed)")


class StopSignals:
    """While active, SIGINT / SIGTERM / SIGHUP only record their number (`received`); the loop acts on it."""

    def __init__(self):
        self.received = 0
        self._previous = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in STOP_SIGNALS:
                self._previous[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.received = signum

    def __exit__(self, *exc) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
