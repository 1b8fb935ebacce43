"""The checks of a composed config, before anything runs; the types of its keys are snapens.schemas'.

Each rule is checked once. A library class checks its own arguments (schedules.SGDR refuses T_mult < 1, say) and
snapens.build turns its ValueError into one line naming the key; `check_config` checks the rest: the choices and
ranges of keys that only the config has, and rules that involve several keys."""

import os
from dataclasses import fields
from typing import Any

from omegaconf import DictConfig

from snapens.batches import CROPS
from snapens.data import SOURCES
from snapens.streaming import STORAGES
from snapens.ensemble.rules import RULES, check_rule
from snapens.cli import unknown_key
from snapens.errors import SnapensError
from snapens.schedules import SCHEDULES
from snapens.schemas import Config, register_configs, schema_of

__all__ = ["CHOICES", "check_config", "check_inference_options", "register_configs", "schema_of"]


# Keys that only the config has (scheduler.mode, say, is checked by schedules.Cyclic and named by snapens.build).
CHOICES = {
    "data.name": tuple(SOURCES),
    "data.storage": STORAGES,
    "data.crop": CROPS,
    "optimizer.name": ("sgd", "adamw"),
    "scheduler.unit": ("epoch", "step", "budget"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.clip_mode": ("norm", "value"),
    "trainer.resume": ("auto", "never"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "logger.name": ("none", "tensorboard"),
    "ensemble.rule": RULES,
}

POSITIVE = ("data.num_classes", "data.train_size", "data.test_size", "data.size", "trainer.epochs",
            "trainer.batch_size", "trainer.log_every", "trainer.accumulate", "ensemble.batch_size",
            "scheduler.patience", "scheduler.cycles", "optimizer.eps")
NON_NEGATIVE = ("data.image_size", "data.train_limit", "data.test_limit", "data.val_size", "data.crop_padding",
                "data.cutout", "data.workers", "data.memory_gib",
                "trainer.grad_clip", "trainer.num_threads", "trainer.checkpoint_every",
                "trainer.max_skipped", "trainer.keep_snapshots", "trainer.snapshot_every", "trainer.label_smoothing",
                "optimizer.weight_decay")
# Upper bounds, inclusive: momentum and Adam's betas are fractions; a seed must fit torch's 64-bit generator; the
# image sizes keep a typo from allocating gigabytes (4096 pixels a side is far beyond the CIFAR models' inputs).
AT_MOST = {"optimizer.momentum": 1, "optimizer.beta1": 1, "optimizer.beta2": 1, "trainer.seed": 2**63 - 1,
           "data.image_size": 4096, "data.size": 4096, "data.crop_padding": 64, "data.cutout": 4096}


def _get(cfg: DictConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def check_config(cfg: DictConfig) -> None:
    """Raise SnapensError naming the first key whose value is out of range. The scheduler's values are checked by the
    schedule classes when snapens.build makes the schedule, where the steps are known (so is a budget that ends
    inside a cycle)."""
    _check_known_keys(cfg)
    _check_choices(cfg)
    _check_ranges(cfg)
    _check_related_keys(cfg)
    kind = SCHEDULES.get(cfg.scheduler.name)
    if kind is not None and kind.adapts_to_validation:
        _check_adaptive_sgdr(cfg)


# Sections beside the training config's that an entry point composes into one config (conf/lr_find.yaml,
# conf/distill.yaml): each is typed by its own schema.
ENTRY_SECTIONS = ("lr_find", "distill")


def _check_known_keys(cfg: DictConfig) -> None:
    """Refuse keys no schema declares, added with `+` (Hydra accepts `+trainer.epoch=3` and `+foo=1` and ignores
    their meaning): a misspelt key would otherwise be silently unused. Names the key most likely meant."""
    _check_sections(cfg)
    for group in ("data", "model", "optimizer", "scheduler", "trainer", "ensemble"):
        schema = schema_of(cfg, group) if group in cfg else None
        if schema is None:
            continue
        known = [f.name for f in fields(schema)]
        for key in cfg[group]:
            if key not in known:
                option = f"{group}={cfg[group].name}" if "name" in cfg[group] else group
                message = unknown_key(f"{group}.{key}", known)
                raise SnapensError(message.replace(f" is not a key of {group}", f" is not a key of {option}", 1))
    for key in cfg.trainer.swa:
        if key != "start":
            raise SnapensError(f"trainer.swa.{key} is not a key of trainer.swa; did you mean trainer.swa.start?")


def _check_sections(cfg: DictConfig) -> None:
    sections = [f.name for f in fields(Config)]
    for key in cfg:
        if key not in sections and key not in ENTRY_SECTIONS:
            raise SnapensError(unknown_key(str(key), sections))


def _check_choices(cfg: DictConfig) -> None:
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise SnapensError(f"{key}={value} is not allowed; choose one of: {', '.join(allowed)}")


def _check_ranges(cfg: DictConfig) -> None:
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not 0 < value < float("inf"):
            raise SnapensError(f"{key}={value} must be a finite number > 0")
    for key in (*NON_NEGATIVE, *AT_MOST):
        value, most = _get(cfg, key), AT_MOST.get(key, float("inf"))
        if value is not None and not (0 <= value <= most and value < float("inf")):  # NaN fails too
            raise SnapensError(f"{key}={value} must be a finite number >= 0" + (f" and <= {most}" if key in AT_MOST
                                                                                 else ""))
    if not cfg.trainer.label_smoothing < 1:
        raise SnapensError(f"trainer.label_smoothing={cfg.trainer.label_smoothing} must be in [0, 1)")


def _check_related_keys(cfg: DictConfig) -> None:
    """Rules between keys, and ones snapens.train is stricter about than the library classes."""
    eta_min, eta_max = _get(cfg, "scheduler.eta_min"), cfg.scheduler.eta_max
    if eta_min is not None and eta_min > eta_max:  # the library allows it (torch too): a cycle would end at its peak
        raise SnapensError(f"scheduler.eta_min={eta_min} must not exceed scheduler.eta_max={eta_max}: each cycle "
                           "must end at its smallest learning rate, where its snapshot is taken")
    milestones = _get(cfg, "scheduler.milestones")
    if milestones is not None and list(milestones) != sorted(milestones):
        raise SnapensError(f"scheduler.milestones={list(milestones)} must be in ascending order")
    if _get(cfg, "optimizer.nesterov") and not cfg.optimizer.momentum:
        raise SnapensError("optimizer.nesterov=true needs momentum: set optimizer.momentum > 0 (e.g. 0.9)")
    _check_snapshot_keys(cfg)
    _check_machine_keys(cfg)


def _check_machine_keys(cfg: DictConfig) -> None:
    """Keys that must fit this machine and this launch: threads it has, and processes to synchronise."""
    cpus = os.cpu_count() or 1
    if cfg.trainer.num_threads > cpus:
        raise SnapensError(f"trainer.num_threads={cfg.trainer.num_threads} is more than this machine's {cpus} CPU "
                           f"threads: give at most {cpus} (0 keeps torch's default)")
    if cfg.trainer.sync_bn and int(os.environ.get("WORLD_SIZE", "1")) == 1:  # torchrun sets WORLD_SIZE
        raise SnapensError("trainer.sync_bn=true synchronises BatchNorm across torchrun's processes, and this run "
                           "has one: leave it false, or launch with torchrun --nproc_per_node=N (docs/distributed.md)")


def _check_snapshot_keys(cfg: DictConfig) -> None:
    """Where snapshots go, what they average and which schedule takes them: keys of the trainer and scheduler."""
    if cfg.scheduler.get("cycles") and cfg.trainer.snapshot_every and cfg.scheduler.name != "snapshot":
        raise SnapensError(f"scheduler.cycles={cfg.scheduler.cycles} and trainer.snapshot_every="
                           f"{cfg.trainer.snapshot_every} both say where snapshots go; set only one")
    swa = cfg.trainer.swa.start
    if swa is not None and not 0 <= swa < 1:
        raise SnapensError(f"trainer.swa.start={swa} must be a fraction of the cycle in [0, 1), or null to disable")


def _check_adaptive_sgdr(cfg: DictConfig) -> None:
    """What adaptive SGDR needs of the other keys (snapens.training lengthens its cycles as the validation loss stalls)."""
    if cfg.trainer.snapshot_every:
        raise SnapensError("trainer.snapshot_every does not go with scheduler=adaptive_sgdr, whose snapshots "
                           "follow the cycles it adapts; leave trainer.snapshot_every=0")
    if cfg.scheduler.warmup_every_cycle:
        raise SnapensError("scheduler.warmup_every_cycle does not go with scheduler=adaptive_sgdr: an extension "
                           "may cut a later cycle shorter than the warmup; leave warmup_every_cycle=false")
    if not 1 < cfg.scheduler.extension_factor < float("inf"):
        raise SnapensError(f"scheduler.extension_factor={cfg.scheduler.extension_factor} must be > 1")
    if not _get(cfg, "data.val_size"):
        raise SnapensError("scheduler=adaptive_sgdr watches the validation loss: hold out images with data.val_size=N")


def check_inference_options(cfg: DictConfig) -> None:
    """The ensemble tool's and export's own values (conf/ensemble.yaml, conf/export.yaml); the rule through
    snapens.ensemble.rules' one check."""
    if cfg.calibrate == "test":
        raise SnapensError("calibrate=test would fit the temperature on the images it is then scored on, so the test "
                           "NLL and ECE after it would be tuned on the test set; use calibrate=val (the run's "
                           "validation split: train with data.val_size=N) or calibrate=none")
    allowed = {"split": ("test", "val"), "device": CHOICES["trainer.device"], "precision": CHOICES["trainer.precision"],
               "calibrate": ("val", "none"), "chosen": (None, "last_m", "greedy", "weighted")}
    for key, choices in allowed.items():
        if cfg[key] not in choices:
            raise SnapensError(f"{key}={cfg[key]} is not allowed; choose one of: {', '.join(c for c in choices if c)}")
    try:
        check_rule(cfg.rule)
    except ValueError as e:
        raise SnapensError(str(e)) from None
    for key in ("bins", "batch_size"):
        if not isinstance(cfg[key], int) or cfg[key] < 1:
            raise SnapensError(f"{key}={cfg[key]} must be a positive whole number")
