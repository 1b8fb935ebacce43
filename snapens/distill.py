"""Distil a finished run's snapshot ensemble into one model: `python -m snapens.distill run=DIR [model=...]`.

The student is trained by snapens.train itself (the same loop, schedule, clipping, checkpoints, bit-identical
resume and progress bar) on the teacher run's own training split, against a mix of the labels and the ensemble's
soft targets on the same augmented batch (Hinton et al. 2015, arXiv 1503.02531; snapens.teacher, snapens.step).
Hydra composes its config from the teacher run's saved one (as options named `teacher`), then `scheduler=cosine
scheduler.cycles=1` (one cosine over the same budget and one snapshot, the student), then the command line's; the
data are the teacher run's, verbatim, and the model too unless `model=` says otherwise. The training config has no
distillation keys: the loss is handed to snapens.train (build.Loss) with its record, the teacher's snapshot digests,
which a resume must match. distill.temperature and distill.alpha are fixed in advance (Hinton et
al.'s range), never chosen on test.

Output: a run dir like any other (snapshots/cycle_01.safetensors is the student, so `python -m snapens.ensemble
run=DIR` and `predict=` work on it), and in its results.json `distillation`: the student against the teacher's last
snapshot and whole ensemble on the test split (accuracy, NLL, ECE), each with a temperature fitted on validation
when the run held one out, and the inference cost of each.
"""

import json
import logging
import sys
from pathlib import Path

import hydra
import torch
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snapens import cli
from snapens.build import Loss, build_data, pick_device, pick_precision
from snapens.config import register_configs, schema_of
from snapens.ensemble import calibration, metrics
from snapens.ensemble.cache import cached_logits
from snapens.errors import SnapensError
from snapens.models import model_from_metadata
from snapens.files import file_digest, write_atomic
from snapens.snapshots import list_snapshots, read_metadata
from snapens.teacher import DistillationLoss, load_teacher, teacher_paths
from snapens.train import train

register_configs()
log = logging.getLogger(__name__)
TEACHERS = ("data", "model", "optimizer", "logger")  # the groups whose option the student takes from the teacher
# One cosine over the budget and one snapshot, neither SWA's nor a mid-cycle one: the student.
STUDENT = ["scheduler=cosine", "scheduler.cycles=1", "trainer.snapshot_every=0", "trainer.keep_snapshots=0",
           "trainer.swa.start=null"]


def key_of(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")


def with_given(base: list[str], given: list[str]) -> list[str]:
    """The overrides `base` (snapens.distill's own) without those whose key the command line's `given` sets, then
    `given` as typed: Hydra applies them in its own order (a group's option before any key's value)."""
    keys = {key_of(o) for o in given}
    return [o for o in base if key_of(o) not in keys] + list(given)


def teacher_options(teacher_dir: Path) -> list[str]:
    """The teacher run's saved config (.hydra/config.yaml) as options named `teacher` in Hydra's ConfigStore, one per
    training group and its trainer and ensemble keys as `+teacher=run`; returns the overrides that choose them."""
    saved = OmegaConf.load(teacher_dir / ".hydra" / "config.yaml")
    store = ConfigStore.instance()
    for group in TEACHERS:
        store.store(group=group, name="teacher", node=typed(saved, group))
    store.store(group="teacher", name="run", node={"trainer": typed(saved, "trainer"),
                                                   "ensemble": typed(saved, "ensemble")}, package="_global_")
    return [*(f"{group}=teacher" for group in TEACHERS), "+teacher=run", f"scheduler.eta_max={saved.scheduler.eta_max}"]


def typed(saved: DictConfig, group: str) -> DictConfig:
    """A section of a saved config under its schema (snapens.config.schema_of), so that an override of it is typed
    and checked as in training (optimizer.momentum=abc refused in one line, 0 stored as 0.0)."""
    schema = schema_of(saved, group)
    return OmegaConf.merge(OmegaConf.structured(schema), saved[group]) if schema else saved[group]


def student_config(cfg: DictConfig, given: list[str]) -> DictConfig:
    """The student's training config, composed by Hydra: the teacher run's saved config (its data,
    model, optimizer, logger, trainer and ensemble, as options named `teacher`), then `scheduler=cosine
    scheduler.cycles=1` at the teacher's eta_max (STUDENT), then the command line's `given`, which replaces
    those of the same key (with_given). Data stay the teacher's (data.root may move)."""
    teacher_dir = Path(cfg.distill.run)
    teacher_paths(teacher_dir, cfg.distill.members)  # a run dir with snapshots, the members allowed
    if not 0 <= cfg.distill.alpha <= 1:
        raise SnapensError(f"distill.alpha={cfg.distill.alpha} must be in [0, 1] (the soft targets' share)")
    if any(key_of(o) == "experiment" for o in given):
        raise SnapensError("experiment= sets a whole training config, and the student's starts from the teacher "
                           "run's; give the keys you want changed (model=..., trainer.epochs=...) instead")
    if any(key_of(o).startswith("data") and key_of(o) != "data.root" for o in given):
        raise SnapensError("the student learns on the teacher run's own data (its .hydra/config.yaml); leave out "
                           "data overrides (data.root=DIR alone may say where those files are now)")
    return hydra.compose("config", overrides=with_given([*STUDENT, *teacher_options(teacher_dir)], given))


def distillation_loss(cfg: DictConfig, student: DictConfig) -> Loss:
    """The loss for snapens.train: the teacher run's ensemble on the student's device, softening each member at
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

    def make(path: Path, meta: dict) -> torch.nn.Module:
        return model_from_metadata(meta.get("model_config"), f"snapshot {path}").to(device)

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


@hydra.main(version_base="1.3", config_path="../conf", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    given = [o for o in HydraConfig.get().overrides.task if not key_of(o).startswith("distill.")]

    def job() -> float | None:
        student = student_config(cfg, given)
        loss = distillation_loss(cfg, student)
        d = loss.record["distill"]
        log.info(f"run dir {run_dir}: distilling {d['run']} ({d['members']}, {d['rule']}) into "
                 f"{student.model.get('_target_', 'a model').rsplit('.', 1)[-1]}, T={d['temperature']:g}, "
                 f"alpha={d['alpha']:g}")
        accuracy = train(student, run_dir, loss)
        if student.trainer.plan_only:  # the plan alone: nothing trained to compare
            cli.discard_unused_run_dir()
            return None
        results_path = run_dir / "results.json"
        results = json.loads(results_path.read_text())
        results["distillation"] = compare(student, d, run_dir)
        write_atomic(results_path, (json.dumps(results, indent=2) + "\n").encode())
        log.info(f"\n{format_comparison(results['distillation'])}\nrun dir {run_dir}: the student is "
                 "snapshots/cycle_01.safetensors")
        return accuracy

    return cli.run_job(job)


if __name__ == "__main__":
    sys.argv = [f"distill.{a}" if a.startswith("run=") else a for a in sys.argv]  # run=DIR, as snapens.ensemble
    cli.run(main)
