"""What the training loop reports as it goes: the progress bar, metrics.jsonl (one line per epoch), TensorBoard, the
epoch's running sums (kept on the device and read back only at checkpoints and log intervals) and the first
non-finite update, which stops the run before any file holds a NaN or inf (or, with trainer.on_nonfinite=skip, is
dropped and counted)."""

import json
import logging
import time
from contextlib import ExitStack, nullcontext
from typing import TYPE_CHECKING

import torch
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from snapens import distributed
from snapens.errors import SnapensError
from snapens.precision import compiled_graphs, describe
from snapens.step import StepResult, nonfinite_tensors, note_first_nonfinite
from snapens.tensorboard_log import IntervalStats, log_interval, open_writer

if TYPE_CHECKING:
    from snapens.training import Run

log = logging.getLogger("snapens.train")  # its lines belong to the training log


class Monitor(ExitStack):
    """The loop's reports, as the module's docstring lists them; as a context, it closes (flushes) its files however
    the loop ends."""

    def __init__(self, run: "Run"):
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


def training_record(run: "Run") -> dict:
    """results.json's `training`: its steps, seconds, device, precision, compilation, processes, threads, each
    rank's weight digest and (on CUDA) peak memory. Every rank calls it (the digests are gathered)."""
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
    return training
