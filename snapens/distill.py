"""Distil a finished run's snapshot ensemble into one model: `python -m snapens.distill run=DIR [model=...]`.

The student is trained by snapens.training itself (the same loop, schedule, clipping, checkpoints, bit-identical
resume and progress bar) on the teacher run's own training split, against a mix of the labels and the ensemble's
soft targets on the same augmented batch (Hinton et al. 2015, arXiv 1503.02531; snapens.teacher, snapens.step).
Hydra composes its config from the teacher run's saved one (as options named `teacher`), then `scheduler=cosine
scheduler.cycles=1` (one cosine over the same budget and one snapshot, the student), then the command line's; the
data are the teacher run's, verbatim, and the model too unless `model=` says otherwise. The training config has no
distillation keys: the loss is handed to snapens.training (build.Loss) with its record, the teacher's snapshot digests,
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
from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from snapens import cli
from snapens.errors import SnapensError
from snapens.files import write_atomic
from snapens.schemas import register_configs, schema_of

register_configs()
log = logging.getLogger("snapens.distill")  # not __main__: the name its job logs under
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
    if not all((teacher_dir / name).is_file() for name in (".hydra/config.yaml", "results.json")) \
            or not list(teacher_dir.glob("snapshots/cycle_*.safetensors")):
        raise SnapensError(f"distill.run={teacher_dir} is not a finished snapens.train run dir (.hydra/config.yaml, "
                           "snapshots/cycle_XX.safetensors and results.json); give the run dir of the ensemble to "
                           "distil, once its training has ended")
    if not 0 <= cfg.distill.alpha <= 1:
        raise SnapensError(f"distill.alpha={cfg.distill.alpha} must be in [0, 1] (the soft targets' share)")
    if any(key_of(o) == "experiment" for o in given):
        raise SnapensError("experiment= sets a whole training config, and the student's starts from the teacher "
                           "run's; give the keys you want changed (model=..., trainer.epochs=...) instead")
    if any(key_of(o).startswith("data") and key_of(o) != "data.root" for o in given):
        raise SnapensError("the student learns on the teacher run's own data (its .hydra/config.yaml); leave out "
                           "data overrides (data.root=DIR alone may say where those files are now)")
    return hydra.compose("config", overrides=with_given([*STUDENT, *teacher_options(teacher_dir)], given))


@hydra.main(version_base="1.3", config_path="../conf", config_name="distill")
def main(cfg: DictConfig) -> float | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    given = [o for o in HydraConfig.get().overrides.task if not key_of(o).startswith("distill.")]

    def job() -> float | None:
        student = student_config(cfg, given)
        from snapens.teacher import compare, distillation_loss, format_comparison  # torch: once the config holds
        from snapens.training import train

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
