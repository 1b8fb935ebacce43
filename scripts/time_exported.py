"""Inference speed of exported programs (python -m snapens.export), each against the others in one run, with torch
alone: `python scripts/time_exported.py ensemble.pt2 student.pt2 [--threads 1] [--images 2000]`.

Each program classifies the same random uint8 32x32 batches of 500 images after one untimed warm-up batch; the
printed images/s compare, say, an ensemble of M with its distilled student."""

import argparse
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("programs", nargs="+", help=".pt2 files written by python -m snapens.export")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--images", type=int, default=2000)
    p.add_argument("--size", type=int, default=32, help="image side in pixels (the programs' training size)")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    images = torch.randint(0, 256, (args.images, 3, args.size, args.size), dtype=torch.uint8,
                           generator=torch.Generator().manual_seed(0))
    speeds = {}
    for path in args.programs:
        model = torch.export.load(path).module()
        with torch.no_grad():
            model(images[:500])  # warm-up
            start = time.perf_counter()
            for i in range(0, args.images, 500):
                model(images[i:i + 500])
        speeds[path] = args.images / (time.perf_counter() - start)
        print(f"{path}: {speeds[path]:.0f} images/s ({args.threads} threads)")
    first = args.programs[0]
    for path in args.programs[1:]:
        print(f"{path} / {first}: {speeds[path] / speeds[first]:.2f}x the speed")


if __name__ == "__main__":
    main()
