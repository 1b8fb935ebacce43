"""Training throughput (images/s) of snapens against a plain PyTorch loop, in one run, and their ratio, per model;
seconds per CIFAR-10 epoch; and the share of a 5-cycle run's time that its snapshot writes take.

How it measures: docs/benchmarks.md. Usage:

    python scripts/bench_train.py --quick                                       # CPU smoke run, synthetic, < 1 min
    python scripts/bench_train.py --root /tmp/data/cifar10-jpeg --repeats 3     # CPU, CIFAR-10 ImageFolder
    python scripts/bench_train.py --root DIR --device cuda --train-limit 50000 --steps 100 --repeats 5 \\
        --models resnet20,resnet56,wrn16_4,wrn28_10                                                     # GPU, bf16"""

import argparse
import itertools
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from snapens.batches import train_batches
from snapens.build import Setup, build_model, pick_device, pick_precision, setup
from snapens.config import register_configs
from snapens.precision import autocast, describe
from snapens.snapshots import save_snapshot
from snapens.step import seconds_since, set_hyperparameters, train_step

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("synthetic", "imagefolder"),
                   help="default: imagefolder if --root is given, else synthetic")
    p.add_argument("--root", help="extracted ImageFolder tree: ROOT/train/<class>/*.jpg (e.g. CIFAR-10 as JPEG)")
    p.add_argument("--models", default="resnet20", help="names of conf/model/*.yaml, comma-separated")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps per contender and repeat (default 30; --quick: 4)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timed block (default 5; --quick: 2)")
    p.add_argument("--repeats", type=int, help="alternations of the two contenders; medians reported (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--train-limit", type=int, help="training images used (default 5000; --quick: 1024)")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="autocast of both contenders (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false",
                   help="snapens in NCHW like the plain loop")
    p.add_argument("--compile", action="store_true", help="torch.compile snapens' model")
    p.add_argument("--budget", type=float, default=200, help="epochs of the 5-cycle run for the snapshot share")
    p.add_argument("--quick", action="store_true", help="few steps on a small subset: a smoke run")
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args()
    a.steps = a.steps or (4 if a.quick else 30)
    a.warmup = a.warmup if a.warmup is not None else (2 if a.quick else 5)
    a.repeats = a.repeats or 1
    a.train_limit = a.train_limit or (1024 if a.quick else 5000)
    a.data = a.data or ("imagefolder" if a.root else "synthetic")
    if a.data == "imagefolder" and not a.root:
        p.error("--data imagefolder needs --root DIR")
    return a


def compose_config(model_name: str, args) -> DictConfig:
    """The training config both contenders follow: conf/ with this model, the data, batch, precision and layout."""
    overrides = [f"model={model_name}", f"data={args.data}", f"data.train_limit={args.train_limit}",
                 f"trainer.batch_size={args.batch_size}", f"trainer.device={args.device}",
                 f"trainer.precision={args.precision}", f"trainer.channels_last={args.channels_last}",
                 f"trainer.compile={args.compile}", f"trainer.seed={SEED}", f"data.subset_seed={SEED}"]
    if args.root:
        classes = [d for d in (Path(args.root) / "train").iterdir() if d.is_dir() and not d.name.startswith(".")]
        overrides += [f"data.root={args.root}", f"data.num_classes={len(classes)}"]
    else:
        overrides += [f"data.train_size={args.train_limit}", "data.test_size=16"]
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return compose("config", overrides=overrides)


def snapens_contender(s: Setup, cfg: DictConfig):
    """A step(): one update as snapens/training.py's loop makes it (snapens.build.setup); returns the number of images."""
    batches = itertools.chain.from_iterable(
        train_batches(s.train_split, s.update_size, s.generator, s.augmentation, s.data.mean, s.data.std,
                      channels_last=cfg.trainer.channels_last, drop_last=cfg.trainer.compile)
        for _ in itertools.count())  # under compile, no partial batch: it would compile again inside the timing
    state = {"step": 0, "loss_sum": torch.zeros((), device=s.device),
             "correct": torch.zeros((), device=s.device, dtype=torch.long)}

    def step() -> int:
        x, y = next(batches)
        t = state["step"]
        set_hyperparameters(s.optimizer, s.schedule.lr(t), s.schedule.momentum(t))
        result = train_step(s.forward, s.optimizer, x, y, s.step_options)
        state["loss_sum"] += result.loss * len(y)  # summed on the device: no host sync per step
        state["correct"] += (result.logits.argmax(1) == y).sum()
        state["step"] += 1
        return len(y)

    step.model = s.model
    return step


