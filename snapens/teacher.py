"""The teacher of a distillation: a finished run's snapshot ensemble giving soft targets for a batch.

Knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv 1503.02531, section 2): the student is trained to match
the teacher's class probabilities softened by a temperature T. The teacher is a `snapens.Ensemble` of the run's
snapshots, combined as its run combines them, its targets `rules.soft_targets`: each member softened, then pooled
(see snapens.ensemble.rules for how that differs from a calibration temperature). The members run in eval mode
(BatchNorm's running statistics), under no_grad, on the same augmented batch the student sees.
"""

from pathlib import Path

import torch
import torch.nn.functional as F

from snapens.ensemble import members as found, rules
from snapens.ensemble.ensemble import Ensemble
from snapens.errors import SnapensError


class Teacher:
    """Soft targets of an ensemble: `teacher(x)` is N x C float32 probabilities at `temperature` of normalised
    inputs x."""

    def __init__(self, ensemble: Ensemble, temperature: float):
        if not rules.gives_probabilities(ensemble.rule):
            raise ValueError(f"rule={ensemble.rule}: a teacher needs probabilities, which a vote does not give; use "
                             "logits or probs")
        rules.check_temperature(temperature)
        self.ensemble, self.temperature = ensemble, float(temperature)

    @torch.no_grad()
    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        e = self.ensemble
        return rules.soft_targets(e.member_logits(x), e.rule, self.temperature, e.weights)


class DistillationLoss:
    """Hinton et al.'s (arXiv 1503.02531, section 2) loss, handed to the training step: alpha * T^2 *
    KL(teacher_T || student_T) + (1 - alpha) * cross-entropy with the labels, where the T^2 keeps the soft term's
    gradients on the scale of the hard one's as T changes; `loss(student logits, inputs, labels)`."""

    def __init__(self, teacher: Teacher, alpha: float, label_smoothing: float = 0.0):
        self.teacher, self.alpha, self.label_smoothing = teacher, alpha, label_smoothing

    def __call__(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        t = self.teacher.temperature
        hard = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
        soft = F.kl_div(F.log_softmax(out.float() / t, -1), self.teacher(x), reduction="batchmean") * t * t
        return self.alpha * soft + (1 - self.alpha) * hard


def teacher_paths(run: str | Path, members: str) -> list[Path]:
    """The snapshot files of the finished teacher run `run`, after the members= grammar."""
    if not all(Path(run, name).is_file() for name in (".hydra/config.yaml", "results.json")) \
            or not list(Path(run, "snapshots").glob("cycle_*.safetensors")):
        raise SnapensError(f"distill.run={run} is not a finished snapens.train run dir (.hydra/config.yaml, "
                           "snapshots/cycle_XX.safetensors and results.json); give the run dir of the ensemble to "
                           "distil, once its training has ended")
    try:
        return found.select(found.run_snapshots(Path(run)), members)
    except SnapensError as e:  # members=...: named as the distillation's key
        raise SnapensError(f"distill.{e}") from None


def _same(a, b) -> bool:
    """Input statistics equal to the precision JSON metadata keeps them at."""
    return [round(v, 6) for v in a] == [round(v, 6) for v in b]


def load_teacher(paths: list[Path], rule: str, temperature: float, mean, std, device: torch.device,
                 precision: torch.dtype | None, channels_last: bool, batched: bool = False) -> Teacher:
    """The snapshots at `paths` as a Teacher on `device`; each must have been trained on inputs normalised with the
    student's `mean` and `std` (the same training images), since the student's batches are fed to it as they are."""
    if not rules.gives_probabilities(rule):
        raise SnapensError(f"distill.rule={rule}: a teacher needs probabilities, which a vote does not give; use "
                           "logits or probs")
    if not 0 < temperature < float("inf"):
        raise SnapensError(f"distill.temperature={temperature} must be > 0 (Hinton et al. use 1 to 20)")
    for path, meta in zip(paths, found.read(paths)):  # every file verified first
        if not (_same(meta["mean"], mean) and _same(meta["std"], std)):
            raise SnapensError(f"teacher snapshot {path} normalises its inputs with other statistics than the "
                               "student's data: it was trained on other images; distil on the run's own data")
    try:
        ensemble = Ensemble.from_files(paths, rule, device=device, channels_last=channels_last, batched=batched,
                                       precision=precision)
        return Teacher(ensemble, temperature)
    except ValueError as e:
        raise SnapensError(f"distill: {e}") from None
