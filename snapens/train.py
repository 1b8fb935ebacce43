"""Train with a cyclic schedule and keep a snapshot at every cycle end: `python -m snapens.train [overrides]`.

SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) restarts the learning rate; each cycle ends at the schedule's
minimum, where the model is a good and diverse ensemble member (Huang et al. 2017, arXiv 1704.00109). At the end,
each snapshot is read back from its file and evaluated once, and the snapshots' averaged logits are compared with
the last snapshot alone.

Reading order: `train` (setup, resume, the loop, the report), then `loop`, then the helpers each step calls.
"""

import bisect
import dataclasses
import json
import logging
import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from snapens import adaptive, cli, distributed, swa
from snapens.batches import epoch_order, train_batches
from snapens.build import Setup, make_deterministic, pick_device, setup, snapshot_metadata
from snapens.checkpoint import (checkpoint_path, keep_metrics_until, resume_state, rng_state, run_dir_lock,
                                save_checkpoint, save_config, set_rng_state, stop_requests)
from snapens.config import check_config, register_configs
from snapens.data import split_digest
from snapens.ensemble import predict_logits
from snapens.ensemble.report import evaluate_run, format_run
from snapens.errors import Interrupted, SnapensError
from snapens.files import write_atomic
from snapens.precision import describe
from snapens.run_plots import plot_lr_schedule, plot_training
from snapens.snapshots import list_snapshots, prune_snapshots, save_snapshot, snapshot_path
from snapens.step import (StepResult, nonfinite_tensors, note_first_nonfinite, seconds_since, set_hyperparameters,
                          train_step)
from snapens.tensorboard_log import IntervalStats, log_interval, log_report, open_writer, require_tensorboard

register_configs()
log = logging.getLogger(__name__)


EXIT_INTERRUPTED = cli.EXIT_INTERRUPTED


@dataclass
class Progress:
    """Where the loop stands; saved in every checkpoint (as a dict)."""

    step: int = 0  # updates done: the next update's index t
    epoch: int = 0  # epochs done
    position: int = 0  # batches of the current epoch done
    order: torch.Tensor | None = None  # the current epoch's permutation; None between epochs
    loss_sum: float = 0.0  # the current epoch's summed training loss, correct predictions and images
    correct: int = 0
    seen: int = 0
    updates: int = 0  # the current epoch's applied updates, the sum of their gradient norms and how many were clipped
    grad_norm_sum: float = 0.0
    clipped: int = 0
    skipped: int = 0  # updates dropped by trainer.on_nonfinite=skip, in all and in a row
    skipped_in_row: int = 0
    seconds: float = 0.0  # training time so far
    compile_seconds: float = 0.0  # the first step's time under torch.compile


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
    metadata: dict  # what every snapshot carries besides its cycle, step, epoch and lr
    data_digests: dict[str, str]  # SHA-256 of each split's images and labels: a resumed run must see the same
    resumed: bool = False


def train(cfg: DictConfig, run_dir: str | Path) -> float | None:
    """Train as `cfg` says, write snapshots, metrics.jsonl and results.json to `run_dir`; return ensemble accuracy
    (None on the ranks other than 0 under torchrun, which write nothing).

    A run dir that holds a checkpoint is continued from it (bit-identical on CPU to a run never stopped).
    """
    check_config(cfg)
    if cfg.logger.name == "tensorboard":
        require_tensorboard()
    run_dir = Path(run_dir)
    make_deterministic(cfg.trainer.deterministic)  # before torchrun's process group starts CUDA
    ranks = distributed.start(pick_device(cfg.trainer.device).type)
    try:  # a stop signal from here on, even during setup, ends the run with a checkpoint (Interrupted)
        with stop_requests() as stops, run_dir_lock(run_dir) if ranks.main else nullcontext():
            saved = resume_state(cfg, run_dir, ranks.main)
            distributed.barrier(ranks)  # every rank has read the run dir before rank 0 writes into it
            if saved is not None and (run_dir / "results.json").exists():
                log.info(f"run dir {run_dir} holds a finished run; nothing to do (results.json has its numbers)")
                if ranks.main and any(not (run_dir / name).exists() or not (run_dir / name).stat().st_size
                                      for name in ("lr_schedule.png", "training.png")):
                    # A plot lost: drawn again, in this process alone, which restores no CUDA random stream
                    # (a torchrun run saved one per process).
                    redraw = {**saved, "rng": {**saved["rng"], "cuda": []}}
                    plot_training_of(begin(cfg, run_dir, distributed.Ranks(), redraw))
                return returned_accuracy(json.loads((run_dir / "results.json").read_text()))
            run = begin(cfg, run_dir, ranks, saved)
            loop(run, stops)
            return report(run)  # a signal now waits for results.json rather than losing it
    finally:
        distributed.stop(ranks)


