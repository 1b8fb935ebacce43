"""Config to objects, for the entry points only: the one place where epochs become steps.

Library modules never see a config; entry points call these builders and hand the results over.
"""

import hashlib
import json
import math
import os
from dataclasses import dataclass, replace
from typing import Callable

import torch
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from snapens import distributed, schedules
from snapens.batches import Augmentation
from snapens.checkpoint import deciding_values
from snapens.data import SOURCES, Dataset, Listing, Split, prepare
from snapens.streaming import StorageError
from snapens.errors import SnapensError
from snapens.models import short_name
from snapens.precision import layout
from snapens.step import StepOptions
from snapens.swa import WeightAverage


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
    if name == "auto":  # a GPU that only emulates bf16 (before Ampere) runs it slower than fp32: fp32 there
        name = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False) else "fp32"
    if name == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        raise SnapensError(f"{key}=bf16 but {torch.cuda.get_device_name()} has no bf16 support; use {key}=fp32")
    return torch.bfloat16 if name == "bf16" else None


def make_deterministic(on: bool) -> None:
    """trainer.deterministic: cuDNN's and cuBLAS's deterministic kernels, and an error from any op that has none,
    so that a GPU run repeats (and resumes) bit for bit; cuDNN's autotuner (benchmark) stays off either way, as it
    may pick other kernels from one run to the next. CUBLAS_WORKSPACE_CONFIG must be set before CUDA starts, so
    this runs before anything touches the GPU. On the CPU runs already repeat without it."""
    if on:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(on)
    torch.backends.cudnn.deterministic = on
    torch.backends.cudnn.benchmark = False


def data_source(cfg: DictConfig) -> tuple[Split | Listing, Split | Listing, list[str]]:
    """The train and test splits of the dataset `cfg.data` names (an image folder's still undecoded) and its
    classes, checked against data.num_classes."""
    if OmegaConf.is_missing(cfg, "root"):
        raise SnapensError(f"data.root is required for data={cfg.name}: pass data.root=DIR (conf/data/{cfg.name}.yaml "
                           "says what DIR holds)")
    train, test, classes = SOURCES[cfg.name](cfg)  # data.name is checked against SOURCES with the config
    if len(classes) != cfg.num_classes:
        raise SnapensError(f"data.num_classes={cfg.num_classes} but the data has {len(classes)} classes "
                           f"({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}); "
                           f"set data.num_classes={len(classes)}")
    return train, test, classes


def subsets(cfg: DictConfig) -> dict:
    """`data.choose`'s arguments from the data config."""
    return dict(train_limit=cfg.train_limit, test_limit=cfg.test_limit, val_size=cfg.val_size, seed=cfg.subset_seed)


def build_data(cfg: DictConfig) -> Dataset:
    """Load (or make) the dataset named by `cfg.data`, take its validation split and subsets, in memory or streamed
    (data.storage)."""
    source = data_source(cfg)
    try:
        return prepare(*source, storage=cfg.storage, workers=cfg.workers, memory_gib=cfg.memory_gib, **subsets(cfg))
    except StorageError as e:  # only image folders stream
        raise SnapensError(f"data.storage={cfg.storage}: data={cfg.name} is loaded as arrays, not read from image "
                           f"files ({e}); use data.storage=auto, or the images as a folder (data=imagefolder)"
                           ) from None


def build_augmentation(cfg: DictConfig) -> Augmentation:
    """The training augmentation named by the data config (crop, crop padding, flip, cutout)."""
    return Augmentation(padding=cfg.crop_padding, flip=cfg.flip, cutout=cfg.cutout, crop=cfg.crop)


def build_model(cfg: DictConfig) -> torch.nn.Module:
    """`cfg.model` instantiated; a constructor's complaint (a depth that is not 6n+2, say) becomes one line."""
    try:
        return instantiate(cfg)
    except InstantiationException as e:
        message = " ".join(str(e.__cause__ or e).split("full_key:")[0].split())  # one line, however it was wrapped
        if not message.startswith("model."):
            message = f"model={cfg.get('_target_')}: {message}"
        raise SnapensError(message) from None


