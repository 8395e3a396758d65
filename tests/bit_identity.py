"""Fixed-seed WRN-10-1 runs of every mode, reduced to sha256 hashes: the bit-identity check of refactors.

`record(data_dir, work_dir)` trains each case of CASES through the CLI (blockdpr.train.main) with
explicit flags for everything that shapes the numbers (target pruned count, reallocation periods,
DPR stop epoch, initial threshold, gmp schedule), so that a change of a default elsewhere does not
move them, and hashes per trial: the metrics (metrics.jsonl without wall-clock fields), the final
masks, the final weights, optimizer state (block mode's packed values joined: optimizer_hashes), H and
progress of last.pt, and block mode's
final_dense.pt. tests/test_bit_identity.py compares a fresh recording with the one committed in
tests/fixtures/bit_identity.json; regenerate that file (only at a commit whose numbers are the
reference) with

    python tests/bit_identity.py

Runs use one CPU thread (a reduction's order, hence its last bit, may depend on the thread count)
and float32 on the CPU; the hashes are those of this torch version on this kind of CPU (the
fixture records both, and the test says so when they differ).
"""

from __future__ import annotations

import hashlib
import io
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tiny import TINY, metric_rows, write_tiny_cifar  # noqa: E402

FIXTURE = Path(__file__).resolve().parent / "fixtures" / "bit_identity.json"
COMMON = ["--train-subset", "100", "--test-subset", "20", "--epochs", "2", "--sparsity", "0.9", "--seed", "0"]
ELEMENT_DPR = ["--target-pruned", "40", "--realloc-periods", "0:2,1:3", "--dpr-stop-epoch", "2",
               "--initial-threshold", "0.001", "--tolerance", "0.1"]
BLOCK = ["--granularity", "block", "--block-size", "16"]
BLOCK_DPR = ["--target-pruned", "3", "--realloc-periods", "0:2,1:3", "--dpr-stop-epoch", "2",
             "--initial-threshold", "0.05", "--tolerance", "0.1"]
GMP = ["--gmp-steps", "2", "--gmp-interval", "1"]
SEEDS3 = ["--seeds", "0,1,2"]