def begin(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks, saved: dict | None) -> Run:
    """Build the run and start it afresh (config and a step-0 checkpoint written) or continue the saved one."""
    s = setup(cfg, ranks)
    every = round(cfg.trainer.snapshot_every * s.steps_per_epoch)
    if cfg.trainer.snapshot_every and not every:
        raise SnapensError(f"trainer.snapshot_every={cfg.trainer.snapshot_every} epochs is shorter than one step "
                           f"({s.steps_per_epoch} steps per epoch); give at least {1 / s.steps_per_epoch:.3g}")
    state = None
    if cfg.scheduler.name == "adaptive_sgdr":
        state = adaptive.AdaptiveState(list(adaptive.cycle_lengths(s.schedule)))
    splits = {"train": s.data.train, "val": s.data.val, "test": s.data.test}
    digests = {name: split_digest(split) for name, split in splits.items() if split is not None}
    run = Run(cfg, run_dir, ranks, s, Progress(), state, [], snapshot_metadata(cfg, s.data), digests)
    if saved is None:
        if ranks.main:
            save_config(cfg, run_dir)
        save_progress(run)  # step 0: a run killed before its first epoch ends resumes like any other
    else:
        resume(run, saved)
    run.snapshot_steps = snapshot_steps(s.schedule, every, cfg.scheduler.get("cycles"))
    if ranks.main:
        plot_lr_schedule(s.schedule, s.steps_per_epoch, run.snapshot_steps, run_dir / "lr_schedule.png",
                         cfg.scheduler.name)
    log.info(f"{run.metadata['model']} on {cfg.data.name} ({len(s.data.train)} train / {len(s.data.test)} test "
             f"images), {cfg.scheduler.name}: {s.schedule.total_steps} steps, snapshots after steps "
             f"{run.snapshot_steps}, on {s.device} ({describe(s.precision, cfg.trainer.channels_last, s.device)}, "
             f"{torch.get_num_threads()} torch threads"
             f"{', compiled' if cfg.trainer.compile else ''}{f', {ranks.world} processes' if ranks.parallel else ''})")
    return run


def resume(run: Run, saved: dict) -> None:
    """Put the checkpoint's weights, optimizer state, random streams and progress back."""
    s = run.setup
    if saved["device"] != s.device.type:
        raise SnapensError(f"the checkpoint of {run.dir} was written on {saved['device']}; resume it there "
                           f"(trainer.device={saved['device']}): the random streams of one cannot continue on another")
    changed = [name for name in ("train", "val", "test") if saved.get("data", run.data_digests).get(name)
               != run.data_digests.get(name)]  # checkpoints written before the digests were kept: not checked
    if changed:
        raise SnapensError(f"cannot resume {run.dir}: the {' and '.join(changed)} images differ from those it started "
                           "with (files under data.root were replaced, added or removed); put them back, or pass a "
                           "new hydra.run.dir=DIR to train on the data as it is now")
    s.model.load_state_dict(saved["model"])
    s.optimizer.load_state_dict(saved["optimizer"])
    set_rng_state(saved["rng"], s.generator, s.device, run.ranks)
    run.progress, run.resumed = Progress(**saved["progress"]), True
    if s.swa:
        s.swa.load_state_dict(saved["swa"])
    if saved["adaptive"]:  # the cycle lengths this run has actually used so far
        run.adaptive = adaptive.AdaptiveState(**saved["adaptive"])
        s.schedule = adaptive.with_cycle_lengths(s.schedule, tuple(run.adaptive.lengths))
    if run.ranks.main:
        keep_metrics_until(run.dir / "metrics.jsonl", run.progress.epoch)
    log.info(f"resuming {run.dir} at step {run.progress.step} of {s.schedule.total_steps}")


