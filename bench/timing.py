"""The one timer of the benchmarks.

CUDA: ``triton.testing.do_bench(fn, warmup, rep, return_mode="all")``: one call, an estimate from
5 calls, ``warmup`` ms of warm-up calls, then as many calls as fit in ``rep`` ms, each timed by
CUDA events after the L2 cache is flushed; every raw time is returned (ms).
CPU (the smoke path, where times mean nothing): one warm-up call, then ``cpu_reps`` calls timed
by ``clock`` (``time.perf_counter``; bench/host.py passes ``time.thread_time``, the CPU time of the
calling thread, which a machine shared with other work does not inflate by descheduling).
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np

__all__ = ["time_ms", "stats"]


def time_ms(fn: Callable[[], object], device: str, *, warmup_ms: float = 25, rep_ms: float = 100,
            cpu_reps: int = 3, clock: Callable[[], float] = time.perf_counter) -> list[float]:
    """Every timed call of ``fn()`` in milliseconds, on ``device`` ("cuda" or "cpu")."""
    if device == "cuda":
        import triton.testing

        times = triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="all")
        return [round(float(t), 5) for t in times]
    fn()
    times = []
    for _ in range(cpu_reps):
        t0 = clock()
        fn()
        times.append((clock() - t0) * 1e3)
    return times


def stats(times: list[float]) -> dict:
    """Median and the 20th / 80th percentiles of a list of ms, and how many there are."""
    p20, med, p80 = np.percentile(times, [20, 50, 80])
    return {"median_ms": float(med), "p20_ms": float(p20), "p80_ms": float(p80), "repeats": len(times)}
