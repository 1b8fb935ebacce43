"""Time and peak memory of evaluating M snapshots: `python -m snapens.ensemble` against the naive way, in one run.

How it measures: docs/benchmarks.md. Usage:

    python scripts/bench_ensemble.py --quick                                     # CPU smoke run, synthetic, < 1 min
    python scripts/bench_ensemble.py --root /tmp/data/cifar10-jpeg              # CPU: ResNet-20, M=5, 10,000 images
    python scripts/bench_ensemble.py --root /tmp/data/cifar10-jpeg --model wrn28_10 --images 100 --batch-size 100
                                            # CPU, memory: 5 x 146 MB of weights in the naive process
    python scripts/bench_ensemble.py --root DIR --device cuda --model wrn28_10   # GPU"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf
from PIL import Image
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Subset
from torchvision import transforms
from torchvision.datasets import ImageFolder

from snapens.build import build_data, build_model, pick_device, pick_precision, snapshot_metadata
from snapens.models import model_from_metadata
from snapens.config import register_configs
from snapens.data import Split, load_image_folder, make_synthetic
from snapens.ensemble.cache import predict_logits
from snapens.ensemble.batched import stacked_logits
from snapens.precision import autocast, describe, layout
from snapens.snapshots import list_snapshots, load_into, read_metadata, save_snapshot, snapshot_path
from snapens.step import seconds_since

CONF = Path(__file__).resolve().parents[1] / "conf"
# Runs a module (`-m`) or a script in this process, then prints its own time, CPU time and peak RSS (KiB).
CHILD = """
import atexit, resource, runpy, sys, time
start = time.perf_counter()
def report():
    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime
    print("BENCH", time.perf_counter() - start, cpu, me.ru_maxrss, kids.ru_maxrss, flush=True)
atexit.register(report)
sys.argv = sys.argv[1:]
if sys.argv[0].endswith(".py"):
    runpy.run_path(sys.argv[0], run_name="__main__")
else:
    runpy.run_module(sys.argv[0], run_name="__main__", alter_sys=True)
"""


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--root", help="ImageFolder tree ROOT/{train,test}/<class>/* (e.g. CIFAR-10 as JPEG); "
                                  "default: synthetic images written as PNG")
    p.add_argument("--model", default="resnet20", help="a name of conf/model/*.yaml")
    p.add_argument("--snapshots", type=int, help="M snapshots (default 5; --quick: 3)")
    p.add_argument("--images", type=int, help="N test images, data.test_limit (default 10000; --quick: 500)")
    p.add_argument("--batch-size", type=int, default=1000)
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto")
    p.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                   help="of both contenders (auto: bf16 on CUDA, fp32 on CPU)")
    p.add_argument("--no-channels-last", dest="channels_last", action="store_false", help="both contenders in NCHW")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="OMP_NUM_THREADS of both contenders")
    p.add_argument("--workdir", help="where the run dir goes (kept); default: a temporary folder")
    p.add_argument("--quick", action="store_true", help="M=3, N=500: a smoke run")
    p.add_argument("--repeats", type=int, default=1, help="alternations of the contenders; medians reported")
    p.add_argument("--json", help="also write the numbers to this file")
    p.add_argument("--naive", metavar="RUN", help=argparse.SUPPRESS)  # the naive contender's process
    a = p.parse_args()
    a.snapshots = a.snapshots or (3 if a.quick else 5)
    a.images = a.images or (500 if a.quick else 10_000)
    return a


def write_synthetic(root: Path, test_size: int) -> Path:
    """make_synthetic's images as PNG files in ROOT/{train,test}/<class>/, so both contenders read files."""
    train, test, classes = make_synthetic(10, 256, test_size, 32)
    for name, split in (("train", train), ("test", test)):
        for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
            (root / name / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / name / classes[label] / f"{i:05d}.png")
    return root


