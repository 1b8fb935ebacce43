"""Train with a cyclic schedule and keep a snapshot at every cycle end: `python -m snapens.train [overrides]`.

SGDR (Loshchilov & Hutter 2017, arXiv 1608.03983) restarts the learning rate; each cycle ends at the schedule's
minimum, where the model is a good and diverse ensemble member (Huang et al. 2017, arXiv 1704.00109). At the end,
each snapshot is read back from its file and evaluated once, and the snapshots' averaged logits are compared with
the last snapshot alone.
"""

import hashlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import hydra
import torch
import torch.nn.functional as F
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException
from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

from snapens.build import (build_augmentation, build_data, build_model, build_optimizer, build_schedule,
                           model_name, pick_device)
from snapens.config import check_config, register_configs
from snapens.data import train_batches
from snapens.ensemble import ensemble_report, format_report
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots, read_metadata, save_snapshot, snapshot_path, write_atomic

register_configs()
log = logging.getLogger(__name__)


def set_hyperparameters(optimizer: torch.optim.Optimizer, lr: float, momentum: float | None) -> None:
    """Write the schedule's values for this update into every parameter group (beta1 stands for momentum in Adam)."""
    for group in optimizer.param_groups:
        group["lr"] = lr
        if momentum is not None:
            if "betas" in group:
                group["betas"] = (momentum, group["betas"][1])
            else:
                group["momentum"] = momentum


def clip_gradients(model: torch.nn.Module, max_value: float, mode: str) -> None:
    """Clip the total gradient norm (mode norm) or each gradient entry (mode value) at max_value; 0 disables."""
    if max_value > 0 and mode == "norm":
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_value)
    elif max_value > 0:
        torch.nn.utils.clip_grad_value_(model.parameters(), max_value)


def train_step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor,
               grad_clip: float, clip_mode: str) -> tuple[torch.Tensor, torch.Tensor]:
    """One update on one batch; returns the (detached) mean loss and the logits, without a host sync."""
    logits = model(x)
    loss = F.cross_entropy(logits, y)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    clip_gradients(model, grad_clip, clip_mode)
    optimizer.step()
    return loss.detach(), logits.detach()


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
    """First 16 hex digits of the SHA-256 of the resolved config: tells whether two snapshots share a config."""
    return hashlib.sha256(OmegaConf.to_yaml(cfg, resolve=True).encode()).hexdigest()[:16]


def train(cfg: DictConfig, run_dir: str | Path) -> float:
    """Train as `cfg` says, write snapshots, metrics.jsonl and results.json to `run_dir`; return ensemble accuracy."""
    check_config(cfg)
    run_dir = Path(run_dir)
    check_run_dir(run_dir)
    t = cfg.trainer
    device = pick_device(t.device)
    if t.num_threads:
        torch.set_num_threads(t.num_threads)

    torch.manual_seed(t.seed)
    model = build_model(cfg.model).to(device)  # before the data: a bad model config fails in a second
    data = build_data(cfg.data)
    steps_per_epoch = math.ceil(len(data.train) / t.batch_size)
    schedule = build_schedule(cfg.scheduler, t.epochs, steps_per_epoch)
    cycle_ends = schedule.cycle_ends()
    optimizer = build_optimizer(model, cfg.optimizer, schedule.lr(0))
    augmentation = build_augmentation(cfg.data)
    train_split = data.train.to(device)
    generator = torch.Generator(device).manual_seed(t.seed)

    save_config(cfg, run_dir)
    metadata = {"model": model_name(cfg.model), "model_config": OmegaConf.to_container(cfg.model, resolve=True),
                "num_classes": len(data.classes), "classes": data.classes,
                "image_size": list(data.train.images.shape[2:]), "mean": list(data.mean), "std": list(data.std),
                "config_hash": config_hash(cfg)}
    log.info(f"{metadata['model']} on {cfg.data.name} ({len(data.train)} train / {len(data.test)} test images), "
             f"{cfg.scheduler.name}: {schedule.total_steps} steps, snapshots after steps {cycle_ends}, on {device}")

    # ---- the training loop: one update per batch, lr (and momentum) from the schedule before each ----
    step, epoch, start = 0, 0, time.perf_counter()
    bar = tqdm(total=schedule.total_steps, unit="step", dynamic_ncols=True, disable=None)  # None: off when not a tty
    with open(run_dir / "metrics.jsonl", "w") as metrics, logging_redirect_tqdm():
        while step < schedule.total_steps:
            model.train()
            loss_sum = torch.zeros((), device=device)  # summed on the device: no host sync per step
            correct = torch.zeros((), device=device, dtype=torch.long)
            seen = 0
            for x, y in train_batches(train_split, t.batch_size, generator, augmentation, data.mean, data.std):
                lr = schedule.lr(step)
                set_hyperparameters(optimizer, lr, schedule.momentum(step))
                loss, logits = train_step(model, optimizer, x, y, t.grad_clip, t.clip_mode)
                loss_sum += loss * len(y)
                correct += (logits.argmax(1) == y).sum()
                seen += len(y)
                step += 1
                bar.update()
                if step % t.log_every == 0:
                    bar.set_postfix(loss=f"{loss_sum.item() / seen:.3f}", acc=f"{correct.item() / seen:.3f}",
                                    lr=f"{lr:.4g}")
                if step in cycle_ends:
                    cycle = cycle_ends.index(step) + 1
                    save_snapshot(snapshot_path(run_dir, cycle), model,
                                  {**metadata, "cycle": cycle, "step": step, "epoch": step / steps_per_epoch,
                                   "lr": lr})
                if step == schedule.total_steps:
                    break
            epoch += 1
            record = {"epoch": epoch, "step": step, "lr": lr, "train_loss": loss_sum.item() / seen,
                      "train_acc": correct.item() / seen, "seconds": time.perf_counter() - start}
            metrics.write(json.dumps(record) + "\n")
            metrics.flush()
            log.info("epoch {epoch} step {step} lr {lr:.4g} loss {train_loss:.4f} acc {train_acc:.4f} "
                     "{seconds:.1f}s".format(**record))
    bar.close()

    report = evaluate_snapshots(cfg, run_dir, model, data, device)
    log.info("\n" + format_report(report))
    return report["ensemble"]["acc"]


def evaluate_snapshots(cfg: DictConfig, run_dir: Path, model, data, device) -> dict:
    """Read every snapshot back from its file, compute its test logits once (kept in logits/test/ for
    `python -m snapens.ensemble`), and write results.json."""
    paths = list_snapshots(run_dir)
    metas = [read_metadata(p) for p in paths]
    logits = cached_logits(paths, metas, data.test, "test", cfg.ensemble.batch_size, device, lambda *_: model)
    report = ensemble_report(logits, data.test.labels, paths, metas, cfg.ensemble.rule)
    write_atomic(run_dir / "results.json", (json.dumps(report, indent=2) + "\n").encode())
    return report


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(cfg: DictConfig) -> float:
    try:
        return train(cfg, HydraConfig.get().runtime.output_dir)
    except (SnapensError, OmegaConfBaseException) as e:
        exit_with(e)


def exit_with(error: Exception) -> None:
    """One line on stderr, exit status 2: the message names the key or file and the fix."""
    key = getattr(error, "full_key", None)
    print(f"snapens: error: {str(error).splitlines()[0]}" + (f" ({key})" if key else ""), file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    main()
