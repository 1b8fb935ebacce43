"""What a run that uses part of an image folder decodes and holds (issue 22): a synthetic ImageFolder of N JPEGs of
S px is made (not kept), then a run's data is built twice, each in a fresh process with no decode cache, for
data.train_limit=L with 64 validation and 64 test images: "all" decodes both whole splits first (what snapens did
before the files were chosen by label), "used" decodes only the images chosen. Prints decoded images, seconds and
peak RSS of each, and the ratios.

    python scripts/bench_decode.py --images 4000 --size 224 --train-limit 64
"""

import argparse
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torchvision.io import write_jpeg

CLASSES = 10


def make_folder(root: Path, images: int, size: int) -> None:
    """`images` training and images // 4 test JPEGs of noise over a class colour, q75 like the CIFAR copy."""
    g = torch.Generator().manual_seed(0)
    for split, n in (("train", images), ("test", images // 4)):
        for i in range(n):
            label = i % CLASSES
            pixels = torch.randint(0, 128, (3, size, size), generator=g, dtype=torch.uint8)
            pixels[label % 3] += 100
            folder = root / split / f"class{label}"
            folder.mkdir(parents=True, exist_ok=True)
            write_jpeg(pixels, str(folder / f"{i:06d}.jpg"), quality=75)


def build(root: Path, train_limit: int, whole: bool) -> None:
    """In this process: the run's data as snapens.build builds it (whole: from the whole decoded splits)."""
    import snapens.folders
    from snapens.data import load_image_folder, prepare, scan_image_folder

    decoded, read = [], snapens.folders.read_image
    snapens.folders.read_image = lambda path, size: decoded.append(path) or read(path, size)
    start = time.perf_counter()
    splits = load_image_folder(str(root)) if whole else scan_image_folder(str(root))
    data = prepare(*splits, train_limit=train_limit, test_limit=64, val_size=64)
    print(json.dumps({"decoded": len(decoded), "seconds": time.perf_counter() - start, "train": len(data.train),
                      "peak_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))


def measure(root: Path, train_limit: int, whole: bool) -> dict:
    shutil.rmtree(root / ".snapens_cache", ignore_errors=True)
    done = subprocess.run([sys.executable, __file__, "--build", str(root), "--train-limit", str(train_limit)]
                          + (["--whole"] if whole else []), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=4000)
    parser.add_argument("--size", type=int, default=224)
    parser.add_argument("--train-limit", type=int, default=64)
    parser.add_argument("--build", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--whole", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build, args.train_limit, args.whole)
        return
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        make_folder(root, args.images, args.size)
        runs = {name: measure(root, args.train_limit, whole) for name, whole in (("all", True), ("used", False))}
    for name, r in runs.items():
        print(f"{name:>4}: {r['decoded']} images decoded, {r['seconds']:.2f} s, peak RSS {r['peak_mib']:.0f} MiB "
              f"({r['train']} training images)")
    a, u = runs["all"], runs["used"]
    print(f"{args.images} + {args.images // 4} images of {args.size} px, train_limit={args.train_limit}: used/all "
          f"{u['seconds'] / a['seconds']:.3f}x the time, {u['peak_mib'] / a['peak_mib']:.3f}x the peak RSS")


if __name__ == "__main__":
    main()
