"""Structured configs: a dataclass per config-group option, registered in Hydra's ConfigStore.

Each yaml file under conf/ starts from one of these schemas (`defaults: [/schema/<group>/<name>@_here_, _self_]`), so every key has a
type and a misspelt key is rejected by Hydra before anything runs. `check_config` then checks the values that a
type cannot (choices, ranges, orderings), so a bad value fails in one line that names the key and what is allowed.
"""

from dataclasses import dataclass, field
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig

from snapens.errors import SnapensError


# --- data -------------------------------------------------------------------------------------------------------
@dataclass
class DataConfig:
    name: str = MISSING  # cifar10 | cifar100 | digits | imagefolder | synthetic
    root: str = MISSING  # where the files are (and where the decoded cache is kept)
    num_classes: int = 10  # must equal the number of classes in the data; the model's output size
    download: bool = True  # cifar only: fetch missing files when the network allows
    image_size: int = 0  # imagefolder only: resize every image to this square size; 0 keeps the files' size
    train_limit: int = 0  # seeded class-balanced subset of the training images; 0 keeps all
    test_limit: int = 0  # same for the test images
    val_size: int = 0  # validation images held out of train (class-balanced) before train_limit applies
    subset_seed: int = 0  # seed of the subsets and the validation split
    crop_padding: int = 4  # random-crop padding in pixels (He et al. 2016); 0 disables cropping
    flip: bool = True  # random horizontal flips
    cutout: int = 0  # side of the cutout square in pixels (DeVries & Taylor 2017, arXiv 1708.04552); 0 disables


@dataclass
class SyntheticDataConfig(DataConfig):
    train_size: int = 256  # random images per split, for tests only
    test_size: int = 128
    size: int = 32  # height and width


@dataclass
class DigitsDataConfig(DataConfig):
    root: str = ""  # unused: the digits ship inside scikit-learn
    split_seed: int = 0  # seed of the stratified 80/20 train/test split (not trainer.seed): the same split everywhere


# --- models -----------------------------------------------------------------------------------------------------
@dataclass
class ResNetConfig:
    _target_: str = "snapens.models.CifarResNet"
    depth: int = 20  # 6n+2
    num_classes: int = 10


@dataclass
class WRNConfig:
    _target_: str = "snapens.models.WideResNet"
    depth: int = 28  # 6n+4
    widen_factor: int = 10
    dropout: float = 0.0
    num_classes: int = 10


# --- optimizers (the learning rate is not here: it comes from the schedule) ------------------------------------
@dataclass
class SGDConfig:
    name: str = "sgd"
    momentum: float = 0.9  # replaced per step by schedules that cycle momentum (onecycle, cyclic)
    nesterov: bool = False
    weight_decay: float = 5e-4
    decay_bn_and_bias: bool = True  # false: no weight decay on BatchNorm weights and biases


@dataclass
class AdamWConfig:
    name: str = "adamw"
    beta1: float = 0.9  # replaced per step by schedules that cycle momentum
    beta2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.05
    decay_bn_and_bias: bool = True


# --- schedules (lengths in `unit`: epochs by default, floats allowed) --------------------------------------------
@dataclass
class ScheduleConfig:
    name: str = MISSING
    unit: str = "epoch"  # epoch | step: the unit of every length below
    eta_max: float = 0.1  # peak learning rate
    warmup: float = 0.0  # linear warmup length at the start of training
    warmup_every_cycle: bool = False  # warm up at the start of every cycle instead (cyclic schedules)


@dataclass
class ConstantConfig(ScheduleConfig):
    name: str = "constant"


@dataclass
class StepConfig(ScheduleConfig):
    name: str = "step"
    milestones: list[float] = field(default_factory=lambda: [75.0, 112.5])
    gamma: float = 0.1


@dataclass
class CosineConfig(ScheduleConfig):
    name: str = "cosine"
    eta_min: float = 0.0


@dataclass
class SGDRConfig(ScheduleConfig):
    name: str = "sgdr"
    eta_min: float = 0.0
    T_0: float = 10.0
    T_mult: float = 2.0
    decay: float = 1.0


@dataclass
class AdaptiveSGDRConfig(SGDRConfig):
    name: str = "adaptive_sgdr"
    patience: int = 2  # validation evaluations (one per epoch) without a new best loss before extending
    extension_factor: float = 1.5  # the current cycle's length is multiplied by this, once per cycle


@dataclass
class SnapshotConfig(ScheduleConfig):
    name: str = "snapshot"
    eta_min: float = 0.0
    cycles: int = 5


