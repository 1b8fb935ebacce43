"""Config to objects, for the entry points only: the one place where epochs become steps.

Library modules never see a config; entry points call these builders and hand the results over.
"""

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from snapens import schedules
from snapens.data import (Augmentation, Dataset, load_cifar, load_digits, load_image_folder, make_synthetic,
                          prepare)
from snapens.errors import SnapensError
from snapens.models import CifarResNet, WideResNet


def pick_device(name: str, key: str = "trainer.device") -> torch.device:
    """auto | cpu | cuda -> a torch.device; asking for CUDA where there is none is an error, not a fallback."""
    if name == "cuda" and not torch.cuda.is_available():
        raise SnapensError(f"{key}=cuda but no CUDA device is available; use {key}=cpu or auto")
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def pick_precision(name: str, device: torch.device, key: str = "trainer.precision") -> torch.dtype | None:
    """auto | bf16 | fp32 -> the autocast dtype (None: plain fp32). auto is bf16 on CUDA, where it roughly doubles
    the convolutions' speed, and fp32 on CPU, where bf16 is emulated on most processors and slower."""
    if name == "auto":
        name = "bf16" if device.type == "cuda" else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise SnapensError(f"{key}=bf16 but {torch.cuda.get_device_name()} has no bf16 support; use {key}=fp32")
    return torch.bfloat16 if name == "bf16" else None


def build_data(cfg: DictConfig) -> Dataset:
    """Load (or make) the dataset named by `cfg.data` and take its validation split and subsets."""
    if cfg.name not in ("synthetic", "digits") and OmegaConf.is_missing(cfg, "root"):
        raise SnapensError(f"data.root is required for data={cfg.name}: pass data.root=DIR "
                           + ("(DIR/train/<class>/*, DIR/test/<class>/*)" if cfg.name == "imagefolder" else ""))
    if cfg.name in ("cifar10", "cifar100"):
        train, test, classes = load_cifar(cfg.root, cfg.name, cfg.download)
    elif cfg.name == "imagefolder":
        train, test, classes = load_image_folder(cfg.root, cfg.image_size)
    elif cfg.name == "digits":
        train, test, classes = load_digits(cfg.split_seed)
    else:
        train, test, classes = make_synthetic(cfg.num_classes, cfg.train_size, cfg.test_size, cfg.size)
    if len(classes) != cfg.num_classes:
        raise SnapensError(f"data.num_classes={cfg.num_classes} but the data has {len(classes)} classes "
                           f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); "
                           f"set data.num_classes={len(classes)}")
    return prepare(train, test, classes, train_limit=cfg.train_limit, test_limit=cfg.test_limit,
                   val_size=cfg.val_size, seed=cfg.subset_seed)


