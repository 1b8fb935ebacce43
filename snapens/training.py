"""The training run behind `python -m snapens.train`: a cyclic schedule and a snapshot at every cycle end.

SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) restarts the learning rate; each cycle ends at the schedule's
minimum, where the model is a good and diverse ensemble member (Huang et al. 2017, arXiv 1704.00109); at the end
every snapshot is read back from its file and the ensemble is reported (snapens.ensemble.report). Reading order:
`train` (setup, resume, the loop, the report), then `loop`, then the helpers each step calls.
"""

import bisect
import json
import logging
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import torch.nn.functional as F
from omegaconf import DictConfig

from snapens import adaptive, cli, distributed, schedules, swa
from snapens.batches import epoch_order, train_batches
from snapens.build import Loss, Setup, make_deterministic, pick_device, recipe, setup, snapshot_metadata
from snapens.checkpoint import Progress, resume_state, restore, run_dir_lock, save_config, save_progress, stop_requests
from snapens.config import check_config
from snapens.data import split_digest
from snapens.ensemble.cache import predict_logits
from snapens.ensemble.report import evaluate_run, format_run
from snapens.errors import Interrupted
from snapens.files import write_atomic
from snapens.monitor import Monitor, training_record
from snapens.plan import log_plan, log_start, snapshot_every
from snapens.run_plots import plot_lr_schedule, plot_training_of
from snapens.snapshots import prune_snapshots, save_snapshot, snapshot_path, snapshot_steps
from snapens.step import seconds_since, set_hyperparameters, train_step
from snapens.tensorboard_log import log_report, open_writer, require_tensorboard

log = logging.getLogger("snapens.train")  # the command's name, as train.py's own lines have it


@dataclass
class Run:
    """One training run: its config, dir and processes, what setup() built, and what changes as it goes."""

    cfg: DictConfig
    dir: Path
    ranks: distributed.Ranks
    setup: Setup
    progress: Progress
    adaptive: adaptive.AdaptiveState | None
    snapshot_steps: list[int]  # the updates after which a snapshot is taken (adaptive SGDR moves them)
    recipe: dict  # the config's values and the loss's record (build.recipe): what a resume must match
    metadata: dict  # what every snapshot carries besides its cycle, step, epoch and lr
    data_digests: dict[str, str]  # SHA-256 of each split's images and labels: a resumed run must see the same
    resumed: bool = False


def train(cfg: DictConfig, run_dir: str | Path, loss: Loss | None = None) -> float | None:
    """Train as `cfg` says, write snapshots, metrics.jsonl and results.json to `run_dir`; return ensemble accuracy
    (None on the ranks other than 0 under torchrun, which write nothing). `loss`: see `build.Loss`.

    A run dir that holds a checkpoint is continued from it (bit-identical on CPU to a run never stopped).
    """
    check_config(cfg)
    if cfg.trainer.plan_only:  # the plan alone: nothing trained, nothing written
        s = setup(cfg)
        log_plan(s, snapshot_steps(s.schedule, snapshot_every(cfg, s), cfg.scheduler.get("cycles")))
        return None
    if cfg.logger.name == "tensorboard":
        require_tensorboard()
    run_dir = Path(run_dir)
    make_deterministic(cfg.trainer.deterministic)  # before torchrun's process group starts CUDA
    ranks = distributed.start(pick_device(cfg.trainer.device).type)
    try:  # a stop signal from here on, even during setup, ends the run with a checkpoint (Interrupted)
        with stop_requests() as stops, run_dir_lock(run_dir) if ranks.main else nullcontext():
            saved = resume_state(cfg, recipe(cfg, loss), run_dir, ranks.main)
            distributed.barrier(ranks)  # every rank has read the run dir before rank 0 writes into it
            if saved is not None and (run_dir / "results.json").exists():
                log.info(f"run dir {run_dir} holds a finished run; nothing to do (results.json has its numbers)")
                if ranks.main and any(not (run_dir / name).exists() or not (run_dir / name).stat().st_size
                                      for name in ("lr_schedule.png", "training.png")):
                    # A plot lost: drawn again, in this process alone, which restores no CUDA random stream
                    # (a torchrun run saved one per process).
                    redraw = {**saved, "rng": {**saved["rng"], "cuda": []}}
                    again = begin(cfg, run_dir, distributed.Ranks(), redraw)
                    plot_training_of(run_dir, again.snapshot_steps, again.setup.steps_per_epoch)
                return cli.returned_accuracy(json.loads((run_dir / "results.json").read_text()))
            run = begin(cfg, run_dir, ranks, saved, loss)
            loop(run, stops)
            return report(run)  # a signal now waits for results.json rather than losing it
    finally:
        distributed.stop(ranks)


