"""Train with a cyclic schedule and keep a snapshot at every cycle end: `python -m snapens.train [overrides]`.

SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) restarts the learning rate; each cycle ends at the schedule's
minimum, where the model is a good and diverse ensemble member (Huang et al. 2017, arXiv 1704.00109). At the end,
each snapshot is read back from its file and evaluated once, and the snapshots' averaged logits are compared with
the last snapshot alone.
"""

import bisect
import json
import logging
import math
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from torch.optim.swa_utils import AveragedModel
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from snapens import distributed
from snapens.build import (build_augmentation, build_data, build_model, build_optimizer, build_schedule,
                           model_name, pick_device, pick_precision)
from snapens.checkpoint import checkpoint_path, rng_state, save_checkpoint, set_rng_state, stop_requests
from snapens.config import check_config, register_configs
from snapens.data import epoch_order, train_batches
from snapens.ensemble import format_report
from snapens.errors import SnapensError, exit_with
from snapens.precision import describe, layout
from snapens.restarts import new_adaptive_state, should_extend, swa_first_update, validation_loss
from snapens.run_plots import plot_lr_schedule, plot_training
from snapens.run_dir import (config_hash, end_cycle, evaluate_snapshots, keep_metrics_until, read_metrics,
                             resume_state, save_config, write_metrics)
from snapens.schedules import extend_cycle, with_cycle_lengths
from snapens.snapshots import list_snapshots
from snapens.step import note_first_nonfinite, seconds_since, set_hyperparameters, train_step
from snapens.tensorboard_log import IntervalStats, log_interval, log_report, open_writer

register_configs()
log = logging.getLogger(__name__)


class Interrupted(Exception):
    """A stop signal arrived; the checkpoint is written and the same command resumes."""


EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): try again later, e.g. requeue the job


def new_progress() -> dict:
    """Where the loop stands; saved in every checkpoint. `order` is the current epoch's permutation, `position`
    the number of its batches done, the sums the epoch's running training loss and accuracy."""
    return {"step": 0, "epoch": 0, "position": 0, "order": None, "loss_sum": 0.0, "correct": 0, "seen": 0,
            "skipped": 0, "skipped_in_row": 0, "seconds": 0.0, "compile_seconds": 0.0}


def train(cfg: DictConfig, run_dir: str | Path) -> float | None:
    """Train as `cfg` says, write snapshots, metrics.jsonl and results.json to `run_dir`; return ensemble accuracy
    (None on the ranks other than 0 under torchrun, which write nothing).

    A run dir that holds a checkpoint is continued from it (bit-identical on CPU to a run never stopped).
    """
    check_config(cfg)
    ranks = distributed.start(pick_device(cfg.trainer.device).type)
    try:
        return run(cfg, Path(run_dir), ranks)
    finally:
        distributed.stop(ranks)


