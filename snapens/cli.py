"""Around every Hydra entry point, the one error policy: a run dir that cannot be written, Hydra's own errors (a
misspelt key, a value of the wrong type, an unknown option), a SnapensError from the job, and a stop signal during
start-up or training, each said in one line with the fix and an exit status."""

import difflib
import logging
import os
import re
import signal
import sys
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Callable, TypeVar

from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.experimental.callback import Callback
from hydra.errors import HydraException, MissingConfigException, OverrideParseException
from omegaconf import DictConfig
from omegaconf.errors import OmegaConfBaseException

from snapens import files
from snapens.errors import Interrupted, SnapensError, exit_with

EXIT_INTERRUPTED = 75  # EX_TEMPFAIL (sysexits.h): try again later, e.g. requeue the job
log = logging.getLogger(__name__)
T = TypeVar("T")


class Stopped(BaseException):
    """A stop signal outside training (SIGTERM, SIGHUP, SIGUSR1, SIGUSR2), raised where the process is, like Ctrl-C's
    KeyboardInterrupt: during training snapens.checkpoint.stop_requests takes these signals over."""


def _stop(signum, frame):
    raise Stopped(signal.Signals(signum).name)


def run(main) -> None:
    """Call a @hydra.main function as the command line's entry point. A stop signal outside training ends it in one
    line: status EXIT_INTERRUPTED when the run dir holds a checkpoint to continue from, else 128 + the signal's
    number (130 for SIGINT, 143 for SIGTERM), as a shell reports a process the signal ended."""
    os.environ.setdefault("HYDRA_FULL_ERROR", "1")  # Hydra's errors reach us instead of being printed in many lines
    for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        if signal.getsignal(s) is not signal.SIG_IGN:  # under nohup SIGHUP is ignored, and stays so
            signal.signal(s, _stop)
    try:
        check_writable(sys.argv[1:])
        main()
    except (KeyboardInterrupt, Stopped) as e:  # before training began or after it ended: nothing half-written
        name = str(e) if isinstance(e, Stopped) else "SIGINT"
        resumable = any(Path(a.split("=", 1)[1], "checkpoints", "last.ckpt").is_file()  # checkpoint.checkpoint_path
                        for a in sys.argv[1:] if a.startswith("hydra.run.dir="))
        fail(f"stopped by {name} outside training" + ("; the same command continues from the run dir's checkpoint"
                                                      if resumable else ""),
             EXIT_INTERRUPTED if resumable else 128 + signal.Signals[name])
    except HydraException as e:
        fail(hydra_error(e), 2)
    except ValueError as e:  # Hydra's check of its own flags, before any config is read; anything else is a bug
        if not str(e).startswith("Only one of --run, --multirun"):
            raise
        fail(f"{str(e).splitlines()[0]}; drop all but one of them", 2)


def run_job(job: Callable[[], T]) -> T:
    """Every entry point's job inside Hydra: bad input is one line (exit 2) and leaves no run dir that holds
    nothing; a stop signal during training exits with EXIT_INTERRUPTED once the checkpoint is written."""
    try:
        return job()
    except (SnapensError, OmegaConfBaseException) as e:
        discard_unused_run_dir()
        exit_with(e)
    except Interrupted as e:
        log.warning(str(e))
        print(f"snapens: {e}", file=sys.stderr)
        hand_over(e.signal)
        sys.exit(EXIT_INTERRUPTED)


def hand_over(name: str | None) -> None:
    """After the checkpoint: a stop signal that a launcher listens for (hydra-submitit-launcher's job installs
    submitit's handler for SIGUSR2, which requeues the job and exits) goes to that handler, as if snapens had not
    held it back; otherwise nothing, and the caller exits with EXIT_INTERRUPTED."""
    handler = signal.getsignal(signal.Signals[name]) if name else None
    if callable(handler) and handler not in (_stop, signal.default_int_handler):
        log.info(f"{name}: handing over to the launcher's handler ({getattr(handler, '__qualname__', handler)})")
        handler(signal.Signals[name].value, None)


def returned_accuracy(result: dict) -> float:
    """What a job returns to Hydra's sweeper: the ensemble's validation accuracy when there is a validation split,
    else its test accuracy (which `main` refuses to hand to a sweeper that optimises it)."""
    split = "val" if "val" in result else "test"
    accuracy = (result["val"] if split == "val" else result)["ensemble"]["acc"]
    logging.getLogger("snapens.train").info(f"returned to Hydra: the ensemble's {split} accuracy, {accuracy:.4f}")
    return accuracy


def refuse_tuning_on_test(cfg: DictConfig) -> None:
    """A sweeper that optimises what the jobs return (Optuna, Ax, Nevergrad: any but Hydra's basic one) must get a
    validation number: a result tuned on the test set is no test result."""
    sweeper = HydraConfig.get().sweeper.get("_target_", "")
    if HydraConfig.get().mode == RunMode.MULTIRUN and not sweeper.endswith("BasicSweeper") and not cfg.data.val_size:
        raise SnapensError(f"{sweeper.rsplit('.', 1)[-1]} optimises what each job returns, which without a validation "
                           "split is the test accuracy: tuning on the test set; hold out images with data.val_size=N "
                           "(the jobs then return the validation ensemble accuracy)")


