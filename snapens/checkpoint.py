"""The resumable state of a training run, `checkpoints/last.ckpt` in the run dir, and the decisions around it:
whether a run dir may be written (never over an earlier run), whether and how to resume, and stop signals.

It holds only tensors and plain Python values, written with torch.save and read with `torch.load(weights_only=True)`
(no code runs on load), and goes through the same write-to-temporary-then-rename as snapshots, so a kill -9 at any
moment leaves either the previous checkpoint or the new one under the final name. Schedules are functions of the
step (snapens.schedules), so the step alone restores the learning rate: torch's stateful schedulers have a long
record of wrong rates after a resume (pytorch issues 88791, 52236, 65342).
"""

import errno
import fcntl
import io
import logging
import os
import random
import signal
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snapens import adaptive, distributed
from snapens.errors import SnapensError
from snapens.splits import STREAMED
from snapens.files import write_atomic
from snapens.snapshots import list_snapshots

if TYPE_CHECKING:
    from snapens.training import Run

log = logging.getLogger(__name__)


def checkpoint_path(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints" / "last.ckpt"


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path) -> dict[str, Any]:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types for a damaged file (RuntimeError, UnpicklingError, EOFError)
        why = f"{type(e).__name__}: {str(e).splitlines()[0]}"
        raise SnapensError(f"checkpoint {path} cannot be read ({why}); start the run again in a new "
                           "hydra.run.dir=DIR (this dir's snapshots stay as they are)") from None


def rng_state(generator: torch.Generator, device: torch.device = torch.device("cpu"),
              ranks: distributed.Ranks = distributed.Ranks()) -> dict[str, Any]:
    """Every random stream the run draws from: torch's on the CPU, each rank's on its own GPU (gathered, in rank
    order: dropout draws from it), the data generator, Python's and NumPy's. Every rank calls this."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = distributed.gather_objects(torch.cuda.get_rng_state(device), ranks) if device.type == "cuda" else []
    return {
        "torch": torch.get_rng_state(),
        "cuda": cuda,
        "data": generator.get_state(),
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.copy()), pos, has_gauss, cached),
    }


def set_rng_state(state: dict[str, Any], generator: torch.Generator, device: torch.device = torch.device("cpu"),
                  ranks: distributed.Ranks = distributed.Ranks()) -> None:
    """Put `rng_state`'s streams back; this rank's CUDA stream goes into the one device it uses, whatever the number
    of GPUs the machine shows. A checkpoint of another number of processes cannot continue their streams."""
    cuda = state["cuda"]
    if device.type == "cuda" and cuda:
        check_processes(len(cuda), ranks)  # a checkpoint written before "processes" was kept says it here
        torch.cuda.set_rng_state(cuda[ranks.rank], device)
    torch.set_rng_state(state["torch"])
    generator.set_state(state["data"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy(), pos, has_gauss, cached))


def check_processes(written: int, ranks: distributed.Ranks) -> None:
    """A checkpoint continues in as many processes as wrote it: each rank's random streams and share of every batch
    are its own (on the CPU as on GPUs)."""
    if written != ranks.world:
        how = f"with torchrun --nproc_per_node={written}" if written > 1 else "without torchrun"
        raise SnapensError(f"the checkpoint was written by {written} training processes and this run has "
                           f"{ranks.world}: each process's random streams continue only in its own; resume {how}")


HARMLESS = ("trainer.device", "trainer.num_threads", "trainer.log_every", "trainer.resume", "trainer.checkpoint_every",
            "trainer.on_nonfinite", "trainer.max_skipped", "trainer.plan_only", "ensemble.", "logger.",
            "data.storage", "data.workers", "data.memory_gib")  # a streamed run trains as an in-memory one, bit for bit
# Keys added after runs were made, at the value that trains as those runs did: left out at that value, so earlier
# checkpoints resume and earlier snapshots keep their config_hash.
ADDED = {"data.crop": "pad", "model.weights": ""}


def deciding_values(tree: dict, prefix: str = "") -> dict[str, Any]:
    """A config's leaves by dotted key, without those that cannot change the result (HARMLESS)."""
    leaves = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            leaves.update(deciding_values(value, f"{name}."))
        elif not name.startswith(HARMLESS) and not (name in ADDED and ADDED[name] == value):
            leaves[name] = value
    return leaves


def differing_keys(saved: dict, current: dict) -> list[str]:
    """Dotted keys whose values differ between two config trees and could change the result."""
    a, b = deciding_values(saved), deciding_values(current)
    return sorted(key for key in a.keys() | b.keys() if a.get(key) != b.get(key))


STOPS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2)


