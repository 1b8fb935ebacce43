"""Structured configs: the type of every key under conf/, registered in Hydra's ConfigStore.

Each yaml file under conf/ starts from one of these schemas (`defaults: [/schema/<group>/<name>@_here_, ...]`), so
every key has a type and a misspelt key is rejected by Hydra before anything runs. The schemas hold no values: the
yaml files do, each key once with its one-line comment (values that all options of a group share are in
conf/base/<group>.yaml, which those options pull in). A key that no yaml sets stays missing (???) and fails when read.
snapens.config checks the values."""

import textwrap
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf


# --- data -------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str
    root: str
    num_classes: int
    download: bool
    image_size: int
    train_limit: int
    test_limit: int
    val_size: int
    subset_seed: int
    crop_padding: int
    flip: bool
    cutout: int
    crop: str
    storage: str
    workers: int
    memory_gib: float


@dataclass
class SyntheticDataConfig(DataConfig):
    train_size: int
    test_size: int
    size: int


@dataclass
class DigitsDataConfig(DataConfig):
    split_seed: int


# --- models (the class to build is the schema's: _target_ is its one value) ------------------------------------
@dataclass
class ResNetConfig:
    _target_: str = field(default="snapens.models.CifarResNet", kw_only=True)
    depth: int
    num_classes: int


@dataclass
class LibraryModelConfig:
    """conf/model/torchvision.yaml and timm.yaml: a model by its name in its library's registry
    (snapens/models/library.py)."""

    _target_: str = field(default="snapens.models.library_model", kw_only=True)
    library: str
    name: str
    num_classes: int
    kwargs: dict[str, Any] = field(default_factory=dict)
    weights: str = ""


@dataclass
class WRNConfig:
    _target_: str = field(default="snapens.models.WideResNet", kw_only=True)
    depth: int
    widen_factor: int
    dropout: float
    num_classes: int


# --- optimizers (the learning rate is not here: it comes from the schedule) ------------------------------------
@dataclass
class SGDConfig:
    name: str
    momentum: float
    nesterov: bool
    weight_decay: float
    decay_bn_and_bias: bool


@dataclass
class AdamWConfig:
    name: str
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    decay_bn_and_bias: bool


# --- schedules (lengths in `unit`: epochs or steps, floats allowed) ---------------------------------------------
@dataclass
class ScheduleConfig:
    name: str
    unit: str
    eta_max: float
    warmup: float
    warmup_every_cycle: bool
    cycles: Optional[int]


@dataclass
class StepConfig(ScheduleConfig):
    milestones: list[float]
    gamma: float


@dataclass
class CosineConfig(ScheduleConfig):
    eta_min: float


@dataclass
class SGDRConfig(CosineConfig):
    T_0: float
    T_mult: float
    decay: float


@dataclass
class AdaptiveSGDRConfig(SGDRConfig):
    patience: int
    extension_factor: float


@dataclass
class SnapshotConfig(ScheduleConfig):
    eta_min: float


@dataclass
class FGEConfig(ScheduleConfig):
    alpha_1: float
    alpha_2: float
    cycle_length: float


@dataclass
class OneCycleConfig(ScheduleConfig):
    pct_start: float
    div_factor: float
    final_div_factor: float
    anneal: str
    three_phase: bool
    cycle_momentum: bool
    base_momentum: float
    max_momentum: float


@dataclass
class CyclicConfig(ScheduleConfig):
    eta_min: float
    step_size_up: float
    step_size_down: Optional[float]
    mode: str
    gamma: float
    cycle_momentum: bool
    base_momentum: float
    max_momentum: float


# --- trainer and ensemble ---------------------------------------------------------------------------------------
@dataclass
class SWAConfig:
    start: Optional[float]


@dataclass
class TrainerConfig:
    epochs: float
    batch_size: int
    device: str
    seed: int
    grad_clip: float
    clip_mode: str
    num_threads: int
    log_every: int
    checkpoint_every: int
    resume: str
    on_nonfinite: str
    max_skipped: int
    precision: str
    channels_last: bool
    compile: bool
    accumulate: int
    label_smoothing: float
    reset_optimizer_on_restart: bool
    keep_snapshots: int
    swa: SWAConfig
    snapshot_every: float
    sync_bn: bool
    deterministic: bool
    plan_only: bool


@dataclass
class LoggerConfig:
    name: str


@dataclass
class EnsembleConfig:
    rule: str
    batch_size: int


@dataclass
class DistillConfig:
    """`python -m snapens.distill`: the teacher run and Hinton et al.'s (arXiv 1503.02531) two numbers."""

    run: str
    members: str
    rule: Optional[str]
    temperature: float
    alpha: float
    batched: bool


