"""The run around the training engine: setup (Trainer()), one step, end of epoch, finish.

The engine (blockdpr/engine.py) computes; this module owns the run directory, checkpoints,
metrics, signals and printing. `Trainer(configs).run()` trains T >= 1 trials together (one stacked model, blockdpr/stacked.py;
T = 1 is an ordinary run; they share every setting but config.PER_TRIAL: seed, mode, sparsity...)
and returns their summaries, or Nones when --stop-after stopped it (checkpointed). All randomness
is a function of (seed, epoch or step), so a run resumed from any checkpoint continues exactly as
if it had never stopped.

Stopping: SIGINT, SIGTERM and SIGHUP are caught while training; the loop checkpoints at the next
step and raises Stopped (the CLI prints how to resume and exits 128 + the signal number). A
non-finite training loss or weight raises Diverged before anything non-finite is checkpointed or
pruned. Checkpoints also come every --checkpoint-every steps and every --checkpoint-minutes.
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict

import torch
from rich.console import Console
from rich.table import Table

from . import data as data_lib
from .checkpoint import load_checkpoint, save_checkpoint
from .cli import escape
from .config import ConfigError, RunConfig, check_trials
from .distributed import Distributed
from .models import WideResNet, parameter_counts
from .progress import ProgressReporter, position
from .run_dir import open_run_dir, write_config, write_metrics, write_summary
from .engine import Engine
from .runinfo import provenance
from .setup import identity, init_seed, initial_state, resolve_device, save_tensors
from .signals import STOP_SIGNALS, Stopped, StopSignals
from .sparsity import NonFiniteWeights
from .sparsity.packed import dense_state_dict
from .trial import RunState, Trial, restore_best

console = Console(stderr=True, soft_wrap=True)
RANK_SYNC_STEPS = 20  # data parallel: ranks agree on time- and signal-driven stops every this many steps


class Diverged(FloatingPointError):
    """The training loss or the weights became NaN or infinite."""


class Trainer:
    """A run of T trials trained together (one schedule; see config.check_trials) around an Engine:
    construct (setup: run directories, the engine, a resume), then run()."""

    # ---- setup ----------------------------------------------------------------------------
    def __init__(self, configs: list[RunConfig]):
        cfg = self.cfg = check_trials(configs)
        self.T = len(configs)
        dist = Distributed.from_env(resolve_device(cfg.device).type)  # one rank of 1 without torchrun
        if cfg.cuda_graph and dist.enabled:
            raise ConfigError(["--cuda-graph trains one rank per process only (no torchrun)"])
        resuming = [c.resume and (c.out / "last.pt").is_file() for c in configs]
        if any(resuming) and not all(resuming):
            raise ConfigError(["--resume: some trials have a checkpoint and some do not: resume them separately"])
        self.resuming = all(resuming)
        data = data_lib.load_cifar10(cfg.data, download=cfg.download, progress=not cfg.no_progress)  # before any write
        if dist.is_main:
            for c in configs:
                open_run_dir(c)
                console.print(f"run directory: {escape(c.out)}", highlight=False)

        initial = [initial_state(c) for c in configs]
        if dist.is_main and not self.resuming:
            for c, state in zip(configs, initial):
                if c.mode == "dpr":
                    save_tensors(state, c.out / "init_weights.pt")
        ckpts = [load_checkpoint(c.out / "last.pt", expect=identity(c)) for c in configs] if self.resuming else None
        self.engine = engine = Engine(configs, dist, data, initial, ckpts)
        self.dist, self.device, self.steps_per_epoch = dist, engine.device, engine.steps_per_epoch
        self.trials = [Trial(c) for c in configs]
        for c, dense_layers in zip(configs, engine.dense_layers):
            if dense_layers and dist.is_main:
                console.print(f"block size {c.block_size} does not tile {len(dense_layers)} sparse conv(s), kept dense: "
                              + ", ".join(dense_layers))
        if self.resuming:
            self._load(ckpts)
        elif dist.is_main:
            for t, trial in enumerate(self.trials):
                self._write_config(t, configs)
                write_metrics(trial.out, [])

    def _load(self, ckpts: list[dict]) -> None:
        """The run's side of a resume (the engine loaded weights, structure and optimizer): progress, metrics, best.pt."""
        for trial, ckpt in zip(self.trials, ckpts):
            trial.state = RunState(**ckpt["progress"])
            trial.records = list(ckpt["metrics"])
            if self.dist.is_main:
                write_metrics(trial.out, trial.records)  # the checkpoint's epochs: rebuilds a torn or deleted file
                restore_best(trial.out, trial.state)
                console.print(f"resumed {escape(trial.out)} at "
                              f"{position(trial.state.epoch, trial.state.step_in_epoch, trial.config.epochs)}", highlight=False)

    def _write_config(self, t: int, configs: list[RunConfig]) -> None:
        trial, dpr, dense_layers = self.trials[t], self.engine.dprs[t], self.engine.dense_layers[t]
        c = trial.config
        with torch.device("meta"):  # shapes only: no memory, no draw from the global generator
            plain = WideResNet(c.depth, c.width)
        sparse_names = dpr.names + dense_layers if dpr is not None else []
        counts = parameter_counts(plain, sparse_names, c.sparsity, (c.block_size,) * 2 if c.granularity == "block" else None)
        prov = provenance(self.device, ["-m", "blockdpr.train", *c.to_argv()])  # the command that trains this run
        data = self.engine.data
        write_config(trial.out, c, {
            "init_seed": init_seed(c), "trained_with_seeds": [d.seed for d in configs],
            "layers_kept_dense": dense_layers, "world_size": self.dist.world_size,
            "device_name": prov["device"]["gpu_name"] or prov["device"]["cpu"], "provenance": prov,
            "dataset": {"description": data.description, "source": data.source, "sha256": data.checksum,
                     "train_images": len(data.train_images), "test_images": len(data.test_images)},
            "parameters": counts})

    # ---- the loop -------------------------------------------------------------------------
    def run(self) -> list[dict | None]:
        """Train to the end (summaries), or until --stop-after (Nones); a signal raises Stopped."""
        cfg, progress = self.cfg, self.trials[0].state  # epoch and steps are the same in every trial
        self.started = self.last_checkpoint = time.perf_counter()
        reporter = ProgressReporter(console, cfg.epochs, self.steps_per_epoch, self.T * cfg.batch_size,
                                    bars=not cfg.no_progress, interval=cfg.progress_seconds)
        with StopSignals() as self.signals, reporter:
            for epoch in range(progress.epoch, cfg.epochs):
                self.start_epoch(epoch)
                reporter.start_epoch(epoch, progress.step_in_epoch)
                for step in range(progress.step_in_epoch, self.steps_per_epoch):
                    self.step(epoch, step)
                    reporter.step(epoch, step + 1)
                    if step + 1 == self.steps_per_epoch:
                        break  # the end of the epoch checkpoints
                    signum, due = self.pause(step, False)
                    if due or signum:
                        self.checkpoint_all("last.pt")
                    if signum:
                        self.stop(signum)
                    if due == "stop-after":
                        break
                reporter.end_epoch()
                if progress.step_in_epoch < self.steps_per_epoch:
                    break
                self.end_epoch(epoch)
                signum, due = self.pause(-1, True)
                if signum:
                    self.stop(signum)
                if due == "stop-after":
                    break
        self.dist.check_replicas(list(self.engine.model.parameters()), "parameters")
        if progress.epoch < cfg.epochs:
            console.print(f"--stop-after {cfg.stop_after:g}: stopped at {position(progress.epoch, progress.step_in_epoch, cfg.epochs)}"
                          "; continue with --resume")
            self.dist.close()
            return [None] * self.T
        summaries = [self.finish(t) for t in range(self.T)] if self.dist.is_main else [None] * self.T
        if self.dist.is_main:
            print_summaries(summaries)
        self.dist.close()
        return summaries

    def start_epoch(self, epoch: int) -> None:
        """Epoch start: each trial's epoch accumulators (at a fresh epoch), then the engine's (gmp
        pruning, lr, data order)."""
        fresh = self.trials[0].state.step_in_epoch == 0
        if fresh:
            for trial in self.trials:
                trial.state.start_epoch(epoch)
        self.engine.start_epoch(epoch, fresh)
        self.lr = self.engine.lr
        self.tick, self.images_this_process = time.perf_counter(), 0

    def step(self, epoch: int, step: int) -> None:
        """One training step of every trial and the reallocations that are due (Engine.step), counted."""
        try:
            results = self.engine.step(step)
        except NonFiniteWeights as e:
            raise Diverged(f"{', '.join(str(self.trials[t].out) for t in e.trials)}: {e}") from None
        batch = self.engine.batch_size(step)  # images per trial in this step, over all ranks
        self.images_this_process += batch
        for t, trial in enumerate(self.trials):
            state = trial.state
            state.seen += batch
            state.global_step += 1
            state.step_in_epoch = step + 1
            if t in results:
                state.moved += results[t].pruned
                state.reallocations += 1

    def pause(self, step: int, epoch_end: bool) -> tuple[int, str | None]:
        """After a step: (signal number or 0, why a checkpoint is due: 'stop-after', 'time', 'steps' or None).
        Data parallel: time and signals are agreed between ranks every RANK_SYNC_STEPS steps."""
        cfg, now = self.cfg, time.perf_counter()
        signum = self.signals.received
        stop = cfg.stop_after is not None and now - self.started >= cfg.stop_after
        timed = cfg.checkpoint_minutes > 0 and now - self.last_checkpoint >= 60 * cfg.checkpoint_minutes
        if self.dist.enabled:
            if not epoch_end and (step + 1) % RANK_SYNC_STEPS:
                signum, stop, timed = 0, False, False
            else:
                flags = self.dist.sum_(torch.tensor([signum, stop, timed], dtype=torch.int64, device=self.device)).tolist()
                signum, stop, timed = (STOP_SIGNALS[0] if flags[0] else 0), bool(flags[1]), bool(flags[2])
        steps = cfg.checkpoint_every and (step + 1) % cfg.checkpoint_every == 0
        return signum, ("stop-after" if stop else "time" if timed else "steps" if steps else None)

    def stop(self, signum: int) -> None:
        state = self.trials[0].state
        raise Stopped(signum, [t.out for t in self.trials], state.epoch, state.step_in_epoch, self.cfg.epochs)

    def bank_accumulators(self) -> None:
        """Move the device-side accumulators into each trial's RunState (one host sync); Diverged if non-finite."""
        losses, correct = self.engine.take_accumulators()
        seconds = time.perf_counter() - self.tick
        bad = [str(t.out) for t, loss in zip(self.trials, losses) if not math.isfinite(loss)]
        if bad:
            raise Diverged(f"the training loss became NaN or infinite in epoch {self.trials[0].state.epoch + 1}/{self.cfg.epochs} "
                           f"({', '.join(bad)}): lower --lr; the last checkpoint is the last finite state")
        for trial, loss, right in zip(self.trials, losses, correct):
            trial.state.loss_sum += loss
            trial.state.correct += int(right)
            trial.state.epoch_seconds += seconds
            trial.state.epoch_images += self.images_this_process
        self.tick, self.images_this_process = time.perf_counter(), 0

    def checkpoint_all(self, name: str) -> None:
        """Bank the accumulators and write every trial's `name` (mid-epoch)."""
        self.bank_accumulators()
        for t in range(self.T):
            self.checkpoint(t, name)
        self.last_checkpoint = time.perf_counter()

    def checkpoint(self, t: int, name: str) -> None:
        if not self.dist.is_main:
            return
        trial = self.trials[t]
        save_checkpoint({"identity": identity(trial.config), **self.engine.state_dict(t),
                         "progress": asdict(trial.state), "metrics": trial.records}, trial.out / name)

    def end_epoch(self, epoch: int) -> None:
        """One sync for the accumulators, evaluation, metrics, then best.pt / epochE.pt before last.pt."""
        self.bank_accumulators()
        test_losses, test_accs = self.engine.evaluate()
        for t, trial in enumerate(self.trials):
            state, c, dpr = trial.state, trial.config, self.engine.dprs[t]
            record = {
                "epoch": epoch, "train_loss": state.loss_sum / state.seen, "train_acc": state.correct / state.seen,
                "test_loss": test_losses[t], "test_acc": test_accs[t], "lr": self.lr,
                "threshold": dpr.threshold if dpr is not None else None,
                "weights_moved": state.moved, "reallocations": state.reallocations,
                "density": dpr.densities() if dpr is not None else None,
                "seconds": state.epoch_seconds, "images_per_s": state.epoch_images / max(state.epoch_seconds, 1e-9),
                "trials_in_process": self.T,
            }
            trial.records.append(record)
            if self.dist.is_main:
                console.print(
                    (f"seed {c.seed}  " if self.T > 1 else "")
                    + f"epoch {epoch + 1:>3}/{c.epochs}  train loss {record['train_loss']:.3f} acc {record['train_acc']:.2%}  "
                    f"test loss {test_losses[t]:.3f} acc {test_accs[t]:.2%}  lr {self.lr:g}"
                    + (f"  H {record['threshold']:.3g} moved {state.moved}" if record["threshold"] is not None else "")
                    + f"  {self.T * record['images_per_s']:,.0f} img/s" + (" (all trials)" if self.T > 1 else ""),
                    highlight=False)
            state.seconds += state.epoch_seconds
            is_best = test_accs[t] > state.best_test_acc
            if is_best:
                state.best_test_acc, state.best_epoch = test_accs[t], epoch
            state.epoch, state.step_in_epoch = epoch + 1, 0
            if is_best:
                self.checkpoint(t, "best.pt")
            if state.epoch in c.snapshot_epochs:
                self.checkpoint(t, f"epoch{state.epoch}.pt")
            self.checkpoint(t, "last.pt")
            if self.dist.is_main:
                write_metrics(trial.out, trial.records)
        self.last_checkpoint = time.perf_counter()

    def finish(self, t: int) -> dict:
        """Write a trial's final structure and its summary.json (which marks the run finished); block
        mode also exports the final weights as a plain dense state_dict (final_dense.pt)."""
        trial, sparsity = self.trials[t], self.engine.dprs[t]
        c, out, metrics = trial.config, trial.out, trial.records
        if sparsity is not None:
            save_tensors(sparsity.structure.state_dict(), out / "final_masks.pt")
        if c.granularity == "block":
            save_tensors(dense_state_dict(self.engine.model), out / "final_dense.pt")
        summary = {
            "mode": c.mode, "granularity": c.granularity, "sparsity": c.sparsity if sparsity is not None else 0.0,
            "seed": c.seed, "depth": c.depth, "width": c.width, "epochs": c.epochs,
            "dpr_stop_epoch": c.dpr_stop_epoch if c.mode == "dpr" else None,
            "final_test_acc": metrics[-1]["test_acc"], "best_test_acc": max(m["test_acc"] for m in metrics),
            "final_train_loss": metrics[-1]["train_loss"],
            "nonzero_sparse_weights": sum(sparsity.nonzero_counts()) if sparsity is not None else None,
            # DPR's amount of reallocation, in units (weights, or blocks in block mode)
            "active_units": int(sparsity.structure.flat_mask().sum()) if sparsity is not None else None,
            "reallocations": sum(m["reallocations"] for m in metrics), "units_moved": sum(m["weights_moved"] for m in metrics),
            "train_seconds": sum(m["seconds"] for m in metrics),
            "wall_seconds_this_process": time.perf_counter() - self.started,
            "data": self.engine.data.description, "run_dir": str(out),
        }
        write_summary(out, summary)
        return summary


def print_summaries(summaries: list[dict]) -> None:
    """One table for the trials of a process: a row per summary field, a column per trial."""
    table = Table(title="run summary" if len(summaries) == 1 else f"run summaries ({len(summaries)} trials)")
    table.add_column("setting")
    for summary in summaries:
        table.add_column("value" if len(summaries) == 1 else f"seed {summary['seed']}", justify="right")
    for key in summaries[0]:
        table.add_row(key, *(escape(f"{s[key]:.4f}" if isinstance(s[key], float) else s[key]) for s in summaries))
    console.print(table)
