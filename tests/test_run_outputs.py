"""What a run leaves besides snapshots: the plots, TensorBoard events, the NoCycle snapshots, 2-process DDP."""

import json
import math
import os
import subprocess
import sys

import pytest
from PIL import Image
from snapens.build import build_schedule
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots, read_metadata
from snapens.training import train
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from conftest import DOUBLING_CYCLES_3, EQUAL_CYCLES_2, FAST, HANG, says


def test_plots_are_written(make_cfg, tmp_path):
    train(make_cfg(*DOUBLING_CYCLES_3), tmp_path)
    for name in ("lr_schedule.png", "training.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG" and image.width > 300 and image.height > 200


def test_lr_schedule_plot_comes_before_training(make_cfg, tmp_path, monkeypatch):
    seen = []
    real = snapens_train_step()
    monkeypatch.setattr("snapens.training.train_step",
                        lambda *a, **k: seen.append((tmp_path / "lr_schedule.png").exists()) or real(*a, **k))
    train(make_cfg(*DOUBLING_CYCLES_3), tmp_path)
    assert seen and all(seen)


def snapens_train_step():
    import snapens.training
    return snapens.training.train_step


def test_tensorboard_events(make_cfg, tmp_path):
    cfg = make_cfg(*DOUBLING_CYCLES_3, "logger=tensorboard", "trainer.log_every=2", "trainer.grad_clip=0.5",
                   "data.val_size=32")
    train(cfg, tmp_path)
    events = EventAccumulator(str(tmp_path / "tensorboard"))
    events.Reload()
    scalars = events.Tags()["scalars"]
    assert {"train/lr", "train/momentum", "train/loss", "train/accuracy", "train/grad_norm", "train/clip_rate",
            "test/snapshot_accuracy", "test/ensemble_accuracy"} <= set(scalars)
    schedule = build_schedule(cfg.scheduler, cfg.trainer.epochs, steps_per_epoch=4)
    lrs = events.Scalars("train/lr")
    assert [e.step for e in lrs] == list(range(2, 13, 2))  # every 2 updates
    assert [e.value for e in lrs] == [pytest.approx(schedule.lr(e.step - 1), rel=1e-6) for e in lrs]
    assert all(0 <= e.value <= 1 for e in events.Scalars("train/clip_rate"))
    assert all(e.value > 0 for e in events.Scalars("train/grad_norm"))
    results = json.loads((tmp_path / "results.json").read_text())
    snapshot_accs = events.Scalars("test/snapshot_accuracy")
    assert [(e.step, e.value) for e in snapshot_accs] == [
        (s["step"], pytest.approx(s["acc"], rel=1e-6)) for s in results["snapshots"]]
    assert events.Scalars("test/ensemble_accuracy")[0].value == pytest.approx(results["ensemble"]["acc"], rel=1e-6)
    val_nll = events.Scalars("val/snapshot_nll")  # the validation split's numbers too, and the chosen members'
    assert [(e.step, e.value) for e in val_nll] == [
        (s["step"], pytest.approx(v["nll"], rel=1e-6))
        for s, v in zip(results["snapshots"], results["val"]["snapshots"])]
    assert events.Scalars("val/ensemble_accuracy")[0].value == pytest.approx(results["val"]["ensemble"]["acc"])
    assert events.Scalars("test/chosen_greedy_accuracy")[0].value == pytest.approx(
        results["chosen"]["greedy"]["test"]["acc"], rel=1e-6)


def test_no_tensorboard_folder_without_the_logger(make_cfg, tmp_path):
    train(make_cfg(*DOUBLING_CYCLES_3), tmp_path)
    assert not (tmp_path / "tensorboard").exists()


def test_nocycle_snapshots_every_n_epochs(make_cfg, tmp_path):
    """The NoCycle baseline: a step schedule snapshotted every 2 epochs over 6 (4 updates per epoch)."""
    train(make_cfg(*FAST, "scheduler=step", "scheduler.unit=epoch", "scheduler.milestones=[3,4.5]", "trainer.epochs=6",
                   "trainer.snapshot_every=2"), tmp_path)
    assert [read_metadata(p)["step"] for p in list_snapshots(tmp_path)] == [8, 16, 24]


def test_snapshot_every_does_not_go_with_adaptive_sgdr(make_cfg, tmp_path):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*FAST, "scheduler=adaptive_sgdr", "data.val_size=32", "trainer.snapshot_every=2",
                       "scheduler.T_0=2", "scheduler.T_mult=1", "trainer.epochs=4"), tmp_path)
    says(info.value, "trainer.snapshot_every", "leave trainer.snapshot_every=0")


