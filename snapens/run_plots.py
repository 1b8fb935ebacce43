"""A run's own figures: `lr_schedule.png` (written before training) and `training.png` (at the end)."""

import json
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


def plot_lr_schedule(schedule: Schedule, steps_per_epoch: int, snapshot_steps: list[int], path: Path,
                     name: str = "schedule") -> None:
    """Learning rate (and momentum, where the schedule sets it) against epochs, snapshot points dashed; the legend
    sits below the axes, never over the curve."""
    steps = schedule_points(schedule, snapshot_steps)
    epochs = [t / steps_per_epoch for t in steps]
    fig, ax = plt.subplots(figsize=(7, 4))
    lines = ax.plot(epochs, [schedule.lr(t) for t in steps], color="C0", label="learning rate")
    ax.set(xlabel="epoch", ylabel="learning rate",
           title=f"{name}: {schedule.total_steps} updates, {len(snapshot_steps)} snapshots\n{run_label(path)}")
    momentum = [schedule.momentum(t) for t in steps]
    if any(m is not None for m in momentum):
        twin = ax.twinx()
        lines += twin.plot(epochs, momentum, color="C1", label="momentum")
        twin.set_ylabel("momentum")
    lines += _mark(ax, [s / steps_per_epoch for s in snapshot_steps])
    ax.legend(handles=lines, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=3, frameon=False)
    save_figure(fig, path)


def plot_training(records: list[dict], snapshot_epochs: list[float], path: Path, results: dict | None = None
                  ) -> None:
    """Training loss and accuracy per epoch (metrics.jsonl records), snapshot points dashed; with the run's
    results.json, each snapshot's test accuracy and, where the run held out a validation split, its validation
    loss (NLL), at the snapshot points."""
    epochs = [r["epoch"] for r in records]
    fig, (loss, acc) = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((loss, "train_loss", "loss"), (acc, "train_acc", "accuracy")):
        ax.plot(epochs, [r[key] for r in records], "o-", ms=3, label=f"training {name} (epoch)")
        ax.set(xlabel="epoch", ylabel=name)
        _mark(ax, snapshot_epochs)
    if results:
        at = snapshot_epochs[-len(results["snapshots"]):]  # the snapshots kept (trainer.keep_snapshots)
        acc.plot(at, [s["acc"] for s in results["snapshots"]], "D", color="C3", label="snapshot, test")
        acc.axhline(results["ensemble"]["acc"], color="C3", ls=":", label="ensemble of all, test")
        if "val" in results:
            loss.plot(at, [s["nll"] for s in results["val"]["snapshots"]], "D", color="C2",
                      label="snapshot, validation NLL")
            acc.plot(at, [s["acc"] for s in results["val"]["snapshots"]], "D", color="C2", mfc="none",
                     label="snapshot, validation")
            acc.axhline(results["val"]["ensemble"]["acc"], color="C2", ls=":", label="ensemble of all, validation")
    for ax in (loss, acc):
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.18), ncol=2, frameon=False, fontsize=8)
    fig.suptitle(f"training (dashed: snapshots), {run_label(path)}")
    save_figure(fig, path)


def run_label(path: Path) -> str:
    """The run a figure at `path` belongs to: its run dir's last two parts (<date>/<time>, or <sweep>/<job>)."""
    return "/".join(Path(path).resolve().parent.parts[-2:])


def _mark(ax, epochs: list[float]) -> list:
    """Dashed lines at the snapshot points; the first one's handle, for a legend."""
    lines = [ax.axvline(e, color="gray", ls="--", lw=0.8, label="snapshot" if i == 0 else None)
             for i, e in enumerate(epochs)]
    return lines[:1]


def plot_training_of(run_dir: Path, snapshot_steps: list[int], steps_per_epoch: int) -> None:
    """training.png from the run's metrics.jsonl (and results.json's snapshot scores once it exists), snapshots
    marked."""
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    results_path = run_dir / "results.json"
    results = json.loads(results_path.read_text()) if results_path.exists() else None
    plot_training(metrics, [e / steps_per_epoch for e in snapshot_steps], run_dir / "training.png", results)