def make_run(args, work: Path) -> tuple[Path, int]:
    """A run dir with .hydra/config.yaml and M snapshots; the data decoded and its files read once."""
    for old in ("run", "synthetic"):
        shutil.rmtree(work / old, ignore_errors=True)
    root = Path(args.root).resolve() if args.root else write_synthetic(work / "synthetic", args.images)
    classes = [d for d in (root / "train").iterdir() if d.is_dir() and not d.name.startswith(".")]
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("config", overrides=["data=imagefolder", f"data.root={root}", f"model={args.model}",
                                           f"data.num_classes={len(classes)}", f"data.test_limit={args.images}"])
    data = build_data(cfg.data)  # decodes once into the cache snapens reads; mean/std as training computes them
    run = work / "run"
    (run / ".hydra").mkdir(parents=True)
    (run / "test_index.json").write_text(json.dumps(test_index(root, cfg.data.image_size, data.test)))
    for path in (root / "test").rglob("*"):
        if path.is_file():
            path.read_bytes()  # into the page cache for the naive contender
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    meta = snapshot_metadata(cfg, data)
    for cycle in range(1, args.snapshots + 1):
        torch.manual_seed(cycle)
        save_snapshot(snapshot_path(run, cycle), build_model(cfg.model),
                      {**meta, "cycle": cycle, "step": 100 * cycle, "epoch": float(cycle), "lr": 0.0})
    return run, len(data.test)


def test_index(root: Path, image_size: int, test: Split) -> list[int]:
    """Index in the whole ROOT/test (ImageFolder's order) of each image of snapens' test split, by pixels and label."""
    _, full, _ = load_image_folder(str(root), image_size)
    where = {(x.numpy().tobytes(), int(y)): i for i, (x, y) in enumerate(zip(full.images, full.labels))}
    return [where[(x.numpy().tobytes(), int(y))] for x, y in zip(test.images, test.labels)]


@torch.no_grad()
def naive(run: Path, batch_size: int, device: torch.device, precision: torch.dtype | None, channels_last: bool) -> None:
    """Every model in memory, one DataLoader pass per model, mean logits; writes run/naive.safetensors."""
    root = OmegaConf.load(run / ".hydra" / "config.yaml").data.root
    models, metas = [], []
    for path in sorted((run / "snapshots").glob("cycle_*.safetensors")):
        metas.append(read_metadata(path))
        model = model_from_metadata(metas[-1]["model_config"], f"snapshot {path}")  # the allow-list, as snapens
        model.load_state_dict(load_file(path))
        models.append(model.to(device, memory_format=layout(channels_last)).eval())
    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(metas[0]["mean"], metas[0]["std"])])
    dataset = ImageFolder(str(Path(root) / "test"), transform)
    index = json.loads((run / "test_index.json").read_text())  # the N images snapens evaluates, in its order
    loader = DataLoader(Subset(dataset, index), batch_size=batch_size, num_workers=os.cpu_count(),
                        pin_memory=device.type == "cuda")
    with autocast(device, precision):
        logits = torch.stack([torch.cat([m(x.to(device).contiguous(memory_format=layout(channels_last))).float().cpu()
                                         for x, _ in loader]) for m in models]).mean(0)
    labels = torch.tensor([dataset.targets[i] for i in index])
    acc = (logits.argmax(-1) == labels).double().mean().item()
    save_file({"logits": logits}, run / "naive.safetensors", metadata={"acc": repr(acc)})