def build_augmentation(cfg: DictConfig) -> Augmentation:
    """The training augmentation named by the data config (crop padding, flip, cutout)."""
    return Augmentation(padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """`cfg.model` instantiated; a constructor's complaint (a depth that is not 6n+2, say) becomes one line."""
    try:
        return instantiate(cfg)
    except InstantiationException as e:
        cause = e.__cause__ or e
        raise SnapensError(str(cause).splitlines()[0]) from None


MODEL_CLASSES = {"snapens.models.CifarResNet": CifarResNet, "snapens.models.WideResNet": WideResNet}
MODEL_ARGS = {"depth": int, "widen_factor": int, "dropout": float, "num_classes": int}


def model_from_metadata(config: dict, source: str) -> torch.nn.Module:
    """A snapshot's model from the model config stored in its metadata, without Hydra's instantiate: the file may
    come from anyone, and instantiate would call whatever `_target_` (at any depth) the file names. Only our model
    classes and plain numeric arguments are accepted."""
    config = dict(config or {})
    cls = MODEL_CLASSES.get(config.pop("_target_", None))
    bad = [k for k, v in config.items() if k not in MODEL_ARGS or type(v) not in (MODEL_ARGS[k], int)]
    if cls is None or bad:
        raise SnapensError(f"{source} names a model snapens cannot build safely ({config or 'no model config'}); "
                           f"only {', '.join(MODEL_CLASSES)} with numeric {', '.join(MODEL_ARGS)}")
    try:
        return cls(**config)
    except (TypeError, ValueError) as e:
        raise SnapensError(f"{source}: {e}") from None


def model_name(cfg: DictConfig) -> str:
    """A short name for snapshot metadata: resnet20, wrn28_10, or the class path for other models."""
    target = cfg._target_.rsplit(".", 1)[-1]
    if target == "CifarResNet":
        return f"resnet{cfg.depth}"
    if target == "WideResNet":
        return f"wrn{cfg.depth}_{cfg.widen_factor}"
    return cfg._target_


def build_optimizer(model: torch.nn.Module, cfg: DictConfig, lr: float) -> torch.optim.Optimizer:
    """SGD or AdamW over the model's parameters; optionally no weight decay on BatchNorm weights and biases."""
    decay, no_decay = [], []
    for p in model.parameters():
        (no_decay if p.ndim <= 1 and not cfg.decay_bn_and_bias else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=cfg.momentum, nesterov=cfg.nesterov)
    return torch.optim.AdamW(groups, lr=lr, betas=(cfg.beta1, cfg.beta2), eps=cfg.eps)


def _epochs(steps: int, steps_per_epoch: int) -> str:
    return f"{steps / steps_per_epoch:.6g}"


def build_schedule(cfg: DictConfig, epochs: float, steps_per_epoch: int) -> schedules.Schedule:
    """The schedule named by `cfg` (the scheduler group) over a budget of `epochs`, in optimizer steps."""
    total = round(epochs * steps_per_epoch)
    if total < 1:
        raise SnapensError(f"trainer.epochs={epochs:g} is less than one step ({steps_per_epoch} steps per epoch)")

    def steps(key: str, value: float | None = None) -> int:
        value = cfg[key] if value is None else value
        n = round(value * steps_per_epoch) if cfg.get("unit", "epoch") == "epoch" else round(value)
        if value and n < 1:
            raise SnapensError(f"scheduler.{key}={value} {cfg.unit}s is shorter than one step "
                               f"({steps_per_epoch} steps per epoch)")
        return n

    if cfg.name == "adaptive_sgdr":  # starts as SGDR (all its checks), then train.py lengthens cycles as it goes
        plain = build_schedule(OmegaConf.merge(cfg, {"name": "sgdr"}), epochs, steps_per_epoch)
        inner = getattr(plain, "inner", plain)
        ends = [0, *inner.cycle_ends()]
        lengths = tuple(b - a for a, b in zip(ends, ends[1:]))
        return schedules.with_cycle_lengths(plain, lengths)
    if cfg.name == "onecycle" and cfg.get("warmup"):
        raise SnapensError("scheduler.warmup is not for onecycle: its rise over pct_start is the warmup")
    try:
        schedule = _make(cfg, _cycle_end_near(cfg, total, epochs * steps_per_epoch, steps), steps)
        if cfg.get("warmup"):
            schedule = schedules.Warmup(schedule, steps("warmup"), cfg.warmup_every_cycle)
    except ValueError as e:
        raise SnapensError(f"scheduler={cfg.name}: {e}") from None
    _check_budget(schedule, epochs, steps_per_epoch)
    _check_cycles(cfg, schedule)
    return schedule


def _cycle_end_near(cfg: DictConfig, total: int, exact: float, steps) -> int:
    """The budget in steps, moved onto a cycle end less than one step away (cycle lengths are rounded one by one,
    so 47.5 epochs may be 18,572 steps where the rounded cycles end at 18,573)."""
    if cfg.name != "sgdr":
        return total
    try:
        ends = schedules.SGDR(cfg.eta_max, steps("T_0"), total, cfg.T_mult, cfg.eta_min, cfg.decay).ends_until(total)
    except ValueError:
        return total  # reported when the schedule itself is made
    return next((e for e in ends if abs(e - exact) < 1), total)


def _check_cycles(cfg: DictConfig, schedule: schedules.Schedule) -> None:
    """Each cycle must end at its smallest learning rate, where its snapshot is taken (arXiv 1704.00109)."""
    ends = schedule.cycle_ends()
    warmup = getattr(schedule, "warmup_steps", 0)
    if len(ends) > 1 and warmup >= ends[0]:
        raise SnapensError(f"scheduler.warmup={cfg.warmup} reaches past the end of the first cycle "
                           f"(step {ends[0]}); make it shorter than the first cycle")
    if cfg.name == "sgdr" and cfg.eta_max * cfg.decay ** (len(ends) - 1) < cfg.eta_min:
        raise SnapensError(f"scheduler.decay={cfg.decay} brings the peak of cycle {len(ends)} below "
                           f"scheduler.eta_min={cfg.eta_min}: that cycle would anneal upwards")
    if cfg.name == "step" and any(m >= schedule.total_steps for m in getattr(schedule, "milestones", ())):
        raise SnapensError(f"scheduler.milestones={list(cfg.milestones)} {cfg.unit}s: some lie at or beyond the "
                           f"budget (trainer.epochs); the learning rate would never drop there")


def _make(cfg: DictConfig, total: int, steps) -> schedules.Schedule:
    name = cfg.name
    if name == "constant":
        return schedules.Constant(cfg.eta_max, total)
    if name == "step":
        milestones = tuple(steps("milestones", m) for m in cfg.milestones)
        return schedules.StepDecay(cfg.eta_max, total, milestones, cfg.gamma)
    if name == "cosine":
        return schedules.Cosine(cfg.eta_max, total, cfg.eta_min)
    if name == "sgdr":
        return schedules.SGDR(cfg.eta_max, steps("T_0"), total, cfg.T_mult, cfg.eta_min, cfg.decay)
    if name == "snapshot":
        return schedules.Snapshot(cfg.eta_max, total, cfg.cycles, cfg.eta_min)
    if name == "onecycle":
        return schedules.OneCycle(cfg.eta_max, total, cfg.pct_start, cfg.div_factor, cfg.final_div_factor,
                                  cfg.anneal, cfg.three_phase, cfg.cycle_momentum, cfg.base_momentum,
                                  cfg.max_momentum)
    if name == "cyclic":
        down = steps("step_size_down") if cfg.step_size_down else None
        return schedules.Cyclic(cfg.eta_min, cfg.eta_max, steps("step_size_up"), total, down, cfg.mode, cfg.gamma,
                                cfg.cycle_momentum, cfg.base_momentum, cfg.max_momentum)
    raise SnapensError(f"scheduler.name={name} is not a known schedule")


def _check_budget(schedule: schedules.Schedule, epochs: float, steps_per_epoch: int) -> None:
    """A cyclic schedule's budget must end where a cycle ends, so the last snapshot is taken at a minimum."""
    total = schedule.total_steps
    inner = getattr(schedule, "inner", schedule)
    if isinstance(inner, schedules.SGDR):
        ends = inner.ends_until(total)
    elif isinstance(inner, schedules.Cyclic):
        length = inner.step_size_up + (inner.step_size_down or inner.step_size_up)
        ends = list(range(length, total + length, length))
    else:
        return
    if total not in ends:
        cycle = next(i for i, e in enumerate(ends) if e > total) + 1
        shown = [_epochs(e, steps_per_epoch) for e in ends]
        shown = ", ".join(shown if len(shown) <= 8 else shown[:3] + ["..."] + shown[-3:])
        raise SnapensError(f"trainer.epochs={epochs:g} ends inside cycle {cycle}; cycles end at {shown} epochs: "
                           "set trainer.epochs to one of them")
