"""The teacher of a distillation: a finished run's snapshot ensemble giving soft targets for a batch.

Knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv 1503.02531, section 2): the student is trained to match
the teacher's class probabilities softened by a temperature T, q_i = exp(z_i / T) / sum_j exp(z_j / T). Here the
teacher is the ensemble, combined as its run combines it: the mean logits (rule logits) softened as one model's, or
the mean of each member's softened probabilities (rule probs). The members run in eval mode (BatchNorm's running
statistics), under no_grad, one after another on the same augmented batch the student sees.
"""

from pathlib import Path
from typing import Callable

import torch

from snapens.ensemble.batched import StackedMembers, same_architecture
from snapens.errors import SnapensError
from snapens.precision import autocast, layout
from snapens.snapshots import list_snapshots, load_into, read_metadata


class Teacher:
    """Soft targets of M snapshot models: `teacher(x)` is N x C float32 probabilities at `temperature`."""

    def __init__(self, models: list[torch.nn.Module], rule: str, temperature: float,
                 precision: torch.dtype | None = None, batched: bool = False):
        if rule not in ("logits", "probs"):
            raise SnapensError(f"distill.rule={rule}: a teacher needs probabilities, which a vote does not give; "
                               "use logits or probs")
        if not temperature > 0:
            raise SnapensError(f"distill.temperature={temperature} must be > 0 (Hinton et al. use 1 to 20)")
        self.models, self.rule, self.temperature, self.precision = models, rule, float(temperature), precision
        if batched and not same_architecture(models):
            raise SnapensError("distill.batched=true needs teacher snapshots of one architecture; leave it false")
        self.stacked = StackedMembers(models) if batched else None  # one vmapped pass for all M members

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        with autocast(x.device, self.precision):
            logits = (self.stacked(x) if self.stacked else torch.stack([model(x) for model in self.models])).float()
        if self.rule == "logits":
            return (logits.mean(0) / self.temperature).softmax(-1)
        return (logits / self.temperature).softmax(-1).mean(0)


def teacher_paths(run: str | Path, members: str) -> list[Path]:
    """The snapshot files of the teacher run `run`: all of them, or the last K (members=last:K)."""
    paths = list_snapshots(run)
    if not all(Path(run, name).is_file() for name in (".hydra/config.yaml", "results.json")) or not paths:
        raise SnapensError(f"distill.run={run} is not a finished snapens.train run dir (.hydra/config.yaml, "
                           "snapshots/cycle_XX.safetensors and results.json); give the run dir of the ensemble to "
                           "distil, once its training has ended")
    if members == "all":
        return paths
    k = members.split(":", 1)[1] if members.startswith("last:") else ""
    if not k.isdigit() or not 1 <= int(k) <= len(paths):
        raise SnapensError(f"distill.members={members} is not allowed; use all or last:K with 1 <= K <= {len(paths)}")
    return paths[-int(k):]


def _same(a, b) -> bool:
    """Input statistics equal to the precision JSON metadata keeps them at."""
    return [round(v, 6) for v in a] == [round(v, 6) for v in b]


def load_teacher(paths: list[Path], rule: str, temperature: float, mean, std, device: torch.device,
                 precision: torch.dtype | None, channels_last: bool,
                 make_model: Callable[[dict, str], torch.nn.Module], batched: bool = False) -> Teacher:
    """The snapshots at `paths` as a Teacher on `device`; each must have been trained on inputs normalised with the
    student's `mean` and `std` (the same training images), since the student's batches are fed to it as they are."""
    models = []
    for path in paths:
        meta = read_metadata(path)
        if not (_same(meta.get("mean", []), mean) and _same(meta.get("std", []), std)):
            raise SnapensError(f"teacher snapshot {path} normalises its inputs with other statistics than the "
                               "student's data: it was trained on other images; distil on the run's own data")
        model = make_model(meta.get("model_config"), f"snapshot {path}")
        load_into(model, path)
        models.append(model.to(device, memory_format=layout(channels_last)).eval())
    return Teacher(models, rule, temperature, precision, batched)