def model_name(cfg: DictConfig) -> str:
    """A short name for snapshot metadata (snapens.models.short_name): resnet20, torchvision.resnet18, ..."""
    return short_name(OmegaConf.to_container(cfg, resolve=True))


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


UNITS = {"epoch": "epochs", "step": "steps", "budget": "fractions of the budget"}  # scheduler.unit, as said
# A bound on the budget, so that no typo (trainer.epochs=1e30) makes the schedule walk its cycle ends for ever: 10
# million updates is 85 times ImageNet's 90 epochs of ResNet-50 at batch 256.
MAX_STEPS = 10_000_000


def build_schedule(cfg: DictConfig, epochs: float, steps_per_epoch: int) -> schedules.Schedule:
    """The schedule named by `cfg` (the scheduler group) over a budget of `epochs`, in optimizer steps.

    The schedule classes check their own arguments; their ValueError becomes one line naming the scheduler key.
    Checked here is what the config adds: lengths in its unit, a budget that ends at a cycle end, and a warmup and
    milestones that fit the cycles and the budget (on the schedule before the warmup is put in front of it).
    """
    total = round(epochs * steps_per_epoch)
    if total < 1:
        raise SnapensError(f"trainer.epochs={epochs:g} is less than one step ({steps_per_epoch} steps per epoch)")
    if total > MAX_STEPS:
        raise SnapensError(f"trainer.epochs={epochs:g} is {total:.3g} updates ({steps_per_epoch} per epoch), more than "
                           f"the {MAX_STEPS:,} snapens takes (months of training on any GPU): lower trainer.epochs")

    def steps(key: str, value: float | None = None) -> int:
        """A length of the scheduler group in optimizer steps; one <= 0 is left for the schedule class to refuse."""
        value = cfg[key] if value is None else value
        if not math.isfinite(value):
            raise SnapensError(f"scheduler.{key}={value} must be a finite number ({UNITS[cfg.unit]})")
        n = round(value * {"epoch": steps_per_epoch, "step": 1, "budget": total}[cfg.unit])
        if value > 0 and n < 1:
            raise SnapensError(f"scheduler.{key}={value} ({UNITS[cfg.unit]}) is shorter than one step "
                               f"({steps_per_epoch} steps per epoch)")
        return n

    kind = schedules.SCHEDULES.get(cfg.name)
    if kind is None:
        raise SnapensError(f"scheduler.name={cfg.name} is not a known schedule; choose one of: "
                           f"{', '.join(sorted(schedules.SCHEDULES))}")
    warmup = steps("warmup") if cfg.warmup else 0
    if cfg.cycles is not None and cfg.cycles > total:
        raise SnapensError(f"scheduler.cycles={cfg.cycles} exceeds the budget's {total} steps: every cycle needs one; "
                           f"give at most {total} (or a larger trainer.epochs)")
    try:
        schedule = _cycle_end_near(kind.from_config(cfg, total, steps), epochs * steps_per_epoch)
        _check_budget(schedule, epochs, steps_per_epoch)
        _check_cycles(cfg, schedule, steps)
        return kind.prepared(schedules.Warmup(schedule, warmup, cfg.warmup_every_cycle) if warmup else schedule)
    except ValueError as e:  # a schedule class refused an argument
        raise _key_error(cfg, e) from None


def _key_error(cfg: DictConfig, error: ValueError) -> SnapensError:
    """A schedule class's ValueError as one line under the scheduler key it is about. Its message starts with the
    argument's name, which is the key's, but for warmup_steps (scheduler.warmup, in steps)."""
    message = str(error)
    argument = message.split(" ", 1)[0].split("=", 1)[0]
    key = "warmup" if argument == "warmup_steps" else argument
    if key not in cfg:
        return SnapensError(f"scheduler={cfg.name}: {message}")
    if message.startswith((f"{key}=", f"{key} ")) and not message.startswith(f"{key} must "):  # the key leads
        return SnapensError(f"scheduler.{message}")
    if message.startswith(f"{key} must "):
        message = message.removeprefix(f"{key} ")
    return SnapensError(f"scheduler.{key}={cfg[key]}: {message}")


