"""Train a WRN on CIFAR-10 with dynamic parameter reallocation: python -m blockdpr.train --help

The command line becomes one validated RunConfig per trial (blockdpr/config.py) before anything
is written; the run itself is blockdpr/loop.py. One run = one directory (--out) holding
config.json, metrics.jsonl (a line per epoch), checkpoints (last.pt, best.pt), init_weights.pt
(DPR runs), final_masks.pt (sparse runs) and summary.json (written last: its presence means the
run is complete); blockdpr/run_dir.py says how they stay consistent after a kill.

All randomness is a function of (--seed, epoch or step), so a run killed at any point and resumed
with `--out DIR --resume` (which restores the run's own settings) continues exactly as if it had
never stopped. --seeds 0,1,2 trains several trials of one configuration together in one process
(blockdpr/stacked.py), each with its own run directory (--out with a {seed} placeholder).

Exit codes: 0 done (or stopped by --stop-after, checkpointed); 2 bad settings, an unusable run
directory, checkpoint or data, or a failed write (one line per problem); 1 the training diverged
(NaN or infinite loss or weights; no summary.json); 128 + N stopped by signal N (SIGINT 130,
SIGTERM 143, SIGHUP 129) after a checkpoint.
"""

from __future__ import annotations

import argparse
import dataclasses
import errno
import shlex
import sys
from pathlib import Path

from rich.console import Console

from blockdpr_kernels import CONV_BLOCKS

from .checkpoint import CheckpointError
from .cli import ArgumentParser, HelpFormatter, add_list_argument, escape
from .config import (GMP_EPOCHS, GMP_LR_SCHEDULE, MODES, ConfigError, RunConfig, Schedule, resume_config,
                     with_seed)
from .data import DataError
from .loop import Diverged, Trainer
from .run_dir import holds_run, run_dir_errors, saved_config
from .signals import Stopped
from .source_runs import structure_sparsity
from .sparsity.distribution import DISTRIBUTIONS
from .sparsity.rules import RULES

console = Console(stderr=True, soft_wrap=True)


# ---- command line --------------------------------------------------------------------------
def piecewise(text: str, value_type=float) -> Schedule:
    """Parse 'epoch:value,epoch:value,...' into ((epoch, value), ...); order is checked by RunConfig."""
    try:
        return tuple((int(e), value_type(v)) for e, v in (item.split(":") for item in text.split(",")))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'epoch:value,...' starting at epoch 0, got {text!r}") from None


