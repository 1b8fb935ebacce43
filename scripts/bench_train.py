"""Training throughput (images/s) of snapens against a plain PyTorch loop, in one run, and their ratio.

Both contenders train the same model (built from conf/model/<name>.yaml, same seed) with the same SGD (momentum and
weight decay from conf/optimizer/sgd.yaml), batch size, fp32, gradient clipping (norm 1.0) and torch threads, on the
same images (a seeded class-balanced subset of the training split, already decoded to uint8 tensors, so JPEG
decoding is excluded for both):

  snapens  the snapens.train path: the uint8 split on the device, snapens.data.train_batches (pad-4 crop + flip +
           normalisation on whole batches), the loop body of snapens/train.py (lr from the SGDR schedule, loss summed
           on the device).
  plain    the textbook loop: a Dataset of HWC uint8 arrays made into PIL images (as torchvision's CIFAR10),
           transforms RandomCrop(size, padding=4), RandomHorizontalFlip, ToTensor, Normalize; a DataLoader with
           shuffle, num_workers=os.cpu_count(), pin_memory on CUDA, persistent workers; loss.item() every step.

One-time setup (loading, worker start) is not timed. Each timed block of --steps steps follows --warmup untimed
steps (which also drain batches the DataLoader prefetched while the other contender ran); the contenders alternate
--repeats times and the medians are reported. Other processes on the machine make CPU numbers noisy (load1 in the
config line), badly so when they leave torch's threads fewer free cores than it uses. On a small CPU machine the
plain loop's workers and torch's intra-op threads share the cores (oversubscription): that is what a plain user
gets, so it is measured as is.

    python scripts/bench_train.py --quick                                       # CPU smoke run, synthetic, < 1 min
    python scripts/bench_train.py --root /tmp/data/cifar10-jpeg --repeats 3     # CPU, CIFAR-10 ImageFolder
    python scripts/bench_train.py --root DIR --device cuda --train-limit 50000 --steps 100 --repeats 5   # GPU
"""

import argparse
import itertools
import json
import math
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms

from snapens.build import build_augmentation, build_model, build_optimizer, build_schedule, pick_device
from snapens.config import register_configs
from snapens.data import load_image_folder, make_synthetic, prepare, train_batches
from snapens.train import set_hyperparameters, train_step

CONF = Path(__file__).resolve().parents[1] / "conf"
SEED = 0


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--data", choices=("synthetic", "imagefolder"),
                   help="default: imagefolder if --root is given, else synthetic")
    p.add_argument("--root", help="extracted ImageFolder tree: ROOT/train/<class>/*.jpg (e.g. CIFAR-10 as JPEG)")
    p.add_argument("--model", default="resnet20", help="a name of conf/model/*.yaml")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--steps", type=int, help="timed steps per contender and repeat (default 30; --quick: 4)")
    p.add_argument("--warmup", type=int, help="untimed steps before each timed block (default 5; --quick: 2)")
    p.add_argument("--repeats", type=int, help="alternations of the two contenders; medians reported (default 1)")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch.set_num_threads (default: all cores)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--train-limit", type=int, help="training images used (default 5000; --quick: 1024)")
    p.add_argument("--quick", action="store_true", help="few steps on a small subset: a smoke run")
    p.add_argument("--json", help="also write the numbers to this file")
    a = p.parse_args()
    quick = a.quick
    a.steps = a.steps or (4 if quick else 30)
    a.warmup = a.warmup if a.warmup is not None else (2 if quick else 5)
    a.repeats = a.repeats or 1
    a.train_limit = a.train_limit or (1024 if quick else 5000)
    a.data = a.data or ("imagefolder" if a.root else "synthetic")
    if a.data == "imagefolder" and not a.root:
        p.error("--data imagefolder needs --root DIR")
    return a


def load(args):
    if args.data == "imagefolder":
        train, test, classes = load_image_folder(args.root)
    else:
        train, test, classes = make_synthetic(10, args.train_limit, 16, 32, seed=SEED)
    return prepare(train, test, classes, train_limit=args.train_limit, seed=SEED)


def snapens_contender(cfg, data, args, device):
    """A step() running one update exactly as snapens/train.py does; returns the number of images."""
    torch.manual_seed(SEED)
    model = build_model(cfg.model).to(device).train()
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, math.ceil(len(data.train) / args.batch_size))
    optimizer = build_optimizer(model, cfg.optimizer, schedule.lr(0))
    split, generator = data.train.to(device), torch.Generator(device).manual_seed(SEED)
    aug = build_augmentation(cfg.data)
    batches = itertools.chain.from_iterable(
        train_batches(split, args.batch_size, generator, aug, data.mean, data.std) for _ in itertools.count())
    state = {"step": 0, "loss_sum": torch.zeros((), device=device),
             "correct": torch.zeros((), device=device, dtype=torch.long)}

    def step() -> int:
        x, y = next(batches)
        set_hyperparameters(optimizer, schedule.lr(state["step"]), schedule.momentum(state["step"]))
        loss, logits, _, _ = train_step(model, optimizer, x, y, cfg.trainer.grad_clip, cfg.trainer.clip_mode)
        state["loss_sum"] += loss * len(y)  # summed on the device: no host sync per step
        state["correct"] += (logits.argmax(1) == y).sum()
        state["step"] += 1
        return len(y)

    return step


class ArrayDataset(torch.utils.data.Dataset):
    """HWC uint8 arrays and int labels, served as PIL images the way torchvision.datasets.CIFAR10 does."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform):
        self.data, self.targets, self.transform = images.permute(0, 2, 3, 1).numpy(), labels.tolist(), transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, i: int):
        return self.transform(Image.fromarray(self.data[i])), self.targets[i]


def plain_contender(cfg, data, args, device):
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
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (time.perf_counter() - start)


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    data = load(args)
    register_configs()
    overrides = [f"model={args.model}", f"data={args.data}", f"data.num_classes={len(data.classes)}",
                 f"trainer.batch_size={args.batch_size}"] + ([f"data.root={args.root}"] if args.root else [])
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    contenders = {"snapens": snapens_contender(cfg, data, args, device),
                  "plain": plain_contender(cfg, data, args, device)}
    runs = {name: [] for name in contenders}
    for r in range(args.repeats):
        for name in (list(contenders) if r % 2 == 0 else list(contenders)[::-1]):  # alternate who goes first
            runs[name].append(throughput(contenders[name], args, device))
    median = {name: statistics.median(v) for name, v in runs.items()}
    ratio = median["snapens"] / median["plain"]

    config = {"model": args.model, "batch": args.batch_size, "device": str(device), "torch": torch.__version__,
              "threads": torch.get_num_threads(), "workers": os.cpu_count(), "images": len(data.train),
              "data": args.data, "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "load1": round(os.getloadavg()[0], 2)}

    print(f"{'contender':<10} {'images/s':>10} {'s/epoch(50k)':>13}   runs (images/s)")
    for name, v in median.items():
        print(f"{name:<10} {v:>10.1f} {50_000 / v:>13.1f}   {', '.join(f'{x:.1f}' for x in runs[name])}")
    print(f"snapens / plain throughput: {ratio:.2f}x")
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    if args.json:
        paired = [a / b for a, b in zip(runs["snapens"], runs["plain"])]  # each repeat's two blocks ran back to back
        result = {"config": config, "images_per_s": median, "runs": runs, "ratio": ratio, "ratio_per_repeat": paired}
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