def _cycle_end_near(schedule: schedules.Schedule, exact: float) -> schedules.Schedule:
    """SGDR with its budget moved onto a cycle end less than one step away from `exact` steps (cycle lengths are
    rounded one by one, so 47.5 epochs may be 18,572 steps where the rounded cycles end at 18,573)."""
    if not isinstance(schedule, schedules.SGDR):
        return schedule
    total = schedule.total_steps
    return replace(schedule, total_steps=next((e for e in schedule.ends_until(total) if abs(e - exact) < 1), total))


def _check_cycles(cfg: DictConfig, schedule: schedules.Schedule, steps) -> None:
    """Each cycle must end at its smallest learning rate, where its snapshot is taken (arXiv 1704.00109)."""
    ends = schedule.cycle_ends()  # a warmup past the first cycle is refused by schedules.Warmup
    if "decay" in cfg and cfg.eta_max * cfg.decay ** (len(ends) - 1) < cfg.eta_min:
        raise SnapensError(f"scheduler.decay={cfg.decay} brings the peak of cycle {len(ends)} below "
                           f"scheduler.eta_min={cfg.eta_min}: that cycle would anneal upwards")
    if "milestones" in cfg and any(steps("milestones", m) >= schedule.total_steps for m in cfg.milestones):
        raise SnapensError(f"scheduler.milestones={list(cfg.milestones)} ({UNITS[cfg.unit]}): some lie at or beyond "
                           "the budget (trainer.epochs); the learning rate would never drop there")


def _check_budget(schedule: schedules.Schedule, epochs: float, steps_per_epoch: int) -> None:
    """A cyclic schedule's budget must end where a cycle ends, so the last snapshot is taken at a minimum."""
    total, ends = schedule.total_steps, schedule.budget_ends()
    if ends is not None and total not in ends:
        cycle = next(i for i, e in enumerate(ends) if e > total) + 1
        shown = [f"{e / steps_per_epoch:.6g}" for e in ends]
        shown = ", ".join(shown if len(shown) <= 8 else shown[:3] + ["..."] + shown[-3:])
        raise SnapensError(f"trainer.epochs={epochs:g} ends inside cycle {cycle}; cycles end at {shown} epochs: "
                           "set trainer.epochs to one of them")


@dataclass(frozen=True)
class Loss:
    """A training loss other than the labels' cross-entropy, handed in by a recipe (snapens.distill's): `make(data,
    device, precision, channels_last)` builds `loss(logits, inputs, labels)` on the run's data and device; `record`
    holds what decides it beyond the config (a distillation's teacher files and numbers), for `recipe`."""

    make: Callable[[Dataset, torch.device, torch.dtype | None, bool], Callable]
    record: dict


def recipe(cfg: DictConfig, loss: Loss | None = None) -> dict:
    """What decides a run's result: the config's values and its loss's record. A checkpoint keeps it (a resume must
    match it) and config_hash hashes it. Cross-entropy's record is `distill: None`, the key every config held until
    distillation left the training schema: hashes and checkpoints of earlier runs stay valid."""
    return {**OmegaConf.to_container(cfg, resolve=True), **(loss.record if loss else {"distill": None})}


# ---- the one setup every entry point that trains uses (train, lr_find, the benchmarks) ----------------------------
@dataclass
class Setup:
    """Everything a training run builds from its config, built in one order so that seeds mean the same thing
    everywhere (the weights are drawn first, right after torch.manual_seed(trainer.seed))."""

    device: torch.device
    precision: torch.dtype | None  # the autocast dtype; None: fp32
    model: torch.nn.Module  # the weights, in the configured memory layout: what snapshots and checkpoints save
    forward: torch.nn.Module  # what the loop calls: the model, in DDP under torchrun and compiled when asked
    swa: WeightAverage | None  # trainer.swa.start's average, copied before DDP: it keeps plain BatchNorm
    data: Dataset  # on the CPU
    train_split: Split  # data.train on the device
    schedule: schedules.Schedule  # in optimizer updates
    optimizer: torch.optim.Optimizer
    generator: torch.Generator  # on the device: decides the batch order and the augmentation
    augmentation: Augmentation
    steps_per_epoch: int
    update_size: int  # images per update, all ranks together
    step_options: StepOptions  # how each update is made