def run_child(argv: list[str], threads: int) -> dict:
    """Run CHILD with argv in a fresh interpreter; its wall time from here, and what it reports of itself."""
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-c", CHILD, *argv], capture_output=True, text=True,
                          env={**os.environ, "OMP_NUM_THREADS": str(threads)})
    wall = time.perf_counter() - start
    lines = [line.split() for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    if proc.returncode or not lines:
        sys.exit(f"{' '.join(argv[:1])} failed (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}")
    own, cpu, rss, children = map(float, lines[-1][1:])
    return {"wall_s": wall, "own_s": own, "cpu_s": cpu, "peak_rss_mib": rss / 1024, "child_rss_mib": children / 1024}


def check(run: Path) -> dict:
    """Accuracy and mean logits of both contenders on the same images; they must agree."""
    snap_acc = json.loads((run / "ensemble" / "test" / "ensemble.json").read_text())["ensemble"]["acc"]
    cached = [load_file(run / "logits" / "test" / p.name)["logits"] for p in list_snapshots(run)]
    with safe_open(run / "naive.safetensors", framework="pt") as f:
        naive_logits, naive_acc = f.get_tensor("logits"), float(f.metadata()["acc"])
    diff = (torch.stack(cached).mean(0) - naive_logits).abs().max().item()
    return {"snapens_acc": snap_acc, "naive_acc": naive_acc, "max_abs_logit_diff": diff,
            "agree": abs(snap_acc - naive_acc) <= 1e-9}


def batched_vs_sequential(run: Path, batch_size: int, device: torch.device, precision: torch.dtype | None,
                          channels_last: bool, repeats: int, threads: int) -> dict:
    """The run's M snapshots over its test split in this process: one model at a time (the ensemble tool's default)
    and all in one vmapped pass (its batched=true); medians of `repeats` timed passes (after an untimed warm-up
    on a GPU); the logits must agree within 1e-4 in fp32 (0.1 under bf16 autocast). Prints its lines."""
    torch.set_num_threads(threads)
    split = build_data(OmegaConf.load(run / ".hydra" / "config.yaml").data).test.to(device)
    paths = list_snapshots(run)
    metas = [read_metadata(p) for p in paths]
    models = []
    for path, meta in zip(paths, metas):
        model = model_from_metadata(meta["model_config"], str(path))
        load_into(model, path)
        models.append(model.to(device))
    mean, std = metas[0]["mean"], metas[0]["std"]
    contenders = {
        "one at a time": lambda: torch.stack([predict_logits(m, split, mean, std, batch_size, device, precision,
                                                             channels_last) for m in models]),
        "batched (vmap)": lambda: stacked_logits(models, split, mean, std, batch_size, device, precision,
                                                 channels_last)}
    seconds, logits = {}, {}
    for name, run_all in contenders.items():
        if device.type == "cuda":
            run_all()  # kernel selection and allocator warm-up, not timed
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            logits[name] = run_all()
            times.append(seconds_since(start, device))
        seconds[name] = statistics.median(times)
    diff = (logits["one at a time"] - logits["batched (vmap)"]).abs().max().item()
    ratio = seconds["one at a time"] / seconds["batched (vmap)"]
    print(f"forward passes of {len(models)} snapshots over {len(split)} images, in this process ({threads} threads): "
          + ", ".join(f"{k} {v:.2f} s" for k, v in seconds.items()))
    print(f"one at a time / batched time: {ratio:.2f}x (above 1: batched is faster); max |logit difference| {diff:.3g}")
    tolerance = 1e-4 if precision is None else 0.1  # bf16 logits round in steps of ~0.01, and the kernels differ
    return {"seconds": seconds, "ratio": ratio, "max_abs_logit_diff": diff, "agree": diff <= tolerance}


def print_results(median: dict, runs: dict, logits_s: float, ratios: dict, agreement: dict, m: int, n: int) -> None:
    """The contenders' table, the ratios and the agreement line."""
    print(f"{'contender':<16}{'wall s':>9}{'own s':>9}{'CPU s':>9}{'peak RSS MiB':>14}{'child RSS MiB':>15}"
          "   runs (wall s)")
    for name, r in median.items():
        walls = ", ".join(f"{x['wall_s']:.1f}" for x in runs[name])
        print(f"{name:<16}{r['wall_s']:>9.2f}{r['own_s']:>9.2f}{r['cpu_s']:>9.2f}{r['peak_rss_mib']:>14.1f}"
              f"{r['child_rss_mib']:>15.1f}   {walls}")
    print(f"snapens forward passes of {m} snapshots over {n} images (logits s, cold cache): "
          f"{logits_s:.2f} s")
    print(f"naive / snapens time: {ratios['time']:.2f}x")
    print(f"naive / snapens peak RSS: {ratios['peak_rss']:.2f}x")
    print(f"naive / snapens (warm cache) time: {ratios['time_vs_warm']:.2f}x")
    print(f"ensemble accuracy: snapens {agreement['snapens_acc']:.6f}, naive {agreement['naive_acc']:.6f} "
          f"({'agree' if agreement['agree'] else 'DIFFER'}); max |mean logit difference| "
          f"{agreement['max_abs_logit_diff']:.3g}")


def main() -> None:
    args = parse_args()
    device = pick_device(args.device)
    precision = pick_precision(args.precision, device, key="--precision")
    if args.naive:
        return naive(Path(args.naive), args.batch_size, device, precision, args.channels_last)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(args.workdir or tmp).resolve()
        run, n = make_run(args, work)
        snap = ["snapens.ensemble", f"run={run}", f"device={args.device}", f"batch_size={args.batch_size}",
                f"precision={args.precision}", f"channels_last={args.channels_last}",
                "overwrite=true"]  # each repeat writes the same report again
        naive_argv = [str(Path(__file__).resolve()), "--naive", str(run), "--device", args.device,
                      "--batch-size", str(args.batch_size), "--precision", args.precision] + \
            ([] if args.channels_last else ["--no-channels-last"])
        runs = {"snapens": [], "snapens (warm)": [], "naive": []}
        for r in range(args.repeats):
            for name in ("snapens", "naive") if r % 2 == 0 else ("naive", "snapens"):  # alternate who goes first
                if name == "naive":
                    runs["naive"].append(run_child(naive_argv, args.threads))
                    continue
                for stale in ("logits", "ensemble"):  # a cold logits cache, then a warm one
                    shutil.rmtree(run / stale, ignore_errors=True)
                runs["snapens"].append(run_child(snap, args.threads))
                report = json.loads((run / "ensemble" / "test" / "ensemble.json").read_text())
                runs["snapens"][-1]["logits_s"] = report["logits_seconds"]
                runs["snapens (warm)"].append(run_child(snap, args.threads))
        agreement = check(run)
        batched = batched_vs_sequential(run, args.batch_size, device, precision, args.channels_last, args.repeats,
                                        args.threads)
    median = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]} for name, rs in runs.items()}
    logits_s = median["snapens"].pop("logits_s")
    ratios = {"time": median["naive"]["wall_s"] / median["snapens"]["wall_s"],
              "peak_rss": median["naive"]["peak_rss_mib"] / median["snapens"]["peak_rss_mib"],
              "time_vs_warm": median["naive"]["wall_s"] / median["snapens (warm)"]["wall_s"]}
    config = {"model": args.model, "M": args.snapshots, "images": n, "batch": args.batch_size, "device": str(device),
              "precision": describe(precision, args.channels_last, device), "torch": torch.__version__,
              "threads": args.threads, "workers": os.cpu_count(), "data": args.root or "synthetic",
              "repeats": args.repeats,
              "load1": round(os.getloadavg()[0], 2)}
    if device.type == "cuda":
        config["gpu"] = torch.cuda.get_device_name()

    print_results(median, runs, logits_s, ratios, agreement, args.snapshots, n)
    print("config: " + " ".join(f"{k}={v}" for k, v in config.items()))
    if args.json:
        Path(args.json).write_text(json.dumps({"config": config, "median": median, "runs": runs, "ratios": ratios,
                                               "logits_s": logits_s, "agreement": agreement, "batched": batched},
                                              indent=2) + "\n")
    if not agreement["agree"] or not batched["agree"]:
        sys.exit(1)


if __name__ == "__main__":
    main()
