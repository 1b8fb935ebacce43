"""The teacher of a distillation: a finished run's snapshot ensemble giving soft targets for a batch.

Knowledge distillation (Hinton, Vinyals & Dean 2015, arXiv 1503.02531, section 2): the student is trained to match
the teacher's class probabilities softened by a temperature T. The teacher is a `snapens.Ensemble` of the run's
snapshots, combined as its run combines them, its targets `rules.soft_targets`: each member softened, then pooled
(see snapens.ensemble.rules for how that differs from a calibration temperature). The members run in eval mode
(BatchNorm's running statistics), under no_grad, on the same augmented batch the student sees.

For snapens.distill, which composes the student's config: the loss it hands to training (`distillation_loss`) and
results.json's comparison of the student with its teacher (`compare`).
"""

from pathlib import Path

import torch
import torch.nn.functional as F
from omegaconf import DictConfig, OmegaConf

from snapens.build import Loss, build_data, pick_device, pick_precision
from snapens.ensemble import calibration, metrics, members as found, rules
from snapens.ensemble.cache import cached_logits, model_maker
from snapens.ensemble.ensemble import Ensemble
from snapens.errors import SnapensError
from snapens.files import file_digest
from snapens.snapshots import list_snapshots, read_metadata


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
    """The snapshot files of the finished teacher run `run` (snapens.distill has checked it is one), after the
    members= grammar."""
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


def distillation_loss(cfg: DictConfig, student: DictConfig) -> Loss:
    """The loss for snapens.training: the teacher run's ensemble on the student's device, softening each member at
    distill.temperature, mixed with the labels' cross-entropy by distill.alpha (snapens.teacher). Its record (the
    teacher's rule and snapshot digests) is checked on resume: a changed teacher stops it."""
    d = {**OmegaConf.to_container(cfg.distill), "run": str(Path(cfg.distill.run))}  # as every earlier student had it
    d["rule"] = d["rule"] or student.ensemble.rule
    paths = teacher_paths(d["run"], d["members"])
    d["teacher_sha256"] = [file_digest(p) for p in paths]

    def make(data, device, precision, channels_last) -> DistillationLoss:
        teacher = load_teacher(paths, d["rule"], d["temperature"], data.mean, data.std, device, precision,
                               channels_last, d["batched"])
        return DistillationLoss(teacher, d["alpha"], student.trainer.label_smoothing)

    return Loss(make, {"distill": d})


def compare(student: DictConfig, d: dict, run_dir: Path) -> dict:
    """results.json's `distillation`: the student (the run's last snapshot) against the teacher's last snapshot and
    its ensemble on the test split, from each snapshot's cached logits, with temperatures fitted on validation."""
    data = build_data(student.data)
    device = pick_device(student.trainer.device)
    precision = pick_precision(student.trainer.precision, device)
    rule = d["rule"]
    members = {"student": list_snapshots(run_dir)[-1:],
               "teacher": teacher_paths(d["run"], d["members"])}
    splits = {"test": data.test, "val": data.val} if data.val is not None else {"test": data.test}

    make = model_maker(device)
    logits = {(who, name): cached_logits(paths, [read_metadata(p) for p in paths], split, name,
                                         student.ensemble.batch_size, device, make, precision,
                                         student.trainer.channels_last)
              for who, paths in members.items() for name, split in splits.items()}
    models = {"student": ("student", slice(-1, None), "logits"), "teacher_last": ("teacher", slice(-1, None), "logits"),
              "teacher_ensemble": ("teacher", slice(None), rule)}
    out = {"teacher": {"run": d["run"], "members": [p.name for p in members["teacher"]], "rule": rule,
                       "sha256": d["teacher_sha256"]},
           "temperature": d["temperature"], "alpha": d["alpha"], "test": {}, "cost": {}}
    for name, (who, take, how) in models.items():
        out["test"][name] = metrics.scores(logits[who, "test"][take], data.test.labels, how)
        paths = members[who][take]
        out["cost"][name] = {"forward_passes_per_image": len(paths),
                             "parameters": sum(sum(w.numel() for w in make(p, read_metadata(p)).parameters())
                                               for p in paths)}
        if "val" in splits:
            out.setdefault("calibration", {})[name] = calibration.calibrate(
                metrics.probabilities(logits[who, "val"][take], how), data.val.labels,
                metrics.probabilities(logits[who, "test"][take], how), data.test.labels)
    return out


def format_comparison(d: dict) -> str:
    lines = [f"{'':<30}{'acc':>8}{'nll':>8}{'ece':>8}{'nll (T)':>9}{'ece (T)':>9}{'passes':>8}{'params':>11}"]
    labels = {"student": "student (one model)", "teacher_last": "teacher's last snapshot",
              "teacher_ensemble": f"teacher ensemble of {len(d['teacher']['members'])}"}
    for name, label in labels.items():
        s, c, cost = d["test"][name], d.get("calibration", {}).get(name), d["cost"][name]
        fitted = c and c["temperature"] is not None  # None: no temperature (calibration.warnings says why)
        after = [f"{c['test']['after']['nll']:>9.4f}", f"{c['test']['after']['ece']:>9.4f}"] if fitted else \
            [f"{'-':>9}"] * 2
        lines.append(f"{label:<30}{s['acc']:>8.4f}{s['nll']:>8.4f}{s['ece']:>8.4f}{''.join(after)}"
                     f"{cost['forward_passes_per_image']:>8}{cost['parameters']:>11,}")
    lines.append("on the test split; (T): after a temperature fitted on the validation split")
    return "\n".join(lines)