def setup(cfg: DictConfig, ranks: distributed.Ranks = distributed.Ranks(), loss: Loss | None = None) -> Setup:
    """Build what `cfg` (the training config) describes, for this process of `ranks`; a `loss` handed in replaces
    the cross-entropy."""
    trainer = cfg.trainer
    make_deterministic(trainer.deterministic)
    device = distributed.device_for(pick_device(trainer.device), ranks)
    precision = pick_precision(trainer.precision, device)
    if trainer.num_threads:
        torch.set_num_threads(trainer.num_threads)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)  # per job in a multirun sweep
    torch.manual_seed(trainer.seed)
    model = build_model(cfg.model).to(device, memory_format=layout(trainer.channels_last))  # before the data: a
    # bad model config fails in a second
    swa = WeightAverage(model) if trainer.swa.start is not None else None
    forward = distributed.wrap(model, ranks, device, trainer.sync_bn)
    forward = torch.compile(forward) if trainer.compile else forward
    data = build_data(cfg.data)
    update_size = trainer.batch_size * trainer.accumulate
    # Under torch.compile the epoch's last, smaller batch is dropped (a new batch size would compile again, inside
    # the first epoch): an epoch is then floor(N / update size) updates, and the schedule counts those.
    steps_per_epoch = len(data.train) // update_size if trainer.compile else math.ceil(len(data.train) / update_size)
    if not steps_per_epoch:
        raise SnapensError(f"trainer.compile=true drops each epoch's last partial batch, and the {len(data.train)} "
                           f"training images do not fill one update of {update_size}: lower trainer.batch_size")
    schedule = build_schedule(cfg.scheduler, trainer.epochs, steps_per_epoch)
    optimizer = build_optimizer(model, cfg.optimizer, schedule.lr(0))
    options = StepOptions(trainer.grad_clip, trainer.clip_mode, precision, trainer.on_nonfinite == "skip",
                          trainer.accumulate, trainer.label_smoothing)
    if loss is not None:  # a loss handed in (snapens.distill's), built on the data and device
        options = replace(options, loss=loss.make(data, device, precision, trainer.channels_last))
    check_fits(data.train, device)
    return Setup(device, precision, model, forward, swa, data, data.train.to(device), schedule, optimizer,
                 torch.Generator(device).manual_seed(trainer.seed), build_augmentation(cfg.data), steps_per_epoch,
                 update_size, options)


def check_fits(split: Split, device: torch.device) -> None:
    """The training split lives on the training device (batches are cut and augmented there): on a GPU it must
    leave most of the free memory to the model, its activations and the optimizer, so it may take half at most."""
    if device.type != "cuda":
        return
    need = split.images.nbytes + split.labels.nbytes
    free, total = torch.cuda.mem_get_info(device)
    if need > free / 2:
        raise SnapensError(f"the {len(split)} training images take {need / 2**30:.2f} GiB on {device}, which has "
                           f"{free / 2**30:.2f} GiB free of {total / 2**30:.2f}: more than half; train on fewer "
                           "(data.train_limit=N) or smaller (data.image_size=N) images, or free the GPU")


def snapshot_metadata(cfg: DictConfig, data: Dataset, loss: Loss | None = None) -> dict:
    """What every snapshot of the run carries besides its cycle, step, epoch and lr: enough to rebuild the model
    and its input normalisation without the run dir."""
    return {"model": model_name(cfg.model), "model_config": OmegaConf.to_container(cfg.model, resolve=True),
            "num_classes": len(data.classes), "classes": data.classes,
            "image_size": list(data.train.images.shape[2:]), "mean": list(data.mean), "std": list(data.std),
            "config_hash": config_hash(recipe(cfg, loss))}


def config_hash(recipe: dict) -> str:
    """First 16 hex digits of the SHA-256 of a recipe's values that decide the result (device, threads and logging
    left out, as on resume): tells whether two snapshots come from the same setting."""
    values = deciding_values(recipe)
    return hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()[:16]
