"""The run dir around the training loop: never overwrite an earlier run, record the config, decide whether and
how to resume. For the entry point (it reads the Hydra config); the loop itself is in train.py.
"""

import hashlib
import json
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snapens.checkpoint import checkpoint_path, deciding_values, differing_keys, load_checkpoint
from snapens.errors import SnapensError
from snapens.snapshots import write_atomic


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
