"""bench/autotune_cache.py on the CPU: the kernels' autotuners are found, their tuned configs survive
a save / clear / load round trip through the per-GPU JSON, and a seeded key is never benchmarked
again (run through the interpreter's real Autotuner.run)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import triton
import triton.language as tl

from bench import autotune_cache

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = [triton.Config({"BLOCK": 16}, num_warps=1), triton.Config({"BLOCK": 32}, num_warps=2)]


@triton.autotune(configs=CONFIGS, key=["n"])
@triton.jit
def _double_kernel(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    tl.store(y_ptr + offs, 2 * tl.load(x_ptr + offs, mask=offs < n), mask=offs < n)


def _launch(n: int) -> torch.Tensor:
    x = torch.arange(n, dtype=torch.float32)
    y = torch.empty_like(x)
    _double_kernel[lambda meta: (triton.cdiv(n, meta["BLOCK"]),)](x, y, n)
    return y


@pytest.fixture
def tuner():
    _double_kernel.cache.clear()
    yield _double_kernel
    _double_kernel.cache.clear()


def test_the_package_kernels_are_found():
    found = autotune_cache.tuners()
    assert {"conv._fwd_kernel", "conv._dgrad_kernel", "conv._wgrad_kernel"} <= set(found)
    assert all(hasattr(t, "cache") and t.configs for t in found.values())


def test_save_clear_load_round_trip(tmp_path, tuner):
    found = {"test._double_kernel": tuner}
    tuner.cache[(1000, "torch.float32", "torch.float32")] = CONFIGS[1]
    tuner.cache[(24, "torch.float32", "torch.float32")] = CONFIGS[0]
    path = autotune_cache.path_for("NVIDIA H200 (test)", tmp_path)
    assert path.name == "nvidia-h200-test.json"
    written = autotune_cache.save(path, "NVIDIA H200 (test)", found)
    assert written["gpu"] == "NVIDIA H200 (test)" and written["triton"] == triton.__version__
    assert len(json.loads(path.read_text())["kernels"]["test._double_kernel"]) == 2
    before = dict(tuner.cache)
    assert autotune_cache.clear(found) == 1 and tuner.cache == {}
    counts = autotune_cache.load(path, found)
    assert counts["loaded"] == 2 and counts["stale"] == 0
    assert tuner.cache == before
    assert all(any(c is k for k in CONFIGS) for c in tuner.cache.values())  # the kernel's own Config objects
    # a second save merges: an entry of another shape is added, the old ones stay
    tuner.cache[(7, "torch.float32", "torch.float32")] = CONFIGS[0]
    autotune_cache.save(path, "NVIDIA H200 (test)", {"test._double_kernel": tuner})
    tuner.cache.clear()
    assert autotune_cache.load(path, found)["loaded"] == 3


def test_a_config_no_longer_in_the_list_is_stale(tmp_path, tuner):
    path = tmp_path / "gpu.json"
    tuner.cache[(5, "torch.float32", "torch.float32")] = triton.Config({"BLOCK": 64}, num_warps=4)
    autotune_cache.save(path, "gpu", {"k": tuner})
    tuner.cache.clear()
    counts = autotune_cache.load(path, {"k": tuner})
    assert counts["loaded"] == 0 and counts["stale"] == 1
    assert tuner.cache == {}
    assert autotune_cache.load(tmp_path / "absent.json", {"k": tuner}) == {"loaded": 0, "stale": 0, "file": None}


def test_a_seeded_key_is_not_benchmarked(tmp_path, tuner, monkeypatch):
    """Seed the key of n = 40 from a saved file; the interpreter's Autotuner.run must take it as tuned."""
    key = (40, "torch.float32", "torch.float32")
    tuner.cache[key] = CONFIGS[1]
    autotune_cache.save(tmp_path / "g.json", "g", {"k": tuner})
    tuner.cache.clear()
    autotune_cache.load(tmp_path / "g.json", {"k": tuner})

    def no_bench(*args, **kwargs):
        raise AssertionError("benchmarked a key that was loaded from the cache")

    monkeypatch.setattr(tuner, "_bench", no_bench)
    assert torch.equal(_launch(40), 2 * torch.arange(40, dtype=torch.float32))
    assert set(tuner.cache) == {key}  # the launch's key is exactly the saved one
    with pytest.raises(AssertionError, match="benchmarked"):  # an unseeded key would be tuned
        _launch(41)


def test_narrow_keeps_one_config_and_nothing_is_tuned(tuner, monkeypatch):
    monkeypatch.setattr(tuner, "configs", list(CONFIGS))  # restored after the test
    assert autotune_cache.narrow({"k": tuner}) == 1 and tuner.configs == CONFIGS[:1]
    monkeypatch.setattr(tuner, "_bench", lambda *a, **k: pytest.fail("a narrowed kernel was tuned"))
    assert torch.equal(_launch(37), 2 * torch.arange(37, dtype=torch.float32))


def test_narrow_autotune_plugin_loads_in_pytest(tmp_path):
    """`pytest -p bench.narrow_autotune` (what the GPU session's kernel-test step runs) narrows every kernel."""
    (tmp_path / "test_one.py").write_text("def test_one():\n    pass\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
    proc = subprocess.run([sys.executable, "-m", "pytest", "-p", "bench.narrow_autotune", "-p", "no:cacheprovider",
                           str(tmp_path / "test_one.py")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    n = len(autotune_cache.tuners())
    assert f"bench.narrow_autotune: {n} autotuned kernels keep their first config only" in proc.stdout