def snapshot_steps(schedule, every: int = 0, count: int | None = None) -> list[int]:
    """Where snapshots are taken: at the cycle ends; or every `every` updates and at the end, or at `count` evenly
    spaced points of a schedule without restarts (scheduler.cycles): the NoCycle baseline of Huang et al. 2017,
    arXiv 1704.00109, section 4. SWA windows and optimizer resets follow them."""
    total, ends = schedule.total_steps, schedule.cycle_ends()
    if every:
        return sorted(set(range(every, total, every)) | {total})
    if count and len(ends) == 1:
        return [k * total // count for k in range(1, count + 1)]
    return ends


# ---- the training loop: one update per batch, lr (and momentum) from the schedule before each ----------------------
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
                    raise Interrupted(f"stopped by {stops[0] if stops else 'a signal to another rank'} after step "
                                      f"{progress.step} with a checkpoint; run the same command again "
                                      f"(hydra.run.dir={run.dir}) to resume")
                if now.epoch_end:
                    break


def epoch_batches(run: Run, monitor: "Monitor"):
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
                         run.cfg.trainer.channels_last)


def after_update(run: Run, monitor: "Monitor", t: int) -> None:
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
        save_snapshot(snapshot_path(run.dir, cycle), s.model, meta)
        if s.swa:
            averaged = swa.finish(s.swa, s.train_split, run.cfg.ensemble.batch_size, s.data.mean, s.data.std,
                                  trainer.channels_last)
            save_snapshot(snapshot_path(run.dir, cycle, swa=True), averaged,
                          {**meta, "swa_start": trainer.swa.start, "swa_updates": s.swa.n_averaged})
        if trainer.keep_snapshots:
            prune_snapshots(run.dir, trainer.keep_snapshots)
    if s.swa:
        s.swa.n_averaged = 0  # the next cycle's average starts afresh
    if trainer.reset_optimizer_on_restart and progress.step < s.schedule.total_steps:
        s.optimizer.state.clear()  # no momentum or Adam moments carried over the restart


def end_epoch(run: Run, monitor: "Monitor", lr: float) -> None:
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


def save_progress(run: Run) -> None:
    """checkpoints/last.ckpt (rank 0; every rank hands over its CUDA random state): everything a resumed run needs
    to continue bit-identically."""
    s = run.setup
    rng = rng_state(s.generator, s.device, run.ranks)
    if not run.ranks.main:
        return
    save_checkpoint(checkpoint_path(run.dir), {
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "rng": rng,
        "progress": dataclasses.asdict(run.progress), "config": OmegaConf.to_container(run.cfg, resolve=True),
        "device": s.device.type, "snapshots": [p.name for p in list_snapshots(run.dir)],
        "swa": s.swa.state_dict() if s.swa else None,
        "adaptive": dataclasses.asdict(run.adaptive) if run.adaptive else None, "data": run.data_digests})