def begin(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks, saved: dict | None,
          loss: Loss | None = None) -> Run:
    """Build the run and start it afresh (config and a step-0 checkpoint written) or continue the saved one."""
    s = setup(cfg, ranks, loss)
    every = snapshot_every(cfg, s)
    state = None
    if schedules.SCHEDULES[cfg.scheduler.name].adapts_to_validation:  # adaptive SGDR's decisions, checkpointed
        state = adaptive.AdaptiveState(list(adaptive.cycle_lengths(s.schedule)))
    splits = {"train": s.data.train, "val": s.data.val, "test": s.data.test}
    digests = {name: split_digest(split) for name, split in splits.items() if split is not None}
    run = Run(cfg, run_dir, ranks, s, Progress(), state, [], recipe(cfg, loss), snapshot_metadata(cfg, s.data, loss),
              digests)
    if saved is None:
        if ranks.main:
            save_config(cfg, run_dir)
        save_progress(run)  # step 0: a run killed before its first epoch ends resumes like any other
    else:
        restore(run, saved)
    run.snapshot_steps = snapshot_steps(s.schedule, every, cfg.scheduler.get("cycles"))
    if ranks.main:
        plot_lr_schedule(s.schedule, s.steps_per_epoch, run.snapshot_steps, run_dir / "lr_schedule.png",
                         cfg.scheduler.name)
    if ranks.main and not run.resumed:
        log_plan(s, run.snapshot_steps)
    log_start(run)
    return run


def loop(run: Run, stops: list[str]) -> None:
    s, progress = run.setup, run.progress
    with Monitor(run) as monitor:
        while progress.step < s.schedule.total_steps:
            for x, y in epoch_batches(run, monitor):
                t = progress.step
                lr = s.schedule.lr(t)
                set_hyperparameters(s.optimizer, lr, s.schedule.momentum(t))
                x, y = distributed.share(x, y, run.ranks)
                result = train_step(s.forward, s.optimizer, x, y, s.step_options)
                monitor.record(t, lr, result, y)
                progress.step, progress.position = t + 1, progress.position + 1
                after_update(run, monitor, t)
                now = Moments.after(run, stops)
                if now.log:
                    monitor.log_interval()
                if now.checkpoint:
                    monitor.stop_if_nonfinite(whole_state=True)  # before anything is written: the last checkpoint
                    # stays intact, and no file ever holds a NaN or inf
                if now.cycle_end:
                    end_cycle(run, lr)
                if now.checkpoint:
                    monitor.read_sums()  # the sums come back from the device only here
                if now.epoch_end:
                    end_epoch(run, monitor, lr)
                if now.checkpoint:
                    save_progress(run)
                if now.stop:
                    distributed.barrier(run.ranks)  # rank 0's checkpoint is whole before any rank exits: a launcher
                    # that ends the job at the first rank's exit loses nothing
                    raise Interrupted(f"stopped by {stops[0] if stops else 'a signal to another rank'} after step "
                                      f"{progress.step} with a checkpoint; run the same command again "
                                      f"(hydra.run.dir={run.dir}) to resume", stops[0] if stops else None)
                if now.epoch_end:
                    break


def epoch_batches(run: Run, monitor: Monitor):
    """The rest of the current epoch's batches (all of a new epoch's, whose permutation is drawn first)."""
    s, progress = run.setup, run.progress
    if progress.order is None:
        progress.order = epoch_order(len(s.train_split), s.generator).cpu()
        progress.position, progress.loss_sum, progress.correct, progress.seen = 0, 0.0, 0, 0
        progress.updates, progress.grad_norm_sum, progress.clipped = 0, 0.0, 0
    monitor.start_sums()
    rest = progress.order[progress.position * s.update_size:s.steps_per_epoch * s.update_size].to(s.device)  # a
    # compiled run's epoch leaves out the last partial batch (snapens.build.setup)
    return train_batches(s.train_split, s.update_size, s.generator, s.augmentation, s.data.mean, s.data.std, rest,
                         run.cfg.trainer.channels_last, share=(run.ranks.rank, run.ranks.world))


def after_update(run: Run, monitor: Monitor, t: int) -> None:
    """Fold update t's weights into the cycle's SWA average when in its window; time the compile step."""
    s, trainer = run.setup, run.cfg.trainer
    if s.swa and swa.in_window(t, run.snapshot_steps, trainer.swa.start):
        s.swa.update_parameters(s.model)
    if trainer.compile and t == monitor.first_step:
        run.progress.compile_seconds = seconds_since(monitor.began, s.device)
        log.info(f"first step, with torch.compile, took {run.progress.compile_seconds:.1f}s")