@dataclass
class OneCycleConfig(ScheduleConfig):
    name: str = "onecycle"
    pct_start: float = 0.3
    div_factor: float = 25.0
    final_div_factor: float = 1e4
    anneal: str = "cos"
    three_phase: bool = False
    cycle_momentum: bool = True
    base_momentum: float = 0.85
    max_momentum: float = 0.95


@dataclass
class CyclicConfig(ScheduleConfig):
    name: str = "cyclic"
    eta_min: float = 0.001
    step_size_up: float = 15.0
    step_size_down: Optional[float] = None
    mode: str = "triangular"
    gamma: float = 1.0
    cycle_momentum: bool = True
    base_momentum: float = 0.8
    max_momentum: float = 0.9


# --- trainer and ensemble ---------------------------------------------------------------------------------------
@dataclass
class SWAConfig:
    start: Optional[float] = None  # fraction of each cycle after which weights are averaged; null disables


@dataclass
class TrainerConfig:
    epochs: float = 150.0
    batch_size: int = 128
    device: str = "auto"
    seed: int = 0
    grad_clip: float = 1.0
    clip_mode: str = "norm"
    num_threads: int = 0
    log_every: int = 50
    checkpoint_every: int = 0
    resume: str = "auto"
    on_nonfinite: str = "stop"
    max_skipped: int = 10
    precision: str = "auto"
    channels_last: bool = True
    compile: bool = False
    accumulate: int = 1
    label_smoothing: float = 0.0
    reset_optimizer_on_restart: bool = False
    keep_snapshots: int = 0
    swa: SWAConfig = field(default_factory=SWAConfig)
    snapshot_every: float = 0.0
    sync_bn: bool = False


@dataclass
class LoggerConfig:
    name: str = "none"


@dataclass
class EnsembleConfig:
    rule: str = "logits"
    batch_size: int = 1000


@dataclass
class Config:
    data: Any = MISSING
    model: Any = MISSING
    optimizer: Any = MISSING
    scheduler: Any = MISSING
    logger: Any = MISSING
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    ensemble: EnsembleConfig = field(default_factory=EnsembleConfig)


@dataclass
class InferenceConfig:
    """conf/ensemble.yaml: `python -m snapens.ensemble`."""

    run: Optional[str] = None
    runs: list[str] = field(default_factory=list)
    snapshots: list[str] = field(default_factory=list)
    config: Optional[str] = None
    data_root: Optional[str] = None
    split: str = "test"
    rule: str = "logits"
    members: Any = "all"
    swa: bool = False
    bins: int = 15
    batch_size: int = 1000
    device: str = "auto"
    precision: str = "auto"
    channels_last: bool = True
    predict: Optional[str] = None
    out: Optional[str] = None


@dataclass
class LRFindConfig:
    """conf/lr_find.yaml's `lr_find` block: the LR range test (Smith 2017, arXiv 1506.01186)."""

    start_lr: float = 1e-7
    end_lr: float = 10.0
    num_steps: int = 100
    smoothing: float = 0.98
    diverge_factor: float = 4.0


SCHEMAS = {
    "data": {"files": DataConfig, "synthetic": SyntheticDataConfig, "digits": DigitsDataConfig},
    "model": {"resnet": ResNetConfig, "wrn": WRNConfig},
    "logger": {"none": LoggerConfig, "tensorboard": LoggerConfig},
    "optimizer": {"sgd": SGDConfig, "adamw": AdamWConfig},
    "scheduler": {
        "constant": ConstantConfig,
        "step": StepConfig,
        "cosine": CosineConfig,
        "sgdr": SGDRConfig,
        "adaptive_sgdr": AdaptiveSGDRConfig,
        "snapshot": SnapshotConfig,
        "onecycle": OneCycleConfig,
        "cyclic": CyclicConfig,
    },
}


def register_configs() -> None:
    """Put the schemas in Hydra's ConfigStore; entry points call this before composing."""
    cs = ConfigStore.instance()
    cs.store(name="schema", node=Config)
    cs.store(name="schema_ensemble", node=InferenceConfig)
    cs.store(group="schema", name="lr_find", node=LRFindConfig)
    for group, schemas in SCHEMAS.items():
        for name, node in schemas.items():
            cs.store(group=f"schema/{group}", name=name, node=node)