class Monitor(ExitStack):
    """What the loop reports as it goes: the progress bar, metrics.jsonl, TensorBoard, the epoch's running sums
    (kept on the device and read back at checkpoints and log intervals only) and the first non-finite update. As a
    context, it closes (flushes) its files however the loop ends."""

    def __init__(self, run: Run):
        super().__init__()
        self.run, s, main = run, run.setup, run.ranks.main
        self.first_step, self.began = run.progress.step, time.perf_counter()
        self.start = self.began - run.progress.seconds
        self.first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=s.device)  # see note_first_nonfinite
        self.skip = run.cfg.trainer.on_nonfinite == "skip"
        self.metrics = self.enter_context(open(run.dir / "metrics.jsonl", "a") if main else nullcontext())
        self.enter_context(logging_redirect_tqdm())
        purge = run.progress.step if run.resumed else None  # events of steps the resumed run trains again
        self.writer = open_writer(run.dir, purge_step=purge) if main and run.cfg.logger.name == "tensorboard" else None
        self.enter_context(self.writer or nullcontext())
        self.interval = IntervalStats(s.device) if self.writer else None
        self.bar = self.enter_context(tqdm(total=s.schedule.total_steps, initial=run.progress.step, unit="step",
                                           dynamic_ncols=True, disable=None if main else True))

    def start_sums(self) -> None:
        """The epoch's running sums on the device, from where the progress has them."""
        device = self.run.setup.device
        self.loss_sum = torch.tensor(self.run.progress.loss_sum, device=device)
        self.correct = torch.tensor(self.run.progress.correct, device=device)
        self.norm_sum = torch.tensor(self.run.progress.grad_norm_sum, dtype=torch.float64, device=device)
        self.clipped = torch.tensor(self.run.progress.clipped, device=device)

    def read_sums(self) -> None:
        progress = self.run.progress
        progress.loss_sum, progress.correct = self.loss_sum.item(), int(self.correct.item())
        progress.grad_norm_sum, progress.clipped = self.norm_sum.item(), int(self.clipped.item())
        progress.seconds = time.perf_counter() - self.start

    def record(self, t: int, lr: float, result: StepResult, y: torch.Tensor) -> None:
        """Count update t: its loss and hits (under torchrun, this rank's share stands for the whole batch), or
        with on_nonfinite=skip a dropped update."""
        progress, trainer = self.run.progress, self.run.cfg.trainer
        clip = trainer.grad_clip if trainer.clip_mode == "norm" else 0  # clip_mode=value: the norm does not tell
        if not result.applied:
            self.skip_nonfinite(t, lr, result)
        else:
            hits = (result.logits.argmax(1) == y).sum()
            self.loss_sum += result.loss * len(y)
            self.correct += hits
            progress.seen += len(y)
            progress.updates += 1
            self.norm_sum += result.grad_norm  # in place, on the device: no allocation, no read-back
            if clip:
                self.clipped += result.grad_norm > clip
            progress.skipped_in_row = 0
            if not self.skip:
                note_first_nonfinite(self.first_bad, t, result)
            if self.interval:
                self.interval.add(result.loss, hits, len(y), result.grad_norm, clip)
        self.bar.update()

    def skip_nonfinite(self, t: int, lr: float, result: StepResult) -> None:
        """on_nonfinite=skip: count the dropped update; stop after max_skipped in a row."""
        progress, limit = self.run.progress, self.run.cfg.trainer.max_skipped
        progress.skipped += 1
        progress.skipped_in_row += 1
        what = nonfinite(t, lr, result.loss.item(), result.grad_norm.item())
        if progress.skipped_in_row > limit:
            raise SnapensError(f"{what}: {progress.skipped_in_row} non-finite updates in a row (trainer.max_skipped="
                               f"{limit}); stopped, the last checkpoint is intact")
        log.warning(f"{what}: update skipped")

    def stop_if_nonfinite(self, whole_state: bool = False) -> None:
        """Stop at the first non-finite update; with whole_state also when any parameter or buffer is not finite
        (an update with a finite loss and gradient can still drive BatchNorm's running variance to inf)."""
        step, loss, norm = self.first_bad.tolist()
        fix = "start a new hydra.run.dir with a lower scheduler.eta_max"
        if step >= 0:
            raise SnapensError(f"{nonfinite(int(step), self.run.setup.schedule.lr(int(step)), loss, norm)}; "
                               f"stopped, the last checkpoint is intact: {fix}, or resume this one with "
                               "trainer.on_nonfinite=skip")
        bad = nonfinite_tensors(self.run.setup.model) if whole_state else []
        if bad:
            raise SnapensError(f"non-finite values in {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} after "
                               f"step {self.run.progress.step}; stopped, the last checkpoint is intact: {fix}")

    def log_interval(self) -> None:
        self.stop_if_nonfinite()
        progress = self.run.progress
        self.bar.set_postfix(loss=f"{self.loss_sum.item() / progress.seen:.3f}",
                             lr=f"{self.run.setup.optimizer.param_groups[0]['lr']:.4g}",
                             acc=f"{self.correct.item() / progress.seen:.3f}")
        if self.writer:
            log_interval(self.writer, self.interval.read(), progress.step, self.run.setup.optimizer)

    def write_metrics(self, lr: float) -> None:
        """One metrics.jsonl line for the epoch just finished (and the log line that says the same); the snapshot
        steps are those in use (adaptive SGDR moves them)."""
        progress = self.run.progress
        seen = max(progress.seen, 1)
        updates = max(progress.updates, 1)
        record = {"epoch": progress.epoch, "step": progress.step, "lr": lr, "train_loss": progress.loss_sum / seen,
                  "train_acc": progress.correct / seen, "grad_norm": progress.grad_norm_sum / updates,
                  "clip_rate": progress.clipped / updates if self.run.cfg.trainer.clip_mode == "norm"
                  and self.run.cfg.trainer.grad_clip else None,  # None: not clipping, or by value
                  "seconds": progress.seconds, "skipped": progress.skipped,
                  "cycle_ends": self.run.snapshot_steps}
        self.metrics.write(json.dumps(record) + "\n")
        self.metrics.flush()
        clipped = "" if record["clip_rate"] is None else f" ({record['clip_rate']:.0%} clipped)"
        log.info("epoch {epoch} step {step} lr {lr:.4g} loss {train_loss:.4f} acc {train_acc:.4f} grad norm "
                 "{grad_norm:.3g}{clipped} {seconds:.1f}s".format(**record, clipped=clipped))
        if (record["clip_rate"] or 0) > 0.5:  # clipping meant as a safety net has become the optimizer (normalised SGD)
            log.warning(f"{record['clip_rate']:.0%} of epoch {progress.epoch}'s updates were clipped at "
                        f"trainer.grad_clip={self.run.cfg.trainer.grad_clip} (mean gradient norm "
                        f"{record['grad_norm']:.3g}): most updates were rescaled, not just outliers; raise "
                        "trainer.grad_clip above the typical norm, or 0 to disable")


