"""The finished runs a run builds on (--structure-from for reinit / orig-init, --dense-from for
gmp): that they are finished, hold the files needed, and fit the model they go into.

Checked before anything is written (train.parse_configs through run_dir.run_dir_errors): a source
of another mode, granularity, block size, depth or width, or whose final masks name other
tensors or shapes than this run's sparse tensors, is refused with one line per mismatch. A
structure run trains its source's sparsity: the CLI takes it from the source when --sparsity is
not given (`structure_sparsity`), and refuses a --sparsity that contradicts it.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from .config import ConfigError, RunConfig
from .models import WideResNet, sparse_parameters
from .sparsity.blocks import block_grid

STRUCTURE_MODES = ("reinit", "orig-init")
# What a structure source must share with the run it goes into (the masks are checked besides).
STRUCTURE_KEYS = ("granularity", "block_size", "depth", "width", "sparsity")


def finished_run_file(run_dir: Path, name: str, mode: str) -> Path:
    """A file of a finished run that this run builds on, or ConfigError saying why it is not there."""
    path = Path(run_dir) / name
    if not (Path(run_dir) / "summary.json").is_file():
        raise ConfigError([f"{run_dir} is not a finished run (no summary.json): finish that --mode {mode} run first"])
    if not path.is_file():
        raise ConfigError([f"{run_dir} has no {name}: was it a --mode {mode} run?"])
    return path


def source_config(run_dir: Path) -> RunConfig:
    """The settings a finished source run recorded, or ConfigError saying what is wrong."""
    path = Path(run_dir) / "config.json"
    try:
        return RunConfig.from_json(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, AttributeError) as e:
        raise ConfigError([f"{path} is missing or unreadable ({e}): cannot tell which model that run trained"]) from None


def structure_sparsity(config: RunConfig) -> float | None:
    """The sparsity of the structure a reinit / orig-init config trains (its --structure-from
    run's), or None where there is none to read (not a structure mode; a missing source, which
    run_dir_errors reports)."""
    if config.mode not in STRUCTURE_MODES or config.structure_from is None:
        return None
    try:
        finished_run_file(config.structure_from, "final_masks.pt", "dpr")
        return source_config(config.structure_from).sparsity
    except ConfigError:
        return None


def source_run_errors(config: RunConfig) -> list[str]:
    """Problems with the finished run that `config` builds on (--structure-from, --dense-from): not
    finished; another mode or model (one line each, under a heading); files missing; masks that do
    not fit this model's sparse tensors."""
    if config.mode in STRUCTURE_MODES:
        flag, run_dir, mode, keys = "--structure-from", config.structure_from, "dpr", STRUCTURE_KEYS
        files = ("final_masks.pt", "init_weights.pt") if config.mode == "orig-init" else ("final_masks.pt",)
    elif config.mode == "gmp":
        flag, run_dir, mode, keys, files = "--dense-from", config.dense_from, "dense", ("depth", "width"), ("last.pt",)
    else:
        return []
    run_dir = Path(run_dir)
    if not (run_dir / "summary.json").is_file():
        return [f"{run_dir} is not a finished run (no summary.json): finish that --mode {mode} run first"]
    try:
        source = source_config(run_dir)
    except ConfigError as e:
        return e.errors
    wrong = [] if source.mode == mode else [f"mode: {run_dir} is a --mode {source.mode} run, not a --mode {mode} run"]
    for key in keys:
        if key == "block_size" and not config.granularity == source.granularity == "block":
            continue  # element mode has no block size (and a granularity mismatch is named already)
        have, want = getattr(source, key), getattr(config, key)
        if have != want:
            wrong.append(f"{key}: the source has {have!r}, this run {want!r}")
    missing = [name for name in files if not (run_dir / name).is_file()]
    if missing and not wrong:
        return [f"{run_dir} has no {' or '.join(missing)}: was it a --mode {mode} run?"]
    if not wrong and "final_masks.pt" in files:
        wrong = _mask_errors(run_dir / "final_masks.pt", config)
    return [f"{flag} {run_dir} does not fit this run:", *wrong] if wrong else []


def _mask_errors(path: Path, config: RunConfig) -> list[str]:
    """How the masks in `path` differ from this run's sparse tensors (names; shapes, or block grids)."""
    try:
        found = torch.load(path, map_location="cpu", weights_only=True)
        found = {n: list(m.shape) for n, m in found.items()}
    except Exception as e:  # torch raises several types for truncated or foreign files
        return [f"cannot read {path} ({e})"]
    want = expected_mask_shapes(config)
    wrong = [f"masks: missing {n}" for n in want if n not in found]
    wrong += [f"masks: {n} is not a sparse tensor of this model" for n in found if n not in want]
    wrong += [f"{n}: the source has {found[n]}, this run {want[n]}" for n in want if n in found and found[n] != want[n]]
    return wrong


def expected_mask_shapes(config: RunConfig) -> dict[str, list[int]]:
    """The structure a run of `config` holds, tensor name -> mask shape: the weight shape in element
    mode, the block grid in block mode (tensors the block does not tile are dense: no mask)."""
    with torch.device("meta"):
        model = WideResNet(config.depth, config.width)
    shapes = {n: p.shape for n, p in sparse_parameters(model).items()}
    if config.granularity == "element":
        return {n: list(s) for n, s in shapes.items()}
    block = (config.block_size, config.block_size)
    return {n: list(block_grid(s, block)) for n, s in shapes.items() if block_grid(s, block) is not None}
