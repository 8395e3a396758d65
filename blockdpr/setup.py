"""What a trial starts from: device, initial weights, initial structure (one function per job).

Used by the training engine (blockdpr/engine.py) and the run around it (blockdpr/loop.py).
"""

from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import CheckpointError, load_checkpoint
from .config import ConfigError, RunConfig
from .models import WideResNet
from .source_runs import finished_run_file
from .runinfo import atomic_write
from .sparsity import ElementSparsity, SparseStructure
from .sparsity.blocks import block_grid
from .sparsity.distribution import densities
from .sparsity.packed import to_block_sparse

# --mode reinit draws its new initial values with seed + REINIT_SEED_OFFSET, so that they differ
# from those of the DPR run of the same seed (which --mode orig-init uses).
REINIT_SEED_OFFSET = 1_000_000


def identity(config: RunConfig) -> dict:
    """The settings a checkpoint must share with the run that resumes it."""
    keys = ("granularity", "block_size", "mode", "depth", "width", "sparsity", "seed", "batch_size", "epochs", "train_subset")
    return {k: getattr(config, k) for k in keys}


def sgd(params, lr: float = 0.1, momentum: float = 0.9, weight_decay: float = 5e-4) -> torch.optim.SGD:
    """The paper's optimiser: SGD with Nesterov momentum (when momentum > 0) and weight decay on all
    parameters. foreach: its step and zero_grad are a few multi-tensor ops whatever the number of
    parameters, on any device (torch's default is one op per parameter for zero_grad everywhere and
    for the step off CUDA); the same numbers (compared bit for bit on CPU)."""
    return torch.optim.SGD(params, lr=lr, momentum=momentum, nesterov=momentum > 0, weight_decay=weight_decay,
                           foreach=True)


def resolve_device(name: str, local_rank: int = 0) -> torch.device:
    """The training device (validated by RunConfig); under torchrun each rank takes the GPU of its LOCAL_RANK."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", local_rank)
    return device


def save_tensors(obj, path: Path) -> None:
    """torch.save `obj` to `path` atomically (blockdpr.runinfo)."""
    atomic_write(path, lambda f: torch.save(obj, f))


def build_sparsity(config: RunConfig, params: dict[str, torch.Tensor], model: torch.nn.Module
                   ) -> tuple[SparseStructure | None, list[str]]:
    """The initial structure of one trial for each mode (None for dense); params: its sparse tensors.

    Block mode converts those convs of `model` to packed block-sparse layers (in place); the second
    value names the sparse convs that the block does not tile, which stay dense.
    """
    if config.mode == "dense":
        return None, []
    masks = None
    if config.mode in ("reinit", "orig-init"):
        masks = torch.load(finished_run_file(config.structure_from, "final_masks.pt", "dpr"), weights_only=True)
    if config.granularity == "block":
        if config.mode == "gmp":  # start from every block of the dense model
            block = (config.block_size, config.block_size)
            masks = {n: torch.ones(block_grid(p.shape, block), dtype=torch.bool) for n, p in params.items()
                     if block_grid(p.shape, block) is not None}
        return to_block_sparse(model, list(params), config.block_size, config.sparsity, config.seed, masks,
                               config.distribution if masks is None else "uniform")
    if config.mode in ("dpr", "static"):
        shares = None if config.distribution == "uniform" else densities(
            config.distribution, [tuple(p.shape) for p in params.values()], config.sparsity)
        return ElementSparsity.random(params, config.sparsity, config.seed, densities=shares), []
    sparsity = ElementSparsity(params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in params.items()})
    if masks is not None:
        sparsity.load_state_dict(masks)
    return sparsity, []


def init_seed(config: RunConfig) -> int:
    """The seed of a trial's random initial values (reinit: not those of the DPR run of the same seed)."""
    return config.seed + REINIT_SEED_OFFSET if config.mode == "reinit" else config.seed


def initial_state(config: RunConfig) -> dict[str, torch.Tensor]:
    """A trial's initial weights as a plain WideResNet state dict: random (seeded), or for orig-init
    the DPR run's initial values, for gmp the trained dense model (source runs are checked to fit
    before anything is written: blockdpr/source_runs.py)."""
    torch.manual_seed(init_seed(config))
    model = WideResNet(config.depth, config.width)
    if config.mode == "orig-init":
        model.load_state_dict(torch.load(finished_run_file(config.structure_from, "init_weights.pt", "dpr"), weights_only=True))
    elif config.mode == "gmp":
        try:
            state = load_checkpoint(finished_run_file(config.dense_from, "last.pt", "dense"))
        except CheckpointError as e:
            raise ConfigError([f"--dense-from: {e}"]) from None
        model.load_state_dict(state["model"])
    return model.state_dict()
