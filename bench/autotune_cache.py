"""Tuned kernel configs kept per GPU name, so that a second GPU session starts tuned.

Triton's autotuner keeps, per kernel, ``cache: {key tuple: Config}`` (the key: the values of the
kernel's ``key`` arguments, then the dtype name of every tensor argument). :func:`save` writes
those entries of every autotuned kernel of ``blockdpr_kernels`` to
``bench/results/autotune/<gpu>.json`` (merged with what the file holds); :func:`load` puts them
back before anything is timed, as the very Config objects of the kernel's own list, so a seeded
key is never benchmarked again. An entry whose config is no longer in the kernel's list is
skipped (and counted); the file records the triton version and the kernels' source hash it was
tuned with.

    python -m bench.autotune_cache            # what the file of this machine's GPU holds
"""
from __future__ import annotations

import importlib
import json
import pkgutil
import sys
from pathlib import Path

if __package__ in (None, ""):  # `python bench/autotune_cache.py`: the repository root makes `bench` importable
    sys.path.append(str(Path(__file__).resolve().parent.parent))

from bench.aot_compile import source_hash
from blockdpr.runinfo import atomic_write_json, slug

__all__ = ["DEFAULT_DIR", "tuners", "path_for", "snapshot", "save", "load", "clear", "narrow"]

DEFAULT_DIR = Path(__file__).resolve().parent / "results" / "autotune"
PACKAGE = "blockdpr_kernels"


def tuners(package: str = PACKAGE) -> dict:
    """``{"module.attr": Autotuner}`` of every autotuned kernel in the package's modules."""
    from triton.runtime.autotuner import Autotuner

    pkg = importlib.import_module(package)
    found = {}
    for info in pkgutil.iter_modules(pkg.__path__):
        module = importlib.import_module(f"{package}.{info.name}")
        for attr, obj in vars(module).items():
            while obj is not None and not isinstance(obj, Autotuner) and hasattr(obj, "fn"):
                obj = obj.fn  # Heuristics and other wrappers
            if isinstance(obj, Autotuner):
                found.setdefault(f"{info.name}.{attr}", obj)
    return found


def path_for(gpu_name: str, directory: Path = DEFAULT_DIR) -> Path:
    """``directory/<gpu name as a slug>.json``, e.g. ``nvidia-h200.json``."""
    return Path(directory) / f"{slug(gpu_name)}.json"


def _config_dict(config) -> dict:
    return dict(kwargs=dict(config.kwargs), num_warps=config.num_warps, num_stages=config.num_stages,
                num_ctas=getattr(config, "num_ctas", 1), maxnreg=getattr(config, "maxnreg", None))


def snapshot(found: dict | None = None) -> dict:
    """``{kernel name: [{"key": [...], "config": {...}}, ...]}`` of the tuners' current caches (keys made
    of JSON scalars only: anything else could not be matched again after a round trip)."""
    found = tuners() if found is None else found
    scalar = (int, float, str, bool, type(None))
    return {name: [{"key": list(key), "config": _config_dict(config)} for key, config in tuner.cache.items()
                   if all(isinstance(v, scalar) for v in key)]
            for name, tuner in found.items()}


def save(path: Path, gpu_name: str, found: dict | None = None) -> dict:
    """Merge the tuners' caches into the JSON at ``path`` (new entries win); returns what was written."""
    import triton

    old = json.loads(path.read_text()) if path.exists() else {}
    entries = {name: {json.dumps(e["key"]): e for e in rows} for name, rows in old.get("kernels", {}).items()}
    for name, rows in snapshot(found).items():
        entries.setdefault(name, {}).update({json.dumps(e["key"]): e for e in rows})
    record = {"gpu": gpu_name, "triton": triton.__version__, "kernels_source_hash": source_hash(),
              "kernels": {name: list(rows.values()) for name, rows in sorted(entries.items()) if rows}}
    atomic_write_json(path, record)
    return record


def load(path: Path, found: dict | None = None) -> dict:
    """Seed the tuners' caches from ``path``; returns counts ``{"loaded", "stale", "file"}`` (nothing when absent).

    An entry is stale when its kernel is gone or its config is not in the kernel's config list.
    """
    if not path.exists():
        return {"loaded": 0, "stale": 0, "file": None}
    record = json.loads(path.read_text())
    found = tuners() if found is None else found
    loaded = stale = 0
    for name, rows in record.get("kernels", {}).items():
        tuner = found.get(name)
        by_config = {json.dumps(_config_dict(c), sort_keys=True): c for c in tuner.configs} if tuner else {}
        for e in rows:
            config = by_config.get(json.dumps(e["config"], sort_keys=True))
            if config is None:
                stale += 1
                continue
            tuner.cache[tuple(e["key"])] = config
            loaded += 1
    return {"loaded": loaded, "stale": stale, "file": str(path), "tuned_with_triton": record.get("triton"),
            "source_changed": record.get("kernels_source_hash") != source_hash()}


def clear(found: dict | None = None) -> int:
    """Forget every tuned config (the next call re-tunes); returns how many kernels were cleared."""
    found = tuners() if found is None else found
    for tuner in found.values():
        tuner.cache.clear()
    return len(found)


def narrow(found: dict | None = None, keep: int = 1) -> int:
    """Keep only the first ``keep`` configs of every tuner (one config: no tuning, one compile per
    specialisation); returns how many tuners were narrowed. For bounded GPU test runs, never for timing."""
    found = tuners() if found is None else found
    for tuner in found.values():
        tuner.configs = tuner.configs[:keep]
    return len(found)


def main() -> None:
    """Print what the file of this machine's GPU holds."""
    import torch

    if not torch.cuda.is_available():
        print("no CUDA GPU: files under", DEFAULT_DIR, [p.name for p in sorted(DEFAULT_DIR.glob("*.json"))])
        return
    path = path_for(torch.cuda.get_device_name())
    record = json.loads(path.read_text()) if path.exists() else {"kernels": {}}
    print(path, {name: len(rows) for name, rows in record["kernels"].items()})


if __name__ == "__main__":
    main()