@contextmanager
def stop_requests():
    """While inside, SIGTERM, SIGINT, SIGHUP (a closed terminal), SIGUSR1 and SIGUSR2 (the warnings SLURM is asked
    for before a time limit or preemption; submitit's launcher asks for SIGUSR2) do not stop the process at once:
    their names collect in the yielded list, which the loop checks after each update, to checkpoint and exit
    cleanly (snapens.cli.run_job then hands the signal to a launcher's own handler, which requeues the job)."""
    received: list[str] = []

    def note(signum, frame):
        received.append(signal.Signals(signum).name)
        if signum == signal.SIGINT:  # a second Ctrl-C is not held back: it interrupts (a hung setup, say)
            signal.signal(signum, previous[signum])

    previous = {s: signal.signal(s, note) for s in STOPS
                if signal.getsignal(s) is not signal.SIG_IGN}  # an ignored signal (nohup's SIGHUP) stays ignored
    try:
        yield received
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def check_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """Never write over an earlier run's results. A dir that holds only the config of a run killed before its first
    checkpoint (no checkpoint, snapshots or metrics) is a run that never started: the same config starts it there."""
    earlier = [str(p.relative_to(run_dir)) for p in (run_dir / "snapshots", run_dir / "metrics.jsonl",
                                                         run_dir / "results.json") if p.exists()]
    if earlier:
        raise SnapensError(f"run dir {run_dir} already holds {', '.join(earlier)} from an earlier run; "
                           "pass a new hydra.run.dir=DIR (nothing was overwritten)")
    saved = run_dir / ".hydra" / "config.yaml"
    if saved.exists():
        try:
            changed = differing_keys(OmegaConf.to_container(OmegaConf.load(saved), resolve=True),
                                     OmegaConf.to_container(cfg, resolve=True))
        except Exception as e:  # yaml's and OmegaConf's errors share no useful base class
            raise SnapensError(f"{saved} cannot be read ({type(e).__name__}); pass a new hydra.run.dir=DIR") from None
        if changed:
            raise SnapensError(f"run dir {run_dir} holds the config of a run that never started (no checkpoint, no "
                               f"snapshots), with other values of {', '.join(changed)}: run with those values to "
                               "start it there, or pass a new hydra.run.dir=DIR")
        log.info(f"run dir {run_dir} holds a run that was stopped before its first checkpoint: starting it there")


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """.hydra/config.yaml (and overrides.yaml under Hydra), written by us only once the run dir is known to be new:
    conf/config.yaml sets hydra.output_subdir=null so that Hydra itself never writes over an earlier run's record."""
    write_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    if HydraConfig.initialized():
        overrides = OmegaConf.to_yaml(list(HydraConfig.get().overrides.task))
        write_atomic(run_dir / ".hydra" / "overrides.yaml", overrides.encode())


def resume_state(cfg: DictConfig, recipe: dict, run_dir: Path, main: bool = True) -> dict | None:
    """The checkpoint to continue from (None for a new run), after checking that resuming is allowed and sound:
    the checkpoint's recipe (snapens.build.recipe: the config and the loss's record) must be `recipe`."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        check_run_dir(run_dir, cfg)
        return None
    if cfg.trainer.resume == "never":
        raise SnapensError(f"run dir {run_dir} holds a checkpoint and trainer.resume=never: pass a new "
                           "hydra.run.dir=DIR, or trainer.resume=auto to continue that run")
    for partial in run_dir.rglob(".*.tmp") if main else ():  # a killed run's half-written files; rank 0 alone, who
        partial.unlink(missing_ok=True)  # holds the lock (another job's ranks must not touch a running job's files)
    state = load_checkpoint(path)
    missing = [k for k in ("model", "optimizer", "rng", "progress", "config", "device") if k not in state]
    if missing:
        raise SnapensError(f"checkpoint {path} lacks {', '.join(missing)}: it was not written by snapens.train; "
                           "start the run again in a new hydra.run.dir=DIR")
    changed = differing_keys(state["config"], recipe)
    if changed:
        raise SnapensError(f"cannot resume {run_dir}: the config differs in {', '.join(changed)}; run with the "
                           "original values, or pass a new hydra.run.dir=DIR")
    return state


def keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop metrics lines of epochs after the checkpoint's: they will be trained (and written) again."""
    if path.exists():
        lines = path.read_text().splitlines()[:epoch]  # one line per finished epoch; a torn last line goes too
        write_atomic(path, "".join(line + "\n" for line in lines).encode())


