"""Streaming (data.storage=stream) against in memory (issue 22): memory as the data set grows, decode speed per
worker, and training throughput on real images.

    python scripts/bench_stream.py memory --sizes 8000 32000 64000 --size 128   # peak RSS of an epoch of loading
    python scripts/bench_stream.py cifar --root data/cifar10-jpeg                # ResNet-20 images/s, both ways
    python scripts/bench_stream.py decoders --root data/cifar10-jpeg             # Pillow against torchvision.io

`memory` makes a synthetic ImageFolder of the largest size (JPEG q75, as scripts/bench_decode.py; not kept; the
smaller ones are hard links to its first files) and, in a fresh process each, builds a run's data (the statistics'
pass over the training files) and draws one epoch of augmented batches of 128, streamed and in memory; each process
is capped at --cap-gib of address space. It prints the peak RSS, the seconds, and the peaks' ratio to the smallest
streamed one. Decoding runs in the measured process itself (--workers 0) unless asked otherwise: a worker forked from
it would report the pages it shares as its own. `cifar` trains ResNet-20 for one epoch on
--train-limit CIFAR images, same seed, in memory and streamed, --repeats times alternating, and prints the median
images/s and their ratio. `decoders`
decodes the same --train-limit files of --root's train/ with snapens' reader (Pillow) and with torchvision.io's
decode_jpeg, in this process, and prints images/s of each and how many images differ in any pixel.
"""

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_decode import CLASSES, make_folder

BATCH = 128