@pytest.mark.slow
@pytest.mark.parametrize("extra", [[], ["trainer.batch_size=32", "trainer.accumulate=2", "trainer.swa.start=0.5"]],
                         ids=["plain", "accumulate_swa"])
def test_two_process_ddp_on_cpu_ends_with_identical_weights(tmp_path, extra):
    """torchrun with 2 CPU processes (gloo): every rank takes half of each batch (with accumulation, in 2 pieces);
    both end bit-identical, and only rank 0 writes files."""
    run_dir = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "snapens.train", *DOUBLING_CYCLES_3, *extra, f"hydra.run.dir={run_dir}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    training = json.loads((run_dir / "results.json").read_text())["training"]
    assert training["processes"] == 2
    first, second = training["rank_weights_sha256"]
    assert first == second
    assert [read_metadata(p)["step"] for p in list_snapshots(run_dir)] == [4, 12]  # 64-image updates, 32 per rank
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]  # nothing written outside the run dir
    assert math.isfinite(json.loads((run_dir / "results.json").read_text())["ensemble"]["acc"])


def test_a_sweep_submitted_again_leaves_finished_jobs_alone(tmp_path):
    """The SLURM recipe's resume path, locally: the same multirun into the same sweep dir finds every job done."""
    sweep = tmp_path / "sweep"
    command = [sys.executable, "-m", "snapens.train", "-m", *DOUBLING_CYCLES_3, "trainer.seed=0,1",
               f"hydra.sweep.dir={sweep}"]
    first = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert first.returncode == 0, first.stderr[-2000:]
    before = {p: p.stat().st_mtime_ns for p in sweep.rglob("*.safetensors")}
    assert len([p for p in before if p.parent.name == "snapshots"]) == 4  # 2 jobs x 2 cycles
    again = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr[-2000:]
    assert again.stdout.count("holds a finished run; nothing to do") + \
        again.stderr.count("holds a finished run; nothing to do") == 2
    assert {p: p.stat().st_mtime_ns for p in sweep.rglob("*.safetensors")} == before


def test_a_finished_run_with_a_lost_plot_draws_it_again(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    results = (tmp_path / "results.json").read_bytes()
    (tmp_path / "training.png").write_bytes(b"")  # what a full disk left
    (tmp_path / "lr_schedule.png").unlink()
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    for name in ("training.png", "lr_schedule.png"):
        with Image.open(tmp_path / name) as image:
            assert image.format == "PNG"
    assert (tmp_path / "results.json").read_bytes() == results


def test_a_plot_on_a_full_disk_is_one_line_and_never_an_empty_file(tmp_path, monkeypatch):
    import snapens.files
    from snapens.run_plots import plot_training
    records = [{"epoch": e, "train_loss": 1.0 / e, "train_acc": 0.1 * e} for e in (1, 2, 3)]
    plot_training(records, [1.0, 3.0], tmp_path / "training.png")
    before = (tmp_path / "training.png").read_bytes()

    def full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(snapens.files.os, "replace", full)
    with pytest.raises(SnapensError, match="cannot write .*training.png: No space left on device; the earlier file"):
        plot_training(records[:2], [1.0], tmp_path / "training.png")
    assert (tmp_path / "training.png").read_bytes() == before and not list(tmp_path.glob(".*.tmp"))