@contextmanager
def run_dir_lock(run_dir: Path):
    """An exclusive lock on the run dir while inside (flock on run_dir/.lock, which the system releases when the
    process ends, however it ends): a second training into the same dir stops at once, before it reads or writes
    anything, instead of mixing its snapshots with the first one's."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = open(run_dir / ".lock", "a+")
    except OSError as e:
        raise SnapensError(f"cannot write into run dir {run_dir}: {e.strerror or e}; make it writable or pass "
                           "another hydra.run.dir=DIR") from None
    with lock:
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):  # a filesystem without flock (Lustre, some NFS)
                    log.warning(f"cannot lock run dir {run_dir} ({e.strerror}): make sure no other training uses it")
                    yield
                    return
            holder = _holder(lock)
            if holder:  # else it ended while we looked: take the lock
                raise SnapensError(f"run dir {run_dir} is in use by {holder}, which is training into it; wait for "
                                   "it to end, or pass another hydra.run.dir=DIR (nothing was changed)") from None
        lock.seek(0)
        lock.truncate()
        lock.write(f"{os.getpid()}\n")
        lock.flush()
        HELD_LOCKS.add(lock.fileno())
        try:
            yield
        finally:
            HELD_LOCKS.discard(lock.fileno())
            lock.truncate(0)  # an empty lock file: nobody is training here (a killed holder leaves its PID behind)


HELD_LOCKS: set[int] = set()  # the file descriptors of the run-dir locks this process holds


def _drop_locks_in_child() -> None:
    """A process forked from a training one (a DataLoader worker decoding a streamed split) does not keep the run
    dir locked: flock belongs to the open file, which a fork shares, so a worker outliving a killed trainer (for the
    seconds its parent watchdog takes) would make the resume find the dir in use. Each descriptor is pointed at
    /dev/null rather than closed, so no later close in the child can hit another file under the same number."""
    if HELD_LOCKS:
        null = os.open(os.devnull, os.O_RDONLY)
        for fd in HELD_LOCKS:
            os.dup2(null, fd)
        os.close(null)
        HELD_LOCKS.clear()


os.register_at_fork(after_in_child=_drop_locks_in_child)


def _holder(lock, wait: float = 2.0) -> str | None:
    """Who holds `lock` (another open file of the lock, not held by us): "process PID" as the holder wrote it, or
    None once nobody holds it. The holder writes its PID just after it takes the lock, so one that looks in between
    finds the file empty: wait for the PID a little (a busy machine can delay the write), then say "another
    process"."""
    deadline = time.monotonic() + wait
    while True:
        try:
            fcntl.flock(lock, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held: by whom?
            lock.seek(0)
            pid = lock.read().strip()
            if pid:
                return f"process {pid}"
            if time.monotonic() > deadline:
                return "another process"
            time.sleep(0.02)
        else:
            fcntl.flock(lock, fcntl.LOCK_UN)
            return None


def training_holder(run_dir: Path) -> str | None:
    """The process training into `run_dir` now (the holder of its lock, as `run_dir_lock` wrote it), or None."""
    try:
        with open(run_dir / ".lock") as lock:
            return _holder(lock)
    except OSError:  # no lock file (never trained by this snapens, or not a run dir), or a filesystem without flock
        return None


def refuse_while_training(run_dirs: list) -> None:
    """A run still training is not reported on as if it had finished: one line naming it and the fix."""
    for run_dir in run_dirs:
        holder = training_holder(Path(run_dir))
        if holder:
            raise SnapensError(f"run dir {run_dir} is still training ({holder} holds its lock): its snapshots "
                               "are not all there yet; run this again once its training has ended")


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


def check_same_data(run: "Run", saved: dict[str, str]) -> None:
    """The splits' digests as the checkpoint has them; a streamed split's (marked) cannot be compared with one in
    memory, so a change of data.storage is named as such."""
    changed = [name for name in ("train", "val", "test") if saved.get(name) != run.data_digests.get(name)]
    streamed = {str(saved[name]).startswith(STREAMED) for name in changed}
    if changed and streamed != {str(run.data_digests[name]).startswith(STREAMED) for name in changed}:
        was = "stream" if streamed == {True} else "memory"
        raise SnapensError(f"cannot resume {run.dir}: it started with data.storage={was} and this run holds its "
                           f"images otherwise, so their digests cannot be compared; resume with data.storage={was}")
    if changed:
        raise SnapensError(f"cannot resume {run.dir}: the {' and '.join(changed)} images differ from those it started "
                           "with (files under data.root were replaced, added or removed); put them back, or pass a "
                           "new hydra.run.dir=DIR to train on the data as it is now")


def restore(run: "Run", saved: dict) -> None:
    """Put the checkpoint's weights, optimizer state, random streams and progress back."""
    s = run.setup
    if saved["device"] != s.device.type:
        raise SnapensError(f"the checkpoint of {run.dir} was written on {saved['device']}; resume it there "
                           f"(trainer.device={saved['device']}): the random streams of one cannot continue on another")
    check_same_data(run, saved.get("data", run.data_digests))  # checkpoints before the digests: not checked
    if "processes" in saved:  # earlier checkpoints: their CUDA streams say it (set_rng_state)
        check_processes(saved["processes"], run.ranks)
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


def save_progress(run: "Run") -> None:
    """checkpoints/last.ckpt (rank 0; every rank hands over its CUDA random state): everything a resumed run needs
    to continue bit-identically."""
    s = run.setup
    rng = rng_state(s.generator, s.device, run.ranks)
    if not run.ranks.main:
        return
    save_checkpoint(checkpoint_path(run.dir), {
        "model": s.model.state_dict(), "optimizer": s.optimizer.state_dict(), "rng": rng,
        "progress": asdict(run.progress), "config": run.recipe,
        "device": s.device.type, "processes": run.ranks.world, "snapshots": [p.name for p in list_snapshots(run.dir)],
        "swa": s.swa.state_dict() if s.swa else None,
        "adaptive": asdict(run.adaptive) if run.adaptive else None, "data": run.data_digests})