def linked(big: Path, root: Path, images: int) -> None:
    """`images` training and images // 4 test files of `big`, hard-linked, the same share of every class."""
    for split, n in (("train", images), ("test", images // 4)):
        for c in range(CLASSES):
            folder = root / split / f"class{c}"
            folder.mkdir(parents=True)
            for f in sorted((big / split / f"class{c}").iterdir())[:n // CLASSES]:
                os.link(f, folder / f.name)


def epoch(root: str, storage: str, workers: int) -> None:
    """In this process: the data as a run builds it, one epoch of training batches; prints what it cost."""
    import torch
    from snapens.batches import Augmentation, train_batches
    from snapens.data import prepare, scan_image_folder

    start = time.perf_counter()
    data = prepare(*scan_image_folder(root), storage=storage, workers=workers)
    built = time.perf_counter() - start
    seen = sum(len(y) for _, y in train_batches(data.train, BATCH, torch.Generator().manual_seed(0),
                                                  Augmentation(), data.mean, data.std))
    print(json.dumps({"images": seen, "build_s": built, "epoch_s": time.perf_counter() - start - built,
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(root: Path, storage: str, workers: int, cap_gib: float) -> dict:
    cap = int(cap_gib * 2**30)
    done = subprocess.run([sys.executable, __file__, "epoch", "--root", str(root), "--storage", storage,
                           "--workers", str(workers)], capture_output=True, text=True,
                          preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_AS, (cap, cap)))
    if done.returncode:
        return {"failed": (done.stderr.strip().splitlines() or ["?"])[-1][:120]}
    return json.loads(done.stdout.splitlines()[-1])


def memory(args) -> None:
    with tempfile.TemporaryDirectory() as folder:
        base = Path(folder)
        big = base / str(max(args.sizes))
        t = time.perf_counter()
        make_folder(big, max(args.sizes), args.size)
        print(f"made {max(args.sizes)} + {max(args.sizes) // 4} JPEGs of {args.size} px in "
              f"{time.perf_counter() - t:.0f} s", flush=True)
        rows = []
        for n in sorted(args.sizes):
            root = big if n == max(args.sizes) else base / str(n)
            if root != big:
                linked(big, root, n)
            for storage in ("stream", "memory"):
                r = measure(root, storage, args.workers, args.cap_gib)
                rows.append((n, storage, r))
                print(n, storage, r, flush=True)
    smallest = next(r for n, s, r in rows if s == "stream" and "failed" not in r)
    print(f"\n{'images':>7} {'storage':>7} {'peak MiB':>9} {'build s':>8} {'epoch s':>8} "
          f"{'peak / smallest stream':>22}")
    for n, storage, r in rows:
        if "failed" in r:
            print(f"{n:>7} {storage:>7} failed under the {args.cap_gib:g} GiB cap: {r['failed']}")
            continue
        print(f"{n:>7} {storage:>7} {r['peak_mib']:>9.0f} {r['build_s']:>8.1f} {r['epoch_s']:>8.1f} "
              f"{r['peak_mib'] / smallest['peak_mib']:>22.3f}")
    streamed = [r for n, s, r in rows if s == "stream" and "failed" not in r]
    for r in streamed:
        r["per_worker"] = 2 * r["images"] / (r["build_s"] + r["epoch_s"]) / max(1, args.workers)
    print(f"streamed decode: {min(r['per_worker'] for r in streamed):.0f}-{max(r['per_worker'] for r in streamed):.0f}"
          f" images/s per decoding process ({args.workers or 'the measured process itself, no'} worker processes; the "
          "statistics' pass and the epoch each read every file)")


def cifar(args) -> None:
    rates = {"memory": [], "stream": []}
    for repeat in range(args.repeats):  # alternated, the first one first every other time: a busy machine's load
        for storage in ("memory", "stream")[::1 if repeat % 2 == 0 else -1]:  # changes under both alike
            with tempfile.TemporaryDirectory() as run:
                command = [sys.executable, "-m", "snapens.train", "data=imagefolder", f"data.root={args.root}",
                           f"data.train_limit={args.train_limit}", "data.test_limit=500", f"data.storage={storage}",
                           f"data.workers={args.workers or 1}", "scheduler=cosine", "trainer.epochs=1",
                           f"trainer.num_threads={args.threads}", f"hydra.run.dir={run}"]
                subprocess.run(command, check=True, capture_output=True)
                lines = [json.loads(x) for x in (Path(run) / "metrics.jsonl").read_text().splitlines()]
                rates[storage].append(args.train_limit / lines[-1]["seconds"])  # the epoch's training time
                print(storage, f"{rates[storage][-1]:.0f} images/s", flush=True)
    median = {k: statistics.median(v) for k, v in rates.items()}
    print(f"ResNet-20, {args.train_limit} CIFAR images, {args.threads} torch thread(s), {args.workers or 1} decoding "
          f"worker(s), median of {args.repeats}: in memory {median['memory']:.0f}, streamed {median['stream']:.0f} "
          f"images/s: {median['stream'] / median['memory']:.3f}x")


def decoders(args) -> None:
    import torch
    from torchvision.io import decode_jpeg, read_file
    from snapens.images import read_image

    torch.set_num_threads(1)
    files = sorted(Path(args.root, "train").rglob("*.jpg"))[:args.train_limit]
    results = {}
    readers = {"pillow": lambda p: read_image(p, 0), "torchvision.io": lambda p: decode_jpeg(read_file(str(p)))}
    for name, read in readers.items():
        start = time.perf_counter()
        results[name] = [read(p) for p in files]
        print(f"{name}: {len(files) / (time.perf_counter() - start):.0f} images/s", flush=True)
    differ = sum(not torch.equal(a, b) for a, b in zip(*results.values()))
    print(f"{len(files)} JPEGs of {args.root}: {differ} decode to other pixels with the two")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("what", choices=("memory", "cifar", "decoders", "epoch"))
    parser.add_argument("--sizes", type=int, nargs="+", default=[8000, 32000, 64000])
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--workers", type=int, default=0, help="decoding worker processes (cifar: 1 if 0)")
    parser.add_argument("--cap-gib", type=float, default=6)
    parser.add_argument("--root", default="data/cifar10-jpeg")
    parser.add_argument("--train-limit", type=int, default=5000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--storage", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.what == "epoch":
        epoch(args.root, args.storage, args.workers)
    else:
        {"memory": memory, "cifar": cifar, "decoders": decoders}[args.what](args)


if __name__ == "__main__":
    main()
