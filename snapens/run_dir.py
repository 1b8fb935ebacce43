"""The run dir around the training loop: never overwrite an earlier run, record the config, decide whether and
how to resume, and write what the loop produces (metrics lines, snapshots at cycle ends, results.json). For the
entry point (it reads the Hydra config); the loop itself is in train.py.
"""

import hashlib
import json
import logging
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snapens.checkpoint import checkpoint_path, deciding_values, differing_keys, load_checkpoint
from snapens.ensemble import ensemble_report
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.restarts import finish_swa
from snapens.snapshots import (list_snapshots, prune_snapshots, read_metadata, save_snapshot, snapshot_path,
                               write_atomic)

log = logging.getLogger(__name__)


def check_run_dir(run_dir: Path) -> None:
    """Never write over an earlier run's results."""
    earlier = [str(p.relative_to(run_dir)) for p in (run_dir / "snapshots", run_dir / "metrics.jsonl",
                                                         run_dir / "results.json", run_dir / ".hydra" / "config.yaml")
               if p.exists()]
    if earlier:
        raise SnapensError(f"run dir {run_dir} already holds {', '.join(earlier)} from an earlier run; "
                           "pass a new hydra.run.dir=DIR (nothing was overwritten)")


def save_config(cfg: DictConfig, run_dir: Path) -> None:
    """.hydra/config.yaml (and overrides.yaml under Hydra), written by us only once the run dir is known to be new:
    conf/config.yaml sets hydra.output_subdir=null so that Hydra itself never writes over an earlier run's record."""
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    write_atomic(run_dir / ".hydra" / "config.yaml", OmegaConf.to_yaml(cfg).encode())
    if HydraConfig.initialized():
        overrides = OmegaConf.to_yaml(list(HydraConfig.get().overrides.task))
        write_atomic(run_dir / ".hydra" / "overrides.yaml", overrides.encode())


def config_hash(cfg: DictConfig) -> str:
    """First 16 hex digits of the SHA-256 of the config's values that decide the result (device, threads and logging
    left out, as on resume): tells whether two snapshots come from the same setting."""
    values = deciding_values(OmegaConf.to_container(cfg, resolve=True))
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]


def resume_state(cfg: DictConfig, run_dir: Path) -> dict | None:
    """The checkpoint to continue from (None for a new run), after checking that resuming is allowed and sound."""
    path = checkpoint_path(run_dir)
    if not path.exists():
        check_run_dir(run_dir)
        return None
    if cfg.trainer.resume == "never":
        raise SnapensError(f"run dir {run_dir} holds a checkpoint and trainer.resume=never: pass a new "
                           "hydra.run.dir=DIR, or trainer.resume=auto to continue that run")
    for partial in run_dir.rglob(".*.tmp"):  # half-written files of a killed run, never visible as results
        partial.unlink(missing_ok=True)  # under torchrun every rank looks
    state = load_checkpoint(path)
    changed = differing_keys(state["config"], OmegaConf.to_container(cfg, resolve=True))
    if changed:
        raise SnapensError(f"cannot resume {run_dir}: the config differs in {', '.join(changed)}; run with the "
                           "original values, or pass a new hydra.run.dir=DIR")
    return state


def keep_metrics_until(path: Path, epoch: int) -> None:
    """Drop metrics lines of epochs after the checkpoint's: they will be trained (and written) again."""
    if path.exists():
        lines = path.read_text().splitlines()[:epoch]  # one line per finished epoch; a torn last line goes too
        write_atomic(path, "".join(line + "\n" for line in lines).encode())


def write_metrics(metrics, p: dict, lr: float, cycle_ends: list[int]) -> None:
    """One metrics.jsonl line for the epoch just finished (and the log line that says the same); cycle_ends are
    those in use (adaptive SGDR moves them)."""
    seen = max(p["seen"], 1)
    record = {"epoch": p["epoch"], "step": p["step"], "lr": lr, "train_loss": p["loss_sum"] / seen,
              "train_acc": p["correct"] / seen, "seconds": p["seconds"], "skipped": p["skipped"],
              "cycle_ends": cycle_ends}
    metrics.write(json.dumps(record) + "\n")
    metrics.flush()
    log.info("epoch {epoch} step {step} lr {lr:.4g} loss {train_loss:.4f} acc {train_acc:.4f} "
             "{seconds:.1f}s".format(**record))


def evaluate_snapshots(cfg: DictConfig, run_dir: Path, model, data, device, precision, training: dict) -> dict:
    """Read every snapshot back from its file, compute its test logits once (kept in logits/test/ for
    `python -m snapens.ensemble`), and write results.json (with `training`: its steps, seconds and precision)."""
    paths = list_snapshots(run_dir)
    metas = [read_metadata(p) for p in paths]
    logits = cached_logits(paths, metas, data.test, "test", cfg.ensemble.batch_size, device, lambda *_: model,
                           precision, cfg.trainer.channels_last)
    report = {**ensemble_report(logits, data.test.labels, paths, metas, cfg.ensemble.rule), "training": training}
    write_atomic(run_dir / "results.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


def read_metrics(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def end_cycle(cfg: DictConfig, run_dir: Path, model, swa, train_split, data, meta: dict) -> None:
    """At a cycle end (rank 0): the snapshot, the cycle's SWA average beside it, and the pruning of old ones."""
    save_snapshot(snapshot_path(run_dir, meta["cycle"]), model, meta)
    if swa:
        averaged = finish_swa(swa, train_split, cfg.ensemble.batch_size, data.mean, data.std)
        save_snapshot(snapshot_path(run_dir, meta["cycle"], swa=True), averaged,
                      {**meta, "swa_start": cfg.trainer.swa.start, "swa_updates": int(swa.n_averaged)})
    if cfg.trainer.keep_snapshots:
        prune_snapshots(run_dir, cfg.trainer.keep_snapshots)