def nonfinite(step: int, lr: float, loss: float, norm: float) -> str:
    return f"non-finite loss or gradient at step {step} (lr {lr:.4g}, loss {loss:.4g}, gradient norm {norm:.4g})"


# ---- the report -----------------------------------------------------------------------------------------------------
def report(run: Run) -> float | None:
    """Evaluate every snapshot from its file, write results.json (with `training`: its steps, seconds and
    precision) and the plots; return the ensemble's accuracy."""
    s, progress, trainer = run.setup, run.progress, run.cfg.trainer
    training = {"steps": progress.step, "seconds": progress.seconds, "compile_seconds": progress.compile_seconds,
                "device": str(s.device), "precision": describe(s.precision, trainer.channels_last, s.device),
                "compiled": trainer.compile, "processes": run.ranks.world, "threads": torch.get_num_threads(),
                "rank_weights_sha256": distributed.gather_digests(s.model, run.ranks)}
    if trainer.compile:  # a recompile (a new input shape, say) would show here as more than one graph
        training["compiled_graphs"] = compiled_graphs()
        log.info(f"torch.compile made {training['compiled_graphs']} graph(s) in this process")
    if s.device.type == "cuda":
        training["peak_memory_gib"] = torch.cuda.max_memory_allocated(s.device) / 2**30
    if not run.ranks.main:
        return None
    result = {**evaluate_run(run.dir, s.data.test, s.data.val, run.cfg.ensemble.rule, run.cfg.ensemble.batch_size,
                             s.device, lambda *_: s.model, s.precision, trainer.channels_last), "training": training}
    write_atomic(run.dir / "results.json", (json.dumps(result, indent=2) + "\n").encode())
    plot_lr_schedule(s.schedule, s.steps_per_epoch, run.snapshot_steps, run.dir / "lr_schedule.png",
                     run.cfg.scheduler.name)  # final
    plot_training_of(run)
    if run.cfg.logger.name == "tensorboard":
        with open_writer(run.dir) as writer:
            log_report(writer, result)
    log.info(format_run(result))
    return returned_accuracy(result)


def compiled_graphs() -> int:
    """The graphs TorchDynamo has compiled in this process (its own count)."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"])


def returned_accuracy(result: dict) -> float:
    """What a job returns to Hydra's sweeper: the ensemble's validation accuracy when there is a validation split,
    else its test accuracy (which `main` refuses to hand to a sweeper that optimises it)."""
    split = "val" if "val" in result else "test"
    accuracy = (result["val"] if split == "val" else result)["ensemble"]["acc"]
    log.info(f"returned to Hydra: the ensemble's {split} accuracy, {accuracy:.4f}")
    return accuracy


def plot_training_of(run: Run) -> None:
    """training.png from metrics.jsonl (and results.json's snapshot scores once it exists), snapshots marked."""
    metrics = [json.loads(line) for line in (run.dir / "metrics.jsonl").read_text().splitlines()]
    results_path = run.dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    plot_training(metrics, [e / run.setup.steps_per_epoch for e in run.snapshot_steps], run.dir / "training.png",
                  results)


def refuse_tuning_on_test(cfg: DictConfig) -> None:
    """A sweeper that optimises what the jobs return (Optuna, Ax, Nevergrad: any but Hydra's basic one) must get a
    validation number: a result tuned on the test set is no test result."""
    sweeper = HydraConfig.get().sweeper.get("_target_", "")
    if HydraConfig.get().mode == RunMode.MULTIRUN and not sweeper.endswith("BasicSweeper") and not cfg.data.val_size:
        raise SnapensError(f"{sweeper.rsplit('.', 1)[-1]} optimises what each job returns, which without a validation "
                           "split is the test accuracy: tuning on the test set; hold out images with data.val_size=N "
                           "(the jobs then return the validation ensemble accuracy)")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    run_dir = HydraConfig.get().runtime.output_dir

    def job() -> float:
        refuse_tuning_on_test(cfg)
        log.info(f"run dir {run_dir}")
        accuracy = train(cfg, run_dir)
        log.info(f"run dir {run_dir}: results.json, snapshots/, metrics.jsonl, training.png, lr_schedule.png")
        return accuracy

    return cli.run_job(job)


if __name__ == "__main__":
    cli.run(main)