def build_parser() -> argparse.ArgumentParser:
    d = RunConfig()
    p = ArgumentParser(
        prog="python -m blockdpr.train", formatter_class=HelpFormatter, allow_abbrev=False,
        description="Train WRN on CIFAR-10 with dynamic parameter reallocation (Mostafa & Wang) or a baseline.")
    g = p.add_argument_group("run")
    g.add_argument("--mode", choices=MODES, default=d.mode,
                   help="dpr: dynamic reallocation; static: fixed random structure; reinit / orig-init: the final "
                        "structure of --structure-from with new random / its original initial values; dense; "
                        "gmp: prune the dense model of --dense-from gradually (Zhu & Gupta) and fine-tune")
    g.add_argument("--granularity", choices=("element", "block"), default=d.granularity,
                   help="element: dense tensors with element masks (the paper); block: reallocate whole "
                        "(block x block) blocks, stored packed and run on the blockdpr_kernels Triton kernels")
    g.add_argument("--block-size", type=int, default=d.block_size, help="block mode: blocks of block-size x block-size "
                   f"weights (one of {CONV_BLOCKS}); a conv whose channels it does not divide stays dense (reported)")
    g.add_argument("--out", type=Path, default=None,
                   help="run directory (default: runs/<mode>-<element|blockB>-s<sparsity>-seed<seed>, dense: "
                        "runs/dense-seed<seed>); with several --seeds it must contain {seed}, e.g. runs/dpr-seed{seed}")
    g.add_argument("--resume", action="store_true",
                   help="continue the run in --out with its own settings (flags that contradict them are refused)")
    g.add_argument("--overwrite", action="store_true", help="start anew in an --out that holds another run (deletes its files)")
    g.add_argument("--seed", type=int, default=d.seed, help="seeds the initial values, structure, data order and regrowth")
    add_list_argument(g, "--seeds", type=int, default=None, metavar="S,S",
                      help="train one trial per seed together in one process (a stacked model; overrides --seed). "
                           "--out, --structure-from and --dense-from may contain {seed}")
    g.add_argument("--device", default=d.device, help="auto, cpu, cuda, cuda:N")
    g.add_argument("--compile", action="store_true", help="torch.compile the model")
    g.add_argument("--amp", action="store_true", help="bf16 autocast on CUDA (the paper trains in fp32)")
    g.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=None,
                   help="channels_last memory format for the model and inputs (default: on for CUDA, off on CPU)")
    g.add_argument("--cuda-graph", action="store_true",
                   help="replay the training step as a CUDA graph (CUDA only; block mode re-captures after a reallocation)")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars: a progress line every --progress-seconds instead (also when not a terminal)")
    g.add_argument("--progress-seconds", type=float, default=d.progress_seconds, metavar="S",
                   help="seconds between progress lines without bars")
    g.add_argument("--checkpoint-every", type=int, default=d.checkpoint_every, metavar="STEPS",
                   help="also checkpoint every STEPS steps within an epoch (0: off)")
    g.add_argument("--checkpoint-minutes", type=float, default=d.checkpoint_minutes, metavar="M",
                   help="also checkpoint every M minutes of training (0: off)")
    add_list_argument(g, "--snapshot-epochs", type=int, default=[], metavar="E,E",
                      help="also keep the checkpoint taken after epoch E as epochE.pt (a DPR run stopped at E can "
                           "start from it: python -m blockdpr.reproduce does) (default: none)")
    g.add_argument("--stop-after", type=float, default=None, metavar="SECONDS",
                   help="checkpoint and exit (without summary.json) once this process has run SECONDS; continue "
                        "later with --resume (default: no limit)")
    g.add_argument("--structure-from", type=Path, default=None,
                   help="finished DPR run directory of the same model (reinit, orig-init): its final structure "
                        "trains, at its sparsity (--sparsity defaults to it); may contain {seed}")
    g.add_argument("--dense-from", type=Path, default=None, help="finished dense run directory (gmp); may contain {seed}")

    g = p.add_argument_group("data")
    g.add_argument("--data", type=Path, default=None,
                   help="CIFAR-10 source: the JPEG zip, cifar-10-batches-py/ or cifar-10-python.tar.gz "
                        "(default: data/cifar10-jpeg-q75.zip in the repo)")
    g.add_argument("--download", action="store_true", help="download the official python CIFAR-10 into --data (a directory)")
    g.add_argument("--train-subset", type=int, default=None, metavar="N", help="use the first N training images (smoke runs)")
    g.add_argument("--test-subset", type=int, default=None, metavar="N", help="use the first N test images (smoke runs)")

    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=d.depth, help="WRN depth, 6n + 4")
    g.add_argument("--width", type=int, default=d.width, help="WRN width factor k")

    g = p.add_argument_group("optimisation (paper defaults)")
    g.add_argument("--epochs", type=int, default=None, help=f"(default: 200; {GMP_EPOCHS} for gmp)")
    g.add_argument("--batch-size", type=int, default=d.batch_size, help="images per step")
    g.add_argument("--lr", type=float, default=d.lr, help="initial learning rate")
    add_list_argument(g, "--lr-milestones", type=int, default=list(d.lr_milestones), metavar="E,E",
                      help="epochs at which the lr is multiplied by --lr-gamma")
    g.add_argument("--lr-gamma", type=float, default=d.lr_gamma, help="lr factor at each milestone")
    g.add_argument("--lr-schedule", type=piecewise, default=None, metavar="E:LR,E:LR",
                   help="explicit schedule, overrides --lr/--lr-milestones (default: from those; gmp "
                        + ",".join(f"{e}:{v:g}" for e, v in GMP_LR_SCHEDULE) + ")")
    g.add_argument("--momentum", type=float, default=d.momentum, help="Nesterov momentum")
    g.add_argument("--weight-decay", type=float, default=d.weight_decay, help="L2 penalty on all parameters")

    g = p.add_argument_group("sparsity and DPR (paper defaults)")
    g.add_argument("--sparsity", type=float, default=d.sparsity, help="sparsity of the sparse tensors (the 3x3 convs of the residual blocks); "
                        "reinit / orig-init: that of --structure-from")
    g.add_argument("--target-pruned", type=int, default=None,
                   help="N_p: target units pruned per reallocation, below the active units (default: the paper's "
                        "fraction of the active weights or blocks, 20,000 of WRN-28-2's: 20,000 on WRN-28-2, 1,016 on "
                        "WRN-10-1; blockdpr/sparsity/schedule.py)")
    g.add_argument("--tolerance", type=float, default=d.tolerance, help="delta: H adapts when pruned count leaves N_p (1 +- delta)")
    g.add_argument("--initial-threshold", type=float, default=d.initial_threshold, help="H at the start")
    g.add_argument("--realloc-periods", type=lambda s: piecewise(s, int), metavar="E:P,E:P",
                   default=",".join(f"{e}:{v}" for e, v in d.realloc_periods),
                   help="iterations between reallocations from each epoch on")
    g.add_argument("--dpr-stop-epoch", type=int, default=d.dpr_stop_epoch, help="freeze the structure after this many epochs")
    g.add_argument("--keep-momentum", action="store_true",
                   help="keep stale optimizer state for regrown weights (as the DSR authors' code did); default zero")
    g.add_argument("--rule", choices=RULES, default=d.rule,
                   help="how a reallocation moves units: dsr (the paper's global threshold), set (per layer: drop "
                        "the smallest --alpha of the active, grow as many at random) or rigl (as set, grow by "
                        "gradient magnitude, --alpha decayed by a cosine until --t-end-epoch); every period of "
                        "--realloc-periods until --dpr-stop-epoch")
    g.add_argument("--alpha", type=float, default=d.alpha, help="set / rigl: fraction of a layer's active units dropped per update")
    g.add_argument("--t-end-epoch", type=int, default=None,
                   help="rigl: its last update, and the end of its cosine (default: 75%% of --epochs)")
    g.add_argument("--distribution", choices=DISTRIBUTIONS, default=d.distribution,
                   help="initial density per layer: uniform (the paper's) or erk (Erdos-Renyi-Kernel)")
    g.add_argument("--gmp-steps", type=int, default=d.gmp_steps, help="gmp: number of prunings")
    g.add_argument("--gmp-interval", type=int, default=d.gmp_interval, help="gmp: epochs between prunings")
    return p


