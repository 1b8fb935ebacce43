"""The regime map (issue 26): where does a snapshot ensemble beat one run of the same cost?

    python scripts/regime_map.py run --root data/cifar10-jpeg --out outputs/regime   # hours on one core; resumable
    python scripts/regime_map.py list                                                # the cells and their commands

One cell is a model capacity (ResNet-8 or ResNet-20), a training-set size (1,000 or 4,000 CIFAR-10 images, 1,000
more held out for validation, the whole 10,000-image test set scored) and a budget in updates (about 2,500 or 10,000
at batch 32, so 4 cycles of about 625 or 2,500 updates), trained four ways at that one budget:

    M1    one cosine annealing (scheduler=snapshot, cycles=1): the baseline every arm pays the same for
    M4    4 equal cosine cycles, a snapshot at each end (Huang et al. 2017, arXiv 1704.00109)
    swa4  the same 4 cycles, each snapshot the average of its cycle's second half (SWA, arXiv 1803.05407)
    fge4  cosine down to alpha_1, then 4 short FGE cycles of budget/20 (Garipov et al. 2018, arXiv 1802.10026)

Each run is its own `python -m snapens.train` in OUT/<cell>/; a cell whose results.json exists is skipped, and an
unfinished one is resumed by running its command again on its run dir (trainer.resume=auto), so a killed or stopped
map picks up where it was. Runs are ordered cheapest and most telling first: M1 and M4 of every cell, short budget
first, then SWA and FGE.
"""

import argparse
import subprocess
import sys
import time
from pathlib import Path

DEPTHS = (8, 20)
# epochs that give about 2,500 and 10,000 updates at batch 32 for each training-set size
BUDGETS = {1000: (80, 320), 4000: (20, 80)}
ARMS = {
    "M1": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=1"],
    "M4": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=4"],
    "swa4": lambda epochs: ["scheduler=snapshot", "scheduler.cycles=4", "trainer.swa.start=0.5"],
    "fge4": lambda epochs: ["scheduler=fge", "scheduler.cycles=4", "scheduler.eta_max=0.2",
                            f"scheduler.cycle_length={epochs / 20:g}"],
}


def cells() -> list[tuple[str, list[str]]]:
    """(name, overrides) of every run, in the order they are trained."""
    out = []
    for arms in (("M1", "M4"), ("swa4", "fge4")):
        for budget in (0, 1):
            for size, epochs_of in BUDGETS.items():
                for depth in DEPTHS:
                    epochs = epochs_of[budget]
                    for arm in arms:
                        name = f"r{depth}_n{size}_e{epochs}_{arm}"
                        out.append((name, [f"model.depth={depth}", f"data.train_limit={size}",
                                           f"trainer.epochs={epochs}", "trainer.batch_size=32", *ARMS[arm](epochs)]))
    return out


def command(name: str, overrides: list[str], root: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "snapens.train", "experiment=study_cifar", f"data.root={root}", *overrides,
            f"hydra.run.dir={out / name}"]


def run(root: Path, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    for name, overrides in cells():
        if (out / name / "results.json").exists():
            continue
        print(f"{time.strftime('%H:%M:%S')} {name}: {' '.join(overrides)}", flush=True)
        done = subprocess.run(command(name, overrides, root, out))
        print(f"{time.strftime('%H:%M:%S')} {name}: exit {done.returncode}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("action", choices=("run", "list"))
    parser.add_argument("--root", type=Path, default=Path("data/cifar10-jpeg"), help="the CIFAR-10 ImageFolder")
    parser.add_argument("--out", type=Path, default=Path("outputs/regime"), help="one run dir per cell here")
    args = parser.parse_args()
    if args.action == "list":
        for name, overrides in cells():
            print(" ".join(command(name, overrides, args.root, args.out)[1:]))
        return
    run(args.root.resolve(), args.out.resolve())


if __name__ == "__main__":
    main()
