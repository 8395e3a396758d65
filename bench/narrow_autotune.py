"""pytest plugin for bounded GPU test runs: every autotuned kernel of blockdpr_kernels keeps its first
config only (no tuning, one compile per specialisation), so compiling cannot eat a GPU session.

    python -m pytest -p bench.narrow_autotune tests/kernels     # what bench/gpu_session.sh runs

Numerics of the other configs are left to the timed runs, where every case is checked against the
dense op first (bench/check.py); that every config compiles is bench/aot.py's job.
"""
from __future__ import annotations

import pytest

from bench import autotune_cache

_NARROWED = pytest.StashKey[int]()


def pytest_configure(config: pytest.Config) -> None:
    config.stash[_NARROWED] = autotune_cache.narrow()


def pytest_report_header(config: pytest.Config) -> str:
    return f"bench.narrow_autotune: {config.stash.get(_NARROWED, 0)} autotuned kernels keep their first config only"