CHOICES = {
    "data.name": ("cifar10", "cifar100", "digits", "imagefolder", "synthetic"),
    "optimizer.name": ("sgd", "adamw"),
    "scheduler.unit": ("epoch", "step"),
    "scheduler.anneal": ("cos", "linear"),
    "scheduler.mode": ("triangular", "triangular2", "exp_range"),
    "trainer.device": ("auto", "cpu", "cuda"),
    "trainer.clip_mode": ("norm", "value"),
    "trainer.resume": ("auto", "never"),
    "trainer.on_nonfinite": ("stop", "skip"),
    "trainer.precision": ("auto", "bf16", "fp32"),
    "logger.name": ("none", "tensorboard"),
    "ensemble.rule": ("logits", "probs", "vote"),
}

POSITIVE = ("data.num_classes", "trainer.epochs", "trainer.batch_size", "trainer.log_every", "ensemble.batch_size",
            "scheduler.eta_max", "scheduler.T_0", "scheduler.T_mult", "scheduler.cycles", "scheduler.step_size_up",
            "trainer.accumulate", "scheduler.patience")
NON_NEGATIVE = ("data.image_size", "data.train_limit", "data.test_limit", "data.val_size", "data.crop_padding",
                "data.cutout", "trainer.grad_clip", "trainer.num_threads", "trainer.checkpoint_every",
                "trainer.max_skipped", "scheduler.eta_min", "scheduler.warmup", "trainer.keep_snapshots",
                "trainer.snapshot_every", "trainer.label_smoothing")


def _get(cfg: DictConfig, key: str) -> Any:
    node = cfg
    for part in key.split("."):
        if not isinstance(node, DictConfig) or part not in node:
            return None
        node = node[part]
    return node


def check_config(cfg: DictConfig) -> None:
    """Raise SnapensError naming the first key whose value is out of range.

    Checks that need the data (a budget that ends inside a cycle, for one) are made where the steps are known.
    """
    for key, allowed in CHOICES.items():
        value = _get(cfg, key)
        if value is not None and value not in allowed:
            raise SnapensError(f"{key}={value} is not allowed; choose one of: {', '.join(allowed)}")
    for key in POSITIVE:
        value = _get(cfg, key)
        if value is not None and not 0 < value < float("inf"):
            raise SnapensError(f"{key}={value} must be a finite number > 0")
    for key in NON_NEGATIVE:
        value = _get(cfg, key)
        if value is not None and value < 0:
            raise SnapensError(f"{key}={value} must be >= 0")
    eta_min, eta_max = _get(cfg, "scheduler.eta_min"), cfg.scheduler.eta_max
    if eta_min is not None and eta_min > eta_max:
        raise SnapensError(f"scheduler.eta_min={eta_min} must not exceed scheduler.eta_max={eta_max}")
    if cfg.trainer.label_smoothing >= 1:
        raise SnapensError(f"trainer.label_smoothing={cfg.trainer.label_smoothing} must be in [0, 1)")
    swa = cfg.trainer.swa.start
    if swa is not None and not 0 <= swa < 1:
        raise SnapensError(f"trainer.swa.start={swa} must be a fraction of the cycle in [0, 1), or null to disable")
    if cfg.scheduler.name == "adaptive_sgdr":
        if cfg.trainer.snapshot_every:
            raise SnapensError("trainer.snapshot_every does not go with scheduler=adaptive_sgdr, whose snapshots "
                               "follow the cycles it adapts; leave trainer.snapshot_every=0")
        if cfg.scheduler.warmup_every_cycle:
            raise SnapensError("scheduler.warmup_every_cycle does not go with scheduler=adaptive_sgdr: an extension "
                               "may cut a later cycle shorter than the warmup; leave warmup_every_cycle=false")
        if cfg.scheduler.extension_factor <= 1:
            raise SnapensError(f"scheduler.extension_factor={cfg.scheduler.extension_factor} must be > 1")
        if not _get(cfg, "data.val_size"):
            raise SnapensError("scheduler=adaptive_sgdr watches the validation loss: hold out images with "
                               "data.val_size=N")
    if cfg.scheduler.name in ("sgdr", "adaptive_sgdr") and cfg.scheduler.T_mult < 1:
        raise SnapensError(f"scheduler.T_mult={cfg.scheduler.T_mult} must be >= 1 (cycles never shrink)")
    if _get(cfg, "scheduler.warmup") and cfg.scheduler.warmup >= _budget(cfg):
        raise SnapensError(f"scheduler.warmup={cfg.scheduler.warmup} must be shorter than the budget "
                           f"(trainer.epochs={cfg.trainer.epochs})")


def _budget(cfg: DictConfig) -> float:
    """The budget in the schedule's unit when that is epochs; for steps, +inf (checked once steps are known)."""
    return cfg.trainer.epochs if cfg.scheduler.unit == "epoch" else float("inf")