class ArrayDataset(torch.utils.data.Dataset):
    """HWC uint8 arrays and int labels, served as PIL images the way torchvision.datasets.CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data, self.targets, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def plain_contender(cfg, data, args, device, precision):
    """A step() of the textbook DataLoader loop; returns the number of images."""
    size = data.train.images.shape[-1]
    transform = transforms.Compose([transforms.RandomCrop(size, padding=4), transforms.RandomHorizontalFlip(),
                                    transforms.ToTensor(), transforms.Normalize(data.mean, data.std)])
    loader = DataLoader(ArrayDataset(data.train.images, data.train.labels, transform), batch_size=args.batch_size,
                        shuffle=True, num_workers=os.cpu_count(), pin_memory=device.type == "cuda",
                        persistent_workers=True, drop_last=False)
    torch.manual_seed(SEED)
    model = build_model(cfg.model).to(device).train()
    o = cfg.optimizer
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=o.momentum, weight_decay=o.weight_decay)
    batches = itertools.chain.from_iterable(loader for _ in itertools.count())

    def step() -> int:
        x, y = next(batches)
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with autocast(device, precision):
            loss = F.cross_entropy(model(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.trainer.grad_clip)
        optimizer.step()
        loss.item()  # what typical code does for logging
        return len(y)

    return step


def throughput(step, args, device) -> float:
    """Images/s over args.steps steps after args.warmup untimed ones."""
    for _ in range(args.warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    images = sum(step() for _ in range(args.steps))
    return images / seconds_since(start, device)


def snapshot_seconds(model: torch.nn.Module) -> float:
    """Median wall time of 3 save_snapshot calls (copy to CPU, safetensors, fsync, rename)."""
    times = []
    with tempfile.TemporaryDirectory() as tmp:
        for k in range(3):
            start = time.perf_counter()
            save_snapshot(Path(tmp) / f"cycle_{k:02d}.safetensors", model, {"cycle": k})
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure(model_name: str, args) -> dict:
    """Both contenders on one model, alternating --repeats times; medians, ratio and the snapshot share."""
    cfg = compose_config(model_name, args)
    s = setup(cfg)
    contenders = {"snapens": snapens_contender(s, cfg), "plain": plain_contender(cfg, s.data, args, s.device,
                                                                                 s.precision)}
    start = time.perf_counter()
    contenders["snapens"]()  # the first step alone: with --compile, that is where torch.compile does its work
    first = seconds_since(start, s.device)
    runs = {name: [] for name in contenders}
    for r in range(args.repeats):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):  # alternate who goes first
            runs[name].append(throughput(contenders[name], args, s.device))
    median = {name: statistics.median(v) for name, v in runs.items()}
    write = snapshot_seconds(contenders["snapens"].model)
    run_seconds = args.budget * 50_000 / median["snapens"]
    return {"model": model_name, "images_per_s": median, "runs": runs, "ratio": median["snapens"] / median["plain"],
            "first_step_s": first, "snapshot_write_s": write, "snapshot_share": 5 * write / run_seconds,
            "images": len(s.data.train)}


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device, key="--precision")
    register_configs()
    results = [measure(name, args) for name in args.models.split(",")]
    config = {"batch": args.batch_size, "device": str(device),
              "precision": describe(precision, args.channels_last, device), "compile": args.compile,
              "torch": torch.__version__, "threads": torch.get_num_threads(),
              "workers": os.cpu_count(), "images": results[0]["images"], "data": args.data, "steps": args.steps,
              "warmup": args.warmup, "repeats": args.repeats, "budget": args.budget,
              "load1": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        config["gpu"] = torch.cuda.get_device_name()

    print(f"{'model':<10}{'snapens img/s':>14}{'plain img/s':>13}{'ratio':>7}{'s/epoch(50k)':>14}"
          f"{'first step s':>14}{'snapshot s':>12}{'5 writes / run':>16}")
    for r in results:
        m = r["images_per_s"]
        print(f"{r['model']:<10}{m['snapens']:>14.1f}{m['plain']:>13.1f}{r['ratio']:>6.2f}x"
              f"{50_000 / m['snapens']:>14.2f}{r['first_step_s']:>14.2f}{r['snapshot_write_s']:>12.4f}"
              f"{100 * r['snapshot_share']:>15.4f}%")
    for r in results:
        print(f"snapens / plain throughput, {r['model']}: {r['ratio']:.2f}x  (runs, images/s: snapens "
              f"{', '.join(f'{x:.1f}' for x in r['runs']['snapens'])}; plain "
              f"{', '.join(f'{x:.1f}' for x in r['runs']['plain'])})")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "results": results}, indent=2) + "\n")


if __name__ == "__main__":
    main()