def cases(root: Path) -> list[tuple[str, list[str], list[str]]]:
    """(name, flags, run directories) in the order they must run (reinit, orig-init and gmp read
    the runs before them)."""
    def out(name, stacked=False):
        return str(root / (f"{name}-seed{{seed}}" if stacked else name))

    def dirs(name, stacked=False):
        return [str(root / f"{name}-seed{s}") for s in (0, 1, 2)] if stacked else [str(root / name)]

    table = []
    for unit, extra, dpr in (("element", [], ELEMENT_DPR), ("block", BLOCK, BLOCK_DPR)):
        for stacked in ((False, True) if unit == "element" else (False,)):  # block mode: one trial per process
            tag = f"{unit}-T3" if stacked else unit
            seeds = SEEDS3 if stacked else []
            dense = f"dense-{tag}"
            if unit == "element":
                table.append((dense, ["--mode", "dense", *seeds, "--out", out(dense, stacked)], dirs(dense, stacked)))
            else:
                dense = "dense-element"
            for mode in ("dpr", "static", "reinit", "orig-init", "gmp"):
                name = f"{mode}-{tag}"
                flags = ["--mode", mode, *extra, *seeds, "--out", out(name, stacked)]
                if mode == "dpr":
                    flags += dpr
                if mode in ("reinit", "orig-init"):
                    flags += ["--structure-from", out(f"dpr-{tag}", stacked)]
                if mode == "gmp":
                    flags += GMP + ["--dense-from", out(dense, stacked and unit == "element")]
                table.append((name, flags, dirs(name, stacked)))
    return table


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def tensor_hashes(tree, prefix: str = "") -> dict[str, str]:
    """sha256 of every tensor's dtype, shape and bytes in a nested dict/list, keyed by its path; other
    leaves hashed by their JSON."""
    out = {}
    if isinstance(tree, dict):
        for k in sorted(tree, key=str):
            out.update(tensor_hashes(tree[k], f"{prefix}{k}."))
    elif isinstance(tree, (list, tuple)) and any(torch.is_tensor(v) or isinstance(v, dict) for v in tree):
        for i, v in enumerate(tree):
            out.update(tensor_hashes(v, f"{prefix}{i}."))
    elif torch.is_tensor(tree):
        t = tree.detach().cpu().contiguous().reshape(-1)
        buf = io.BytesIO()
        buf.write(f"{t.dtype} {tuple(tree.shape)}".encode())
        buf.write(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
        out[prefix.rstrip(".")] = sha(buf.getvalue())
    else:
        out[prefix.rstrip(".")] = sha(json.dumps(tree, sort_keys=True).encode())
    return out


def optimizer_hashes(state: dict) -> dict[str, str]:
    """tensor_hashes of an optimizer state, independent of how block mode packs its values: the state of
    packed block values (3-D tensors) joined in parameter order per key (one Parameter holding every
    layer's blocks and one per layer give the same bytes), every other parameter's state in order."""
    entries = [state[i] for i in sorted(state)]
    packed = [e for e in entries if any(torch.is_tensor(v) and v.dim() == 3 for v in e.values())]
    if not packed:
        return tensor_hashes(state)
    joined = {k: torch.cat([e[k] for e in packed]) for k, v in packed[0].items() if torch.is_tensor(v) and v.dim() == 3}
    others = [e for e in entries if not any(e is p for p in packed)]
    return tensor_hashes({"packed": joined, "others": others})


def run_hashes(run: Path) -> dict[str, str]:
    """The hashes of one trial's run directory."""
    result = {"metrics": sha(json.dumps(metric_rows(run), sort_keys=True).encode())}
    last = torch.load(run / "last.pt", weights_only=True)
    progress = {k: v for k, v in last["progress"].items() if k not in ("seconds", "epoch_seconds")}
    result["progress"] = sha(json.dumps(progress, sort_keys=True).encode())
    result["reallocator"] = sha(json.dumps(last["reallocator"], sort_keys=True).encode())
    # a block-sparse layer's state_dict also holds its block mask (since the fixture was recorded): the
    # structure is compared through final_masks, the weights without it
    weights = {k: v for k, v in last["model"].items() if not k.endswith(".block_mask")}
    result["weights"] = sha(json.dumps(tensor_hashes(weights), sort_keys=True).encode())
    result["optimizer"] = sha(json.dumps(optimizer_hashes(last["optimizer"]["state"]), sort_keys=True).encode())
    for name in ("final_masks.pt", "final_dense.pt"):
        if (run / name).is_file():
            tensors = torch.load(run / name, weights_only=True)
            result[name.removesuffix(".pt")] = sha(json.dumps(tensor_hashes(tensors), sort_keys=True).encode())
    return result


def record(data: Path, root: Path) -> dict:
    """Train every case into `root` (one CPU thread) and return {case: {trial dir name: hashes}}."""
    from blockdpr.train import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        runs = {}
        for name, flags, dirs in cases(root):
            main([*TINY, "--data", str(data), *COMMON, *flags])
            runs[name] = {Path(d).name: run_hashes(Path(d)) for d in dirs}
        return runs
    finally:
        torch.set_num_threads(threads)


def environment() -> dict:
    return {"torch": torch.__version__, "machine": platform.machine(), "python": platform.python_version()}


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        data = write_tiny_cifar(Path(tmp) / "data" / "cifar-10-batches-py")
        runs = record(data, Path(tmp) / "runs")
    FIXTURE.parent.mkdir(exist_ok=True)
    FIXTURE.write_text(json.dumps({"environment": environment(), "runs": runs}, indent=1, sort_keys=True) + "\n")
    print(f"wrote {FIXTURE} ({len(runs)} cases)")


if __name__ == "__main__":
    main()