@dataclass(frozen=True)
class Moments:
    """What the moment after an update is: a log interval, an epoch's end, a stop, a cycle end, a checkpoint."""

    log: bool
    epoch_end: bool
    stop: bool
    cycle_end: bool
    checkpoint: bool

    @classmethod
    def after(cls, run: Run, stops: list[str]) -> "Moments":
        s, progress, trainer, ranks = run.setup, run.progress, run.cfg.trainer, run.ranks
        log_now = progress.step % trainer.log_every == 0
        epoch_end = progress.position >= s.steps_per_epoch or progress.step == s.schedule.total_steps
        # A signal may reach torchrun's ranks at different steps: they agree at log intervals and epoch ends.
        stop = distributed.any_rank(bool(stops), ranks, s.device) \
            if not ranks.parallel or log_now or epoch_end else False
        cycle_end = progress.step in run.snapshot_steps
        every = trainer.checkpoint_every
        checkpoint = epoch_end or cycle_end or stop or bool(every and progress.step % every == 0)
        return cls(log_now and progress.seen > 0, epoch_end, stop, cycle_end, checkpoint)


def end_cycle(run: Run, lr: float) -> None:
    """The cycle whose last update was just made is over: its snapshot (rank 0), and the restart's resets."""
    s, progress, trainer = run.setup, run.progress, run.cfg.trainer
    if run.ranks.main:  # the snapshot, the cycle's SWA average beside it, the pruning of old ones
        cycle = bisect.bisect_left(run.snapshot_steps, progress.step) + 1  # files count cycles from 1
        meta = {**run.metadata, "cycle": cycle, "step": progress.step, "epoch": progress.step / s.steps_per_epoch,
                "lr": lr}
        save_snapshot(snapshot_path(run.dir, cycle), s.model, meta, record=True)
        if s.swa:
            averaged = swa.finish(s.swa, s.train_split, run.cfg.ensemble.batch_size, s.data.mean, s.data.std,
                                  trainer.channels_last)
            save_snapshot(snapshot_path(run.dir, cycle, swa=True), averaged,
                          {**meta, "swa_start": trainer.swa.start, "swa_updates": s.swa.n_averaged}, record=True)
        if trainer.keep_snapshots:
            prune_snapshots(run.dir, trainer.keep_snapshots)
    if s.swa:
        s.swa.n_averaged = 0  # the next cycle's average starts afresh
    if trainer.reset_optimizer_on_restart and progress.step < s.schedule.total_steps:
        s.optimizer.state.clear()  # no momentum or Adam moments carried over the restart


def end_epoch(run: Run, monitor: Monitor, lr: float) -> None:
    """Adaptive SGDR's decision, the epoch's metrics line, and a new permutation next time."""
    s, progress = run.setup, run.progress
    progress.epoch += 1
    if run.adaptive and progress.step < s.schedule.total_steps:
        extended = adaptive.adapt_cycles(run.adaptive, s.schedule, validation_loss(run), progress.step,
                                         run.cfg.scheduler.patience, run.cfg.scheduler.extension_factor)
        if extended:
            s.schedule = extended
            run.snapshot_steps = s.schedule.cycle_ends()
            if s.swa:
                s.swa.n_averaged = 0  # the extended cycle's window starts later: average afresh
    if run.ranks.main:
        monitor.write_metrics(lr)
    progress.order = None


def validation_loss(run: Run) -> float:
    """The mean validation cross-entropy adaptive SGDR decides on (the model is left in training mode). Under
    torchrun every rank evaluates rank 0's model and takes rank 0's loss, so all decide alike."""
    s = run.setup
    distributed.sync_buffers(s.model, run.ranks)
    logits = predict_logits(s.model, s.data.val, s.data.mean, s.data.std, run.cfg.ensemble.batch_size, s.device,
                            s.precision, run.cfg.trainer.channels_last)
    s.model.train()
    return distributed.from_rank0(F.cross_entropy(logits, s.data.val.labels).item(), run.ranks, s.device)


def report(run: Run) -> float | None:
    """Evaluate every snapshot from its file, write results.json (with `training`: its steps, seconds and
    precision) and the plots; return the ensemble's accuracy."""
    s, trainer = run.setup, run.cfg.trainer
    training = training_record(run)
    if not run.ranks.main:
        return None
    result = {**evaluate_run(run.dir, s.data.test, s.data.val, run.cfg.ensemble.rule, run.cfg.ensemble.batch_size,
                             s.device, lambda *_: s.model, s.precision, trainer.channels_last,
                             restarts=len(s.schedule.cycle_ends()) > 1), "training": training}
    write_atomic(run.dir / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_lr_schedule(s.schedule, s.steps_per_epoch, run.snapshot_steps, run.dir / "lr_schedule.png",
                     run.cfg.scheduler.name)  # final
    plot_training_of(run.dir, run.snapshot_steps, s.steps_per_epoch)
    if run.cfg.logger.name == "tensorboard":
        with open_writer(run.dir) as writer:
            log_report(writer, result)
    log.info(format_run(result))
    return cli.returned_accuracy(result)