def given_flags(parser: argparse.ArgumentParser, argv: list[str]) -> set[str]:
    """The settings (dests) that `argv` sets explicitly (the parser takes no abbreviations)."""
    options = parser._option_string_actions
    return {options[token.split("=", 1)[0]].dest for token in argv if token.split("=", 1)[0] in options}


def configs_from_argv(argv: list[str]) -> tuple[list[RunConfig], set[str]]:
    """The command line as one unresolved RunConfig per trial (--seeds, or --seed), and the settings
    it gives explicitly. Raises ConfigError (parse errors still go through argparse: exit 2)."""
    parser = build_parser()
    ns = vars(parser.parse_args(argv))
    given = given_flags(parser, argv)
    seeds = ns.pop("seeds") or [ns["seed"]]
    errors = []
    if len(set(seeds)) != len(seeds):
        errors.append(f"--seeds must be distinct, got {seeds}")
    if len(seeds) > 1:
        if ns["out"] is not None and "{seed}" not in str(ns["out"]):
            errors.append("--out must contain {seed} when training several --seeds (one run directory per trial)")
        if ns["granularity"] == "block":
            errors.append("--granularity block trains one trial per process (packed layers cannot be stacked): give one --seed")
    if errors:
        raise ConfigError(errors)
    if "seeds" in given:
        given.add("seed")
    ns.update(lr_milestones=tuple(ns["lr_milestones"]), snapshot_epochs=tuple(ns["snapshot_epochs"]))
    if isinstance(ns["realloc_periods"], str):
        ns["realloc_periods"] = piecewise(ns["realloc_periods"], int)
    configs = [RunConfig(**{**ns, "seed": s, "out": with_seed(ns["out"], s), "structure_from": with_seed(ns["structure_from"], s),
                            "dense_from": with_seed(ns["dense_from"], s)}) for s in seeds]
    return configs, given


