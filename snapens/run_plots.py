"""A run's own figures: `lr_schedule.png` (written before training) and `training.png` (at the end)."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: works on a headless machine
import matplotlib.pyplot as plt  # noqa: E402

from snapens.files import save_figure  # noqa: E402
from snapens.schedules import Schedule  # noqa: E402

MAX_POINTS = 4000  # the curve is drawn from this many steps at most, plus both sides of every restart


def schedule_points(schedule: Schedule, snapshot_steps: list[int]) -> list[int]:
    """Steps to draw: evenly spread over the budget, plus the last update of each cycle and the first of the next,
    so every restart shows as the jump it is."""
    total = schedule.total_steps
    stride = max(total // MAX_POINTS, 1)
    edges = {t for end in snapshot_steps for t in (end - 1, end) if 0 <= t < total}
    return sorted(set(range(0, total, stride)) | edges | {total - 1})


def plot_lr_schedule(schedule: Schedule, steps_per_epoch: int, snapshot_steps: list[int], path: Path) -> None:
    """Learning rate (and momentum, where the schedule sets it) against epochs, snapshot points dashed."""
    steps = schedule_points(schedule, snapshot_steps)
    epochs = [t / steps_per_epoch for t in steps]
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot(epochs, [schedule.lr(t) for t in steps], color="C0", label="learning rate")
    ax.set(xlabel="epoch", ylabel="learning rate", title=f"schedule: {schedule.total_steps} updates")
    momentum = [schedule.momentum(t) for t in steps]
    if any(m is not None for m in momentum):
        twin = ax.twinx()
        twin.plot(epochs, momentum, color="C1", label="momentum")
        twin.set_ylabel("momentum")
        twin.legend(loc="upper center")
    _mark(ax, [s / steps_per_epoch for s in snapshot_steps])
    ax.legend(loc="upper right")
    save_figure(fig, path)


def plot_training(records: list[dict], snapshot_epochs: list[float], path: Path) -> None:
    """Training loss and accuracy per epoch (metrics.jsonl records), snapshot points dashed."""
    epochs = [r["epoch"] for r in records]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, name in ((loss, "train_loss", "training loss"), (acc, "train_acc", "training accuracy")):
        ax.plot(epochs, [r[key] for r in records], "o-", ms=3)
        ax.set(xlabel="epoch", ylabel=name)
        _mark(ax, snapshot_epochs)
    fig.suptitle("training (dashed: snapshots)")
    save_figure(fig, path)


def _mark(ax, epochs: list[float]) -> None:
    for i, e in enumerate(epochs):
        ax.axvline(e, color="gray", ls="--", lw=0.8, label="snapshot" if i == 0 else None)