def fail(message: str, status: int) -> None:
    print(f"snapens: error: {message}" if status == 2 else f"snapens: {message}", file=sys.stderr)
    sys.exit(status)


def check_writable(args: list[str]) -> None:
    """Where the command writes must be writable: its run dir (hydra.run.dir=, hydra.sweep.dir= with -m, or
    outputs/ here by default) and a tool's out=, checked before Hydra makes the dir and opens its log there, which
    would fail with a traceback."""
    key = "hydra.sweep.dir" if {"-m", "--multirun"} & set(args) else "hydra.run.dir"
    given = dict(a.split("=", 1) for a in args if "=" in a)
    try:
        files.check_writable(Path(given.get(key, "outputs")), f"{key}=DIR")
        if given.get("out"):  # the ensemble tool's folder or export's file
            files.check_writable(Path(given["out"]), "out=")
    except SnapensError as e:
        fail(str(e), 2)


def hydra_error(error: HydraException) -> str:
    """One line for an error Hydra raises while composing the config."""
    if isinstance(error, MissingConfigException) and error.options:
        group, _, option = (error.missing_cfg_file or "").rpartition("/")
        return f"{group}={option} is not an option; choose one of: {', '.join(error.options)}"
    cause = error.__cause__
    key, schema = getattr(cause, "full_key", None), getattr(cause, "object_type", None)
    if key and "not in" in str(cause) and is_dataclass(schema):  # a key the group's schema does not declare
        return unknown_key(key, [f.name for f in fields(schema)])
    if key:
        return f"{key}: {str(cause).splitlines()[0]}"
    if isinstance(error, OverrideParseException):  # the grammar's complaint and where the grammar is explained
        return "cannot parse an override: " + " ".join(line.strip() for line in str(error).splitlines())
    return str(error).splitlines()[0]


def unknown_key(key: str, known: list[str]) -> str:
    """"did you mean", once: `key` (group.name) is not among the `known` names of its group."""
    prefix, _, name = key.rpartition(".")
    near = difflib.get_close_matches(name, known, n=1)
    meant = f"{prefix}.{near[0]}" if prefix and near else near[0] if near else None
    return f"{key} is not a key of {prefix or 'the config'}" + (f"; did you mean {meant}?" if meant else
                                                                f"; its keys: {', '.join(sorted(known))}")


# Libraries a sweeper brings whose INFO lines are noise in a sweep's output (Optuna's, coloured with ANSI codes, and
# alembic's plugin list, which Optuna's storage imports): their warnings still show.
QUIET = ("optuna", "alembic")


def _holds_only(folder: Path, log_file: Path, lock: Path) -> bool:
    """`folder` holds nothing but this job's log and an empty (let go) lock file."""
    if not folder.is_dir() or any(p not in (log_file, lock) for p in folder.iterdir()):
        return False
    return not (lock.exists() and lock.stat().st_size)


class ShowSweepDir(Callback):
    """hydra.callbacks of every training entry point: a multirun says where its jobs go, at its start and end, and
    keeps the sweeper's libraries' INFO lines out of its output (the sweeper is made, and imports them, first)."""

    def on_multirun_start(self, config, **kwargs) -> None:
        for name in QUIET:
            logging.getLogger(name).setLevel(logging.WARNING)
        if "optuna" in str(config.hydra.sweeper.get("_target_", "")):  # Optuna sets its own level at first use
            import optuna
            optuna.logging.set_verbosity(optuna.logging.WARNING)
        print(f"snapens: sweep dir {Path(config.hydra.sweep.dir).absolute()} (one run dir per job)", flush=True)

    def on_multirun_end(self, config, **kwargs) -> None:
        folder = Path(config.hydra.sweep.dir).absolute()
        print(f"snapens: sweep dir {folder}; compare its jobs: python -m snapens.report {folder}", flush=True)


def discard_unused_run_dir() -> None:
    """After an error: a run dir that holds nothing but this job's Hydra log and an empty lock file (the config was
    refused before anything was written; snapens.checkpoint.run_dir_lock empties its lock as it lets go) is removed
    with them, so a rejected command leaves no run dir behind. Only those two files are deleted and only empty
    folders are removed: nothing else is touched."""
    hydra = HydraConfig.get()
    folder = Path(hydra.runtime.output_dir)
    log_file, lock = folder / f"{hydra.job.name}.log", folder / ".lock"
    if not _holds_only(folder, log_file, lock):
        return
    lock.unlink(missing_ok=True)
    for handler in logging.getLogger().handlers[:]:  # Hydra's file handler holds the log open
        if isinstance(handler, logging.FileHandler) and Path(handler.baseFilename) == log_file.absolute():
            handler.close()
            logging.getLogger().removeHandler(handler)
    log_file.unlink(missing_ok=True)
    # The run dir, and its parent when that is the default layout's date folder (outputs/runs/<YYYY-MM-DD>/) left
    # empty: a folder of the user's own is never removed.
    dated = re.fullmatch(r"\d{4}-\d{2}-\d{2}", folder.parent.name)
    for empty in (folder, folder.parent) if dated else (folder,):
        try:
            empty.rmdir()
        except OSError:  # not empty (or not ours to remove): left as it is
            break