def parse_configs(argv: list[str] | None = None) -> list[RunConfig]:
    """The command line as validated, resolved configs (one per trial). With --resume each trial
    continues its run's own settings (flags that contradict them raise ConfigError)."""
    argv = sys.argv[1:] if argv is None else argv
    configs, given = configs_from_argv(argv)
    if configs[0].resume:
        configs = [resume_config(saved_config(c.resolved().out), c.resolved(), given) for c in configs]
    elif "sparsity" not in given:
        configs = [with_structure_sparsity(c) for c in configs]
    errors = [e for c in configs for e in c.errors()]
    if not errors:
        errors = [e for c in configs for e in run_dir_errors(c.resolved())]
    if errors:
        raise ConfigError(list(dict.fromkeys(errors)))  # trials share most settings: each problem once
    return [c.resolved() for c in configs]


def with_structure_sparsity(config: RunConfig) -> RunConfig:
    """reinit / orig-init without --sparsity: the sparsity of the structure that trains (its
    --structure-from run's), said in one line, so that config.json and the default directory
    name describe what trained (a --sparsity that contradicts it is refused: source_runs)."""
    sparsity = structure_sparsity(config)
    if sparsity is None:
        return config
    console.print(f"--mode {config.mode}: --sparsity {sparsity} from --structure-from {escape(config.structure_from)} "
                  "(the sparsity of the structure that trains)", highlight=False)
    return dataclasses.replace(config, sparsity=sparsity)


def train_trials(configs: list[RunConfig]) -> list[dict | None]:
    """Run (or resume) T >= 1 trials of one configuration together; their summaries (None: stopped
    by --stop-after). Raises Stopped (a signal), Diverged, ConfigError, CheckpointError, DataError."""
    return Trainer(configs).run()


def train(config: RunConfig) -> dict | None:
    """Run (or resume) one training run; returns its summary."""
    return train_trials([config])[0]


def error_exit(lines: list[str], code: int, hint: str | None = None) -> SystemExit:
    for line in lines:
        console.print(f"[red]error:[/red] {escape(line)}", highlight=False)
    if hint:
        console.print(escape(hint), highlight=False)
    return SystemExit(code)


def write_failed_hint(e: OSError, configs: list[RunConfig]) -> str:
    """What to do after a failed write: free space (or fix the cause), then resume the runs whose
    directories hold one, or run the same command again (nothing written yet to resume)."""
    fix = "free some space" if e.errno in (errno.ENOSPC, errno.EDQUOT) else "fix that"
    outs = [str(c.out) for c in configs if holds_run(c.out)]
    if not outs:
        return f"{fix}, then run the same command again (no run was started in its directory)"
    more = f" (and likewise for {', '.join(outs[1:])})" if len(outs) > 1 else ""
    return f"{fix}, then continue with python -m blockdpr.train --out {shlex.quote(outs[0])} --resume{more}"


def resume_hint(stopped: Stopped) -> str:
    outs = [str(o) for o in stopped.outs]
    more = f" (and likewise for {', '.join(outs[1:])})" if len(outs) > 1 else ""
    return f"{stopped}: continue with python -m blockdpr.train --out {shlex.quote(outs[0])} --resume{more}"


def main(argv: list[str] | None = None) -> dict | list[dict] | None:
    """The CLI in-process: the run's summary, or a list of summaries when several --seeds are trained
    (None for a run that --stop-after stopped before its end). Errors exit (see the module docstring)."""
    configs = []
    try:
        configs = parse_configs(argv)
        summaries = train_trials(configs)
    except ConfigError as e:
        raise error_exit(e.errors, 2) from None
    except (CheckpointError, DataError) as e:
        raise error_exit([str(e)], 2) from None
    except Diverged as e:
        raise error_exit([f"training diverged: {e}"], 1) from None
    except OSError as e:  # a full disk, a read-only directory...
        raise error_exit([f"cannot write {e.filename or 'a run file'}: {e.strerror or e}"], 2,
                         write_failed_hint(e, configs)) from None
    except Stopped as e:
        console.print(escape(resume_hint(e)), highlight=False)
        raise SystemExit(128 + e.signum) from None
    except KeyboardInterrupt:  # before training started (or after it ended): nothing new to checkpoint
        console.print("interrupted before training started or after it ended: run the same command again "
                      "(add --resume if the run directory has a last.pt)", highlight=False)
        raise SystemExit(130) from None
    return summaries[0] if len(summaries) == 1 else summaries


if __name__ == "__main__":
    main()
