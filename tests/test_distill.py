"""`python -m snapens.distill`: Hinton et al.'s loss and the teacher's soft targets value for value, a student that
learns from a synthetic run's ensemble and is compared with it, a kill -9 resumed bit for bit, and bad input."""

import json
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
import torch.nn.functional as F

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from snapens.checkpoint import checkpoint_path
from snapens.config import register_configs
from snapens.distill import student_config, with_given
from snapens.teacher import distillation_loss
from snapens.files import file_digest
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots
from snapens.step import StepOptions, loss_of
from snapens.ensemble.ensemble import Ensemble
from snapens.teacher import DistillationLoss, Teacher

from conftest import CONF, HANG

STUDENT = ["trainer.epochs=3", "trainer.checkpoint_every=1", "trainer.log_every=1"]  # 12 updates, one snapshot


def command(teacher, run_dir, *extra):
    return [sys.executable, "-m", "snapens.distill", f"run={teacher}", *STUDENT, *extra, f"hydra.run.dir={run_dir}"]


@pytest.fixture(scope="module")
def teacher(held_out_run, tmp_path_factory):
    """A copy of the session's finished run (3 one-epoch cycles, 32 validation images held out)."""
    copy = tmp_path_factory.mktemp("teacher") / "run"
    shutil.copytree(held_out_run, copy)
    return copy


@pytest.fixture(scope="module")
def student(teacher):
    run_dir = teacher.parent / "student"
    done = subprocess.run(command(teacher, run_dir), cwd=teacher.parent, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr[-3000:]
    return run_dir


def teacher_of(members, rule: str, temperature: float) -> Teacher:
    """A teacher over plain modules fed inputs as they are (the statistics are not used on normalised inputs)."""
    return Teacher(Ensemble(members, [0.0], [1.0], rule), temperature)


def test_soft_targets_and_loss_are_hintons():
    torch.manual_seed(0)
    members = [torch.nn.Linear(6, 4), torch.nn.Linear(6, 4)]
    x, y, out = torch.randn(5, 6), torch.tensor([0, 1, 2, 3, 0]), torch.randn(5, 4)
    z = torch.stack([m(x) for m in members]).detach()
    assert torch.allclose(teacher_of(members, "logits", 3.0)(x), (z.mean(0) / 3).softmax(-1), atol=1e-6)
    assert torch.allclose(teacher_of(members, "probs", 3.0)(x), (z / 3).softmax(-1).mean(0), atol=1e-6)
    soft = (z.mean(0) / 3).softmax(-1)
    kl = (soft * (soft.log() - (out / 3).log_softmax(-1))).sum(-1).mean()  # KL(teacher || student), per image
    for alpha in (0.0, 0.3, 1.0):
        options = StepOptions(loss=DistillationLoss(teacher_of(members, "logits", 3.0), alpha))
        expected = alpha * 9 * kl + (1 - alpha) * F.cross_entropy(out, y)
        assert loss_of(out, x, y, options).item() == pytest.approx(expected.item(), rel=1e-5)
    assert loss_of(out, x, y, StepOptions()).item() == pytest.approx(F.cross_entropy(out, y).item(), rel=1e-6)


def test_student_learns_and_is_compared_with_its_teacher(teacher, student):
    results = json.loads((student / "results.json").read_text())
    assert [p.name for p in list_snapshots(student)] == ["cycle_01.safetensors"]  # the student
    assert results["ensemble"]["acc"] > 1 / 10 + 0.1  # beats chance (10 synthetic classes) by far
    d = results["distillation"]
    theirs = json.loads((teacher / "results.json").read_text())
    assert d["teacher"]["members"] == [s["file"] for s in theirs["snapshots"]] and d["teacher"]["rule"] == "logits"
    assert d["test"]["student"] == pytest.approx({k: results["single"][k] for k in ("acc", "nll", "ece")}, abs=1e-12)
    assert d["test"]["teacher_ensemble"] == pytest.approx(
        {k: theirs["ensemble"][k] for k in ("acc", "nll", "ece")}, abs=1e-12)  # the same test split, the same logits
    assert d["test"]["teacher_last"]["acc"] == pytest.approx(theirs["single"]["acc"], abs=1e-12)
    assert d["cost"]["student"]["forward_passes_per_image"] == 1
    assert d["cost"]["teacher_ensemble"] == {"forward_passes_per_image": 3,
                                             "parameters": 3 * d["cost"]["student"]["parameters"]}
    assert set(d["calibration"]) == {"student", "teacher_last", "teacher_ensemble"}
    assert (d["teacher"]["run"], d["temperature"]) == (str(teacher), 4.0)
    assert d["teacher"]["sha256"] == [file_digest(p) for p in list_snapshots(teacher)]
    log = (student / "distill.log").read_text()
    assert "one snapshot: no ensemble to compare with it" in log and "ensemble of 1" not in log
    assert "ensemble gain over the last snapshot" not in log  # no verdict on an ensemble that is not there
    config = OmegaConf.load(student / ".hydra" / "config.yaml")
    assert config.scheduler.name == "cosine" and "distill" not in config  # a training config like any other
    done = subprocess.run([sys.executable, "-m", "snapens.ensemble", f"run={student}"], cwd=student.parent,
                          capture_output=True, text=True, timeout=HANG)  # the student is a run like any other
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((student / "ensemble/test/ensemble.json").read_text())
    assert report["ensemble"]["acc"] == pytest.approx(d["test"]["student"]["acc"], abs=1e-12)


def test_a_killed_distillation_resumes_bit_for_bit(teacher, student, tmp_path):
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(teacher, run_dir), cwd=tmp_path, stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    path = checkpoint_path(run_dir)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not (
            path.exists() and (run_dir / "metrics.jsonl").exists()):  # past the first epoch
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=HANG)
    assert not (run_dir / "results.json").exists()  # killed in training
    again = subprocess.run(command(teacher, run_dir), cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-3000:]
    assert f"resuming {run_dir} at step" in (run_dir / "distill.log").read_text()
    assert (run_dir / "snapshots/cycle_01.safetensors").read_bytes() == \
           (student / "snapshots/cycle_01.safetensors").read_bytes()