def run(cfg: DictConfig, run_dir: Path, ranks: distributed.Ranks) -> float | None:
    state = resume_state(cfg, run_dir)
    distributed.barrier(ranks)  # every rank has read the run dir before rank 0 writes into it
    if state is not None and (run_dir / "results.json").exists():
        log.info(f"run dir {run_dir} holds a finished run; nothing to do (results.json has its numbers)")
        return json.loads((run_dir / "results.json").read_text())["ensemble"]["acc"]
    t, main = cfg.trainer, ranks.main
    device = distributed.device_for(pick_device(t.device), ranks)
    precision = pick_precision(t.precision, device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # per job in a multirun sweep

    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device, memory_format=layout(t.channels_last))  # before the data: a bad
    # model config fails in a second. DDP and the compiled module share the model's parameters; snapshots save it.
    # The SWA copy is taken first, so it keeps plain BatchNorm: rank 0 alone recomputes its statistics.
    swa = AveragedModel(model) if t.swa.start is not None else None
    forward = distributed.wrap(model, ranks, device, t.sync_bn)
    forward = torch.compile(forward) if t.compile else forward
    data = build_data(cfg.data)
    update_size = t.batch_size * t.accumulate  # images per update, all ranks together
    steps_per_epoch = math.ceil(len(data.train) / update_size)
    schedule = build_schedule(cfg.scheduler, t.epochs, steps_per_epoch)
    adaptive = new_adaptive_state(getattr(schedule, "inner", schedule).lengths) \
        if cfg.scheduler.name == "adaptive_sgdr" else None
    optimizer = build_optimizer(model, cfg.optimizer, schedule.lr(0))
    augmentation = build_augmentation(cfg.data)
    train_split = data.train.to(device)
    generator = torch.Generator(device).manual_seed(t.seed)
    progress = new_progress()

    def save_progress() -> None:
        if main:
            save_checkpoint(checkpoint_path(run_dir), {
                "model": model.state_dict(), "optimizer": optimizer.state_dict(), "rng": rng_state(generator),
                "progress": dict(progress), "config": OmegaConf.to_container(cfg, resolve=True),
                "device": device.type, "snapshots": [p.name for p in list_snapshots(run_dir)],
                "swa": swa.state_dict() if swa else None, "adaptive": adaptive})

    if state is None:
        if main:
            save_config(cfg, run_dir)
        save_progress()  # step 0: a run killed before its first epoch ends resumes like any other
    elif state["device"] != device.type:
        raise SnapensError(f"the checkpoint of {run_dir} was written on {state['device']}; resume it there "
                           f"(trainer.device={state['device']}): the random streams of one cannot continue on another")
    else:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        set_rng_state(state["rng"], generator)
        progress, adaptive = state["progress"], state["adaptive"]
        if swa:
            swa.load_state_dict(state["swa"])
        if adaptive:  # the cycle lengths this run has actually used so far
            schedule = with_cycle_lengths(schedule, tuple(adaptive["lengths"]))
        if main:
            keep_metrics_until(run_dir / "metrics.jsonl", progress["epoch"])
        log.info(f"resuming {run_dir} at step {progress['step']} of {schedule.total_steps}")
    metadata = {"model": model_name(cfg.model), "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "num_classes": len(data.classes), "classes": data.classes,
                "image_size": list(data.train.images.shape[2:]), "mean": list(data.mean), "std": list(data.std),
                "config_hash": config_hash(cfg)}
    every = round(t.snapshot_every * steps_per_epoch)
    cycle_ends = snapshot_steps(schedule, every)
    if main:
        plot_lr_schedule(schedule, steps_per_epoch, cycle_ends, run_dir / "lr_schedule.png")
    log.info(f"{metadata['model']} on {cfg.data.name} ({len(data.train)} train / {len(data.test)} test images), "
             f"{cfg.scheduler.name}: {schedule.total_steps} steps, snapshots after steps {cycle_ends}, on {device} "
             f"({describe(precision, t.channels_last)}{', compiled' if t.compile else ''}"
             f"{f', {ranks.world} processes' if ranks.parallel else ''})")

    # ---- the training loop: one update per batch, lr (and momentum) from the schedule before each ----
    p, start, first_step = progress, time.perf_counter() - progress["seconds"], progress["step"]
    began = time.perf_counter()
    skip = t.on_nonfinite == "skip"
    first_bad = torch.full((3,), -1.0, dtype=torch.float64, device=device)  # see note_first_nonfinite
    tensorboard = main and cfg.logger.name == "tensorboard"
    writer = open_writer(run_dir, purge_step=p["step"] if state else None) if tensorboard else None
    interval = IntervalStats(device) if writer else None

    def stop_if_nonfinite() -> None:  # before anything is written: the last checkpoint stays intact
        step, loss, norm = first_bad.tolist()
        if step >= 0:
            raise SnapensError(f"{nonfinite(int(step), schedule.lr(int(step)), loss, norm)}; stopped, the last "
                               "checkpoint is intact: start a new hydra.run.dir with a lower scheduler.eta_max, or "
                               "resume this one with trainer.on_nonfinite=skip")

    bar = tqdm(total=schedule.total_steps, initial=p["step"], unit="step", dynamic_ncols=True,
               disable=None if main else True)
    with (open(run_dir / "metrics.jsonl", "a") if main else nullcontext()) as metrics, logging_redirect_tqdm(), \
            stop_requests() as stops, writer or nullcontext():  # the writer is closed (flushed) however it ends
        while p["step"] < schedule.total_steps:
            if p["order"] is None:
                p.update(order=epoch_order(len(train_split), generator).cpu(), position=0, loss_sum=0.0, correct=0,
                         seen=0)
            loss_sum = torch.tensor(p["loss_sum"], device=device)  # summed on the device, read at checkpoints
            correct = torch.tensor(p["correct"], device=device)
            rest = p["order"][p["position"] * update_size:].to(device)
            for x, y in train_batches(train_split, update_size, generator, augmentation, data.mean, data.std, rest,
                                      t.channels_last):
                step, lr = p["step"], schedule.lr(p["step"])
                set_hyperparameters(optimizer, lr, schedule.momentum(step))
                x, y = distributed.share(x, y, ranks)
                loss, logits, norm, finite = train_step(forward, optimizer, x, y, t.grad_clip, t.clip_mode,
                                                        precision, skip, t.accumulate, t.label_smoothing)
                if skip and not finite:
                    skip_nonfinite(t, p, step, lr, loss, norm)
                else:  # under torchrun: this rank's share (a random part of every batch) stands for the whole
                    hits = (logits.argmax(1) == y).sum()
                    loss_sum += loss * len(y)
                    correct += hits
                    p["seen"] += len(y)
                    p["skipped_in_row"] = 0
                    if not skip:
                        note_first_nonfinite(first_bad, step, loss, norm, finite)
                    if interval:
                        interval.add(loss, hits, len(y), norm, t.grad_clip)
                p["step"], p["position"] = step + 1, p["position"] + 1
                bar.update()
                cycle = bisect.bisect_right(cycle_ends, step)  # 0-based, of the update just made
                if swa and step >= swa_first_update(([0] + cycle_ends)[cycle], cycle_ends[cycle], t.swa.start):
                    swa.update_parameters(model)
                if t.compile and step == first_step:
                    p["compile_seconds"] = seconds_since(began, device)
                    log.info(f"first step, with torch.compile, took {p['compile_seconds']:.1f}s")
                log_now = p["step"] % t.log_every == 0
                epoch_done = p["position"] * update_size >= len(train_split) or p["step"] == schedule.total_steps
                if log_now and p["seen"]:
                    stop_if_nonfinite()
                    bar.set_postfix(loss=f"{loss_sum.item() / p['seen']:.3f}", lr=f"{lr:.4g}",
                                    acc=f"{correct.item() / p['seen']:.3f}")
                    if writer:
                        log_interval(writer, interval.read(), p["step"], optimizer)
                # A signal may reach torchrun's ranks at different steps: they agree at log intervals and epoch ends.
                stopping = distributed.any_rank(bool(stops), ranks, device) \
                    if not ranks.parallel or log_now or epoch_done else False
                cycle_end = p["step"] in cycle_ends
                checkpoint = epoch_done or cycle_end or stopping or (
                    t.checkpoint_every and p["step"] % t.checkpoint_every == 0)
                if checkpoint:
                    stop_if_nonfinite()
                if cycle_end and main:  # cycle `cycle` (0-based) is over: files count from 1
                    end_cycle(cfg, run_dir, model, swa, train_split, data, {
                        **metadata, "cycle": cycle + 1, "step": p["step"], "epoch": p["step"] / steps_per_epoch,
                        "lr": lr})
                if cycle_end:
                    if swa:
                        swa.n_averaged.zero_()  # the next cycle's average starts afresh
                    if t.reset_optimizer_on_restart and p["step"] < schedule.total_steps:
                        optimizer.state.clear()  # no momentum or Adam moments carried over the restart
                if checkpoint:  # the sums come back from the device only here
                    p.update(loss_sum=loss_sum.item(), correct=int(correct.item()),
                             seconds=time.perf_counter() - start)
                if epoch_done:
                    p["epoch"] += 1
                    if adaptive and p["step"] < schedule.total_steps:
                        schedule, extended = adapt_cycles(cfg, adaptive, schedule, model, data, device, precision,
                                                          p["step"], ranks)
                        cycle_ends = schedule.cycle_ends()
                        if extended and swa:
                            swa.n_averaged.zero_()  # the extended cycle's window starts later: average afresh
                    if main:
                        write_metrics(metrics, p, lr, cycle_ends)
                    p["order"] = None
                if checkpoint:
                    save_progress()
                if stopping:
                    raise Interrupted(f"stopped by {stops[0] if stops else 'a signal to another rank'} after step "
                                      f"{p['step']} with a checkpoint; run the same command again "
                                      f"(hydra.run.dir={run_dir}) to resume")
                if epoch_done:
                    break
    bar.close()

    training = {"steps": p["step"], "seconds": p["seconds"], "compile_seconds": p["compile_seconds"],
                "device": str(device), "precision": describe(precision, t.channels_last), "compiled": t.compile,
                "processes": ranks.world, "rank_weights_sha256": distributed.gather_digests(model, ranks)}
    if device.type == "cuda":
        training["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    if not main:
        return None
    with stop_requests():  # a few seconds more: a signal now waits for results.json rather than losing it
        report = evaluate_snapshots(cfg, run_dir, model, data, device, precision, training)
        plot_lr_schedule(schedule, steps_per_epoch, cycle_ends, run_dir / "lr_schedule.png")  # final cycle lengths
        plot_training(read_metrics(run_dir), [e / steps_per_epoch for e in cycle_ends], run_dir / "training.png")
        if tensorboard:
            with open_writer(run_dir) as end_writer:
                log_report(end_writer, report)
    log.info("\n" + format_report(report))
    return report["ensemble"]["acc"]


def snapshot_steps(schedule, every: int) -> list[int]:
    """Where snapshots are taken: at the cycle ends, or every `every` updates and at the end (the NoCycle
    baseline of Huang et al. 2017, arXiv 1704.00109, section 4). SWA windows and optimizer resets follow them."""
    if not every:
        return schedule.cycle_ends()
    return sorted(set(range(every, schedule.total_steps, every)) | {schedule.total_steps})


def adapt_cycles(cfg: DictConfig, adaptive: dict, schedule, model, data, device, precision, step: int,
                 ranks: distributed.Ranks):
    """Adaptive SGDR at an epoch end (`step` updates done): evaluate the validation loss and, when it has stalled
    within the current cycle, lengthen that cycle, if it is still in progress. Returns the schedule and whether it
    changed. Under torchrun every rank evaluates rank 0's model and takes rank 0's loss, so all decide alike."""
    distributed.sync_buffers(model, ranks)
    loss = validation_loss(model, data.val, data.mean, data.std, cfg.ensemble.batch_size, device, precision,
                           cfg.trainer.channels_last)
    loss = distributed.from_rank0(loss, ranks, device)
    ends = schedule.cycle_ends()
    cycle = bisect.bisect_right(ends, step - 1)  # the cycle of the last update
    if not should_extend(adaptive, loss, cycle, cfg.scheduler.patience, in_progress=step not in ends):
        return schedule, False
    lengths = extend_cycle(tuple(adaptive["lengths"]), cycle, cfg.scheduler.extension_factor)
    adaptive["lengths"] = list(lengths)
    schedule = with_cycle_lengths(schedule, lengths)
    log.info(f"validation loss {loss:.4f} has not improved for {cfg.scheduler.patience} evaluations in cycle "
             f"{cycle + 1}: extended; cycles now end after steps {schedule.cycle_ends()}")
    return schedule, True


def nonfinite(step: int, lr: float, loss: float, norm: float) -> str:
    return f"non-finite loss or gradient at step {step} (lr {lr:.4g}, loss {loss:.4g}, gradient norm {norm:.4g})"


def skip_nonfinite(t: DictConfig, p: dict, step: int, lr: float, loss: torch.Tensor, norm: torch.Tensor) -> None:
    """on_nonfinite=skip: count the dropped update; stop after max_skipped in a row."""
    p["skipped"] += 1
    p["skipped_in_row"] += 1
    what = nonfinite(step, lr, loss.item(), norm.item())
    if p["skipped_in_row"] > t.max_skipped:
        raise SnapensError(f"{what}: {p['skipped_in_row']} non-finite updates in a row (trainer.max_skipped="
                           f"{t.max_skipped}); stopped, the last checkpoint is intact")
    log.warning(f"{what}: update skipped")


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)
    except (SnapensError, OmegaConfBaseException) as e:
        exit_with(e)
    except Interrupted as e:
        log.warning(str(e))
        print(f"snapens: {e}", file=sys.stderr)
        sys.exit(EXIT_INTERRUPTED)


if __name__ == "__main__":
    main()
