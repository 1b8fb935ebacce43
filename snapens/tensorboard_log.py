"""TensorBoard logging (logger=tensorboard): per log interval lr, momentum, loss, accuracy, gradient norm and clip
rate; each snapshot's test (and validation) accuracy and NLL at the end. The sums stay on the device and are read
once per interval."""

import importlib.util
from pathlib import Path

import torch

from snapens.errors import SnapensError


class IntervalStats:
    """Sums over one log interval, on the device: loss x images, correct predictions, gradient norms, clipped
    updates (those whose norm exceeded the clipping threshold)."""

    def __init__(self, device: torch.device):
        self.sums = torch.zeros(4, dtype=torch.float64, device=device)
        self.updates = self.images = 0

    def add(self, loss: torch.Tensor, correct: torch.Tensor, images: int, norm: torch.Tensor,
            grad_clip: float) -> None:
        """One update: its mean loss and correct predictions over `images` images, its gradient norm."""
        clipped = norm > grad_clip if grad_clip > 0 else torch.zeros_like(norm, dtype=torch.bool)
        self.sums += torch.stack([loss * images, correct, norm, clipped]).to(torch.float64)
        self.updates += 1
        self.images += images

    def read(self) -> dict[str, float]:
        """The interval's means (one read from the device), and a fresh interval."""
        loss, correct, norm, clipped = self.sums.tolist()
        n, images = max(self.updates, 1), max(self.images, 1)
        self.sums.zero_()
        self.updates = self.images = 0
        return {"loss": loss / images, "accuracy": correct / images, "grad_norm": norm / n, "clip_rate": clipped / n}


def require_tensorboard() -> None:
    """logger=tensorboard needs the tensorboard package, an extra: said before training starts, not at its end."""
    if importlib.util.find_spec("tensorboard") is None:
        raise SnapensError("logger=tensorboard needs the tensorboard package: pip install -e '.[tensorboard]' "
                           "(or pip install tensorboard), or use logger=none")


def open_writer(run_dir: Path, purge_step: int | None = None):
    """A SummaryWriter into <run dir>/tensorboard (imported here: only runs that log to TensorBoard need it). A
    resumed run passes its step as purge_step: events the killed run wrote after its checkpoint are dropped, as
    the resumed run writes those steps again."""
    from torch.utils.tensorboard import SummaryWriter

    return SummaryWriter(str(run_dir / "tensorboard"), purge_step=purge_step)


def log_interval(writer, stats: dict[str, float], step: int, optimizer: torch.optim.Optimizer) -> None:
    """The interval's means at `step` (updates done), with the lr and momentum (Adam: beta1) of the last update."""
    for name, value in stats.items():
        writer.add_scalar(f"train/{name}", value, step)
    group = optimizer.param_groups[0]
    writer.add_scalar("train/lr", group["lr"], step)
    momentum = group["betas"][0] if "betas" in group else group.get("momentum")
    if momentum is not None:
        writer.add_scalar("train/momentum", momentum, step)


def log_report(writer, report: dict) -> None:
    """Each snapshot's test accuracy and NLL at its step, and the ensemble's at the last step; the same on the
    validation split when the run held one out (its "val" report), and the chosen members' test accuracy."""
    last = report["snapshots"][-1]["step"]
    for split, part in (("test", report), ("val", report.get("val"))):
        if part is None:
            continue
        for snapshot, mine in zip(report["snapshots"], part["snapshots"]):
            writer.add_scalar(f"{split}/snapshot_accuracy", mine["acc"], snapshot["step"])
            if mine["nll"] is not None:
                writer.add_scalar(f"{split}/snapshot_nll", mine["nll"], snapshot["step"])
        writer.add_scalar(f"{split}/ensemble_accuracy", part["ensemble"]["acc"], last)
    for name, chosen in report.get("chosen", {}).items():
        if isinstance(chosen, dict):
            writer.add_scalar(f"test/chosen_{name}_accuracy", chosen["test"]["acc"], last)
    writer.flush()