@dataclass
class Config:
    data: Any
    model: Any
    optimizer: Any
    scheduler: Any
    logger: Any
    trainer: TrainerConfig
    ensemble: EnsembleConfig


@dataclass
class InferenceConfig:
    """conf/ensemble.yaml: `python -m snapens.ensemble`."""

    run: Optional[str]
    runs: list[str]
    snapshots: list[str]
    config: Optional[str]
    data_root: Optional[str]
    split: str
    rule: str
    members: Any
    swa: bool
    bins: int
    batch_size: int
    device: str
    precision: str
    channels_last: bool
    predict: Optional[str]
    chosen: Optional[str]
    calibrate: str
    out: Optional[str]
    overwrite: bool
    format: str
    batched: bool


@dataclass
class LRFindConfig:
    """conf/lr_find.yaml's `lr_find` block: the LR range test (Smith 2017, arXiv 1506.01186)."""

    start_lr: float
    end_lr: float
    num_steps: int
    smoothing: float
    diverge_factor: float


SCHEMAS = {
    "data": {"files": DataConfig, "synthetic": SyntheticDataConfig, "digits": DigitsDataConfig},
    "model": {"resnet": ResNetConfig, "wrn": WRNConfig, "library": LibraryModelConfig},
    "logger": {"none": LoggerConfig, "tensorboard": LoggerConfig},
    "optimizer": {"sgd": SGDConfig, "adamw": AdamWConfig},
    "scheduler": {"constant": ScheduleConfig, "step": StepConfig, "cosine": CosineConfig, "sgdr": SGDRConfig,
                  "adaptive_sgdr": AdaptiveSGDRConfig, "snapshot": SnapshotConfig, "onecycle": OneCycleConfig,
                  "cyclic": CyclicConfig, "fge": FGEConfig},
}


CONF = Path(__file__).resolve().parents[1] / "conf"


def options(group: str) -> str:
    """The options of a config group, read from conf/<group>/ (what --help lists), wrapped at 100 characters."""
    names = sorted(p.stem for p in (CONF / group).glob("*.yaml"))
    return ("\n" + " " * 13).join(textwrap.wrap(" ".join(names), 100 - 13))  # under "  experiment "


def keys(name: str) -> str:
    """The top-level keys of conf/<name>.yaml (what an entry point's --help lists), wrapped at 100 characters."""
    names = [k for k in OmegaConf.load(CONF / f"{name}.yaml") if k not in ("defaults", "hydra")]
    return "\n  ".join(textwrap.wrap(" ".join(names), 100 - 2))  # under "  run runs ..."


def schema_of(cfg: DictConfig, group: str):
    """The schema a group's option was composed from: the node's own type once Hydra composed it, or, for a config
    read back from a run's file (untyped), the group's schema whose keys the node has (None for none)."""
    node = cfg[group]
    if is_dataclass(OmegaConf.get_type(node)):
        return OmegaConf.get_type(node)
    keys = set(node.keys())
    known = [*SCHEMAS.get(group, {}).values(), *{"trainer": [TrainerConfig], "ensemble": [EnsembleConfig]}.get(group, [])]
    return next((schema for schema in known if {f.name for f in fields(schema)} >= keys), None)


def default_dir(out, run, split, swa, predict, fallback: str) -> str:
    """Where the report (or predictions.csv) and the log go: out=, else <run>/predictions with predict=, else
    <run>/ensemble/<split> (<split>_swa for SWA snapshots, so it never replaces the plain report), else `fallback`
    (outputs/ensemble/<date>/<time>: several runs or explicit files). Hydra's run dir is this (a resolver, so the
    log is written beside the report), unless out= points into a snapshots/ folder, which `report_dir` refuses."""
    if out:
        return fallback if "snapshots" in Path(str(out)).parts else str(out)
    if run and (Path(str(run)) / "snapshots").is_dir():  # nothing is made inside a dir that is not a run
        return str(Path(str(run)) / "predictions" if predict else
                   Path(str(run)) / "ensemble" / (f"{split}_swa" if swa else str(split)))
    return fallback


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore and the `snapens_options` resolver (--help's lists of options) in
    OmegaConf; entry points call this before composing."""
    OmegaConf.register_new_resolver("snapens_options", options, replace=True)
    OmegaConf.register_new_resolver("snapens_keys", keys, replace=True)
    OmegaConf.register_new_resolver("snapens_report_dir", default_dir, replace=True)  # the ensemble tool's run dir
    OmegaConf.register_new_resolver("snapens_export_dir", lambda out, fallback: str(Path(str(out)).parent) if out
                                    else fallback, replace=True)  # export's: beside the file it writes
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(name="schema_ensemble", node=InferenceConfig)
    cs.store(group="schema", name="lr_find", node=LRFindConfig)
    cs.store(group="schema", name="distill", node=DistillConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)