def student_of(teacher, *given: str):
    """The student's config as `python -m snapens.distill run=TEACHER given...` makes it, in this process."""
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        return student_config(compose("distill", overrides=[f"distill.run={teacher}", *given]), list(given))


def test_the_students_config_is_the_teachers_then_the_command_lines(teacher):
    student = student_of(teacher, "model.depth=14", "trainer.epochs=2", "optimizer.momentum=0.5")
    theirs = OmegaConf.load(teacher / ".hydra" / "config.yaml")
    assert student.data == theirs.data and student.model.depth == 14 and student.trainer.epochs == 2
    assert student.optimizer.momentum == 0.5 and student.optimizer.weight_decay == theirs.optimizer.weight_decay
    assert (student.scheduler.name, student.scheduler.cycles) == ("cosine", 1)
    assert student.scheduler.eta_max == theirs.scheduler.eta_max and student.trainer.seed == theirs.trainer.seed
    assert "distill" not in student  # the training schema has no distillation keys: the loss carries them
    assert (student.trainer.snapshot_every, student.trainer.swa.start) == (0, None)


def test_the_loss_records_the_teacher(teacher):
    register_configs()
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("distill", overrides=[f"distill.run={teacher}"])
        record = distillation_loss(cfg, student_config(cfg, [])).record["distill"]
    assert record["rule"] == "logits"  # the teacher run's ensemble.rule
    assert record["teacher_sha256"] == [file_digest(p) for p in list_snapshots(teacher)]


def test_the_command_line_replaces_distills_overrides_of_the_same_key_and_keeps_its_own_order():
    base = ["scheduler=cosine", "scheduler.cycles=1", "model=teacher", "scheduler.eta_max=0.05"]
    assert with_given(base, ["model.depth=10", "model=wrn16_4", "scheduler=sgdr"]) == [
        "scheduler.cycles=1", "scheduler.eta_max=0.05", "model.depth=10", "model=wrn16_4", "scheduler=sgdr"]


def test_the_teachers_sections_are_typed_and_its_eta_max_kept(teacher):
    student = student_of(teacher, "scheduler=cosine")  # a group given again keeps the teacher's eta_max
    assert student.scheduler.eta_max == OmegaConf.load(teacher / ".hydra" / "config.yaml").scheduler.eta_max
    with pytest.raises(Exception, match="optimizer.momentum"):  # typed as in training, one line (cli.hydra_error)
        student_of(teacher, "optimizer.momentum=abc")


@pytest.mark.parametrize("extra, message", [
    (["data.val_size=0"], "the student learns on the teacher run's own data"),
    (["distill.alpha=1.5"], r"distill.alpha=1.5 must be in \[0, 1\]"),
    (["distill.members=last:9"], r"distill.members=last:9 needs 1 <= K <= 3"),
    (["experiment=demo"], "experiment= sets a whole training config"),
])
def test_bad_input_is_refused_before_training(teacher, extra, message):
    """The student's config and then the loss (whose teacher takes the members=), as the command makes them before
    it trains."""
    register_configs()
    with pytest.raises(SnapensError, match=message), initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("distill", overrides=[f"distill.run={teacher}", *extra])
        distillation_loss(cfg, student_config(cfg, [o for o in extra if not o.startswith("distill.")]))


def test_bad_input_on_the_command_line_is_one_line_and_trains_nothing(teacher, tmp_path):
    run_dir = tmp_path / "refused"
    done = subprocess.run(command(teacher, run_dir, "distill.rule=vote"), cwd=tmp_path, capture_output=True,
                          text=True, timeout=HANG)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("snapens: error: distill.rule=vote: a teacher needs "
                                                             "probabilities")
    assert not run_dir.exists() or not list_snapshots(run_dir)


def test_a_changed_teacher_stops_a_resume(teacher, tmp_path):
    """The teacher's snapshot digests are in the student's config: a teacher changed under a half-trained student
    is refused on resume rather than silently teaching something else."""
    copy = tmp_path / "teacher"
    shutil.copytree(teacher, copy)
    run_dir = tmp_path / "run"
    process = subprocess.Popen(command(copy, run_dir), cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    deadline = time.monotonic() + 120
    while process.poll() is None and time.monotonic() < deadline and not (run_dir / "metrics.jsonl").exists():
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=HANG)
    last = list_snapshots(copy)[-1]
    shutil.copy(list_snapshots(copy)[0], last)  # the teacher's last snapshot replaced
    again = subprocess.run(command(copy, run_dir), cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 2 and "the config differs in distill.teacher_sha256" in again.stderr, again.stderr


def test_a_missing_or_unfinished_teacher_is_named(teacher, tmp_path):
    with pytest.raises(SnapensError, match="is not a finished snapens.train run dir"):
        student_of(tmp_path / "nothing")
    unfinished = tmp_path / "unfinished"
    shutil.copytree(teacher, unfinished)
    (unfinished / "results.json").unlink()
    with pytest.raises(SnapensError, match=r"once its training has ended"):
        student_of(unfinished)
