"""Crash-safe training: kill -9 and signals resume bit-identically, non-finite steps, failed writes, resume checks."""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import snapens.files
import snapens.snapshots
import snapens.training
import torch
import torch.nn.functional as F
from PIL import Image
from snapens.checkpoint import checkpoint_path, load_checkpoint
from snapens.cli import EXIT_INTERRUPTED
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots
from snapens.training import train

from conftest import (
    DOUBLING_CYCLES_7,
    EQUAL_CYCLES_2,
    EQUAL_CYCLES_3,
    HANG,
    write_image_folder,
)

# 4 steps per epoch, cycles end after epochs 1, 3 and 7 (steps 4, 12, 28); a checkpoint after every update
RUN = [*DOUBLING_CYCLES_7, "trainer.checkpoint_every=1"]


def as_in_a_terminal():
    """SIGHUP and SIGINT at their defaults even when the tests run under nohup (which ignores SIGHUP) or were started
    in the background by a shell (which ignores SIGINT): snapens leaves an ignored signal ignored."""
    for s in (signal.SIGHUP, signal.SIGINT):
        signal.signal(s, signal.SIG_DFL)


def start(run_dir, *extra):
    """The training command, its signals as in a terminal."""
    return subprocess.Popen([sys.executable, "-m", "snapens.train", *RUN, *extra, f"hydra.run.dir={run_dir}"],
                            cwd=run_dir.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=as_in_a_terminal)


def wait_for(process, ready, timeout=HANG):
    """Until ready() or the process ended."""
    deadline = time.monotonic() + timeout
    while not ready() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)


def epoch_logged(run_dir):
    path = run_dir / "metrics.jsonl"
    return lambda: path.exists() and path.stat().st_size > 0


def snapshot_bytes(run_dir):
    return {p.name: p.read_bytes() for p in list_snapshots(run_dir)}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("straight") / "run"
    done = subprocess.run([sys.executable, "-m", "snapens.train", *RUN, f"hydra.run.dir={run_dir}"],
                          cwd=run_dir.parent, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    return run_dir


def test_kill_9_at_three_random_points_then_resume_is_bit_identical(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    rng = random.Random(os.getpid())
    kills = 0
    for _ in range(3):
        process = start(run_dir)
        wait_for(process, checkpoint_path(run_dir).exists)  # the step-0 checkpoint: setup is done
        time.sleep(rng.uniform(0, 1.5))  # anywhere in training, even before the first update
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.communicate(timeout=HANG)
        for path in list_snapshots(run_dir):  # whatever is visible under a final name is whole
            snapens.snapshots.read_metadata(path)
    assert kills >= 1
    final = subprocess.run([sys.executable, "-m", "snapens.train", *RUN, "trainer.log_every=7",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert final.returncode == 0, final.stderr
    assert not list(run_dir.rglob("*.tmp"))  # a resumed run clears what a kill left half-written
    assert snapshot_bytes(run_dir) == snapshot_bytes(uninterrupted)
    assert len(snapshot_bytes(run_dir)) == 3
    lines = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in lines] == list(range(1, 8))
    straight = [json.loads(x) for x in (uninterrupted / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_loss"] for r in lines] == [r["train_loss"] for r in straight]
    assert json.loads((run_dir / "results.json").read_text())["ensemble"] == \
        json.loads((uninterrupted / "results.json").read_text())["ensemble"]


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGUSR1,
                                    signal.SIGUSR2])
def test_a_stop_signal_checkpoints_exits_75_and_resumes(uninterrupted, tmp_path, signum):
    run_dir = tmp_path / "run"
    process = start(run_dir, "trainer.checkpoint_every=0")
    wait_for(process, epoch_logged(run_dir))  # training (and its signal handling) is under way
    process.send_signal(signum)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == EXIT_INTERRUPTED, stderr
    assert f"stopped by {signal.Signals(signum).name} after step" in stderr and "run the same command again" in stderr
    step = load_checkpoint(checkpoint_path(run_dir))["progress"]["step"]
    assert 4 <= step < 28
    if signum != signal.SIGTERM:
        return  # what follows the checkpoint is the same whichever signal stopped the run: resumed once, for SIGTERM
    again = subprocess.run([sys.executable, "-m", "snapens.train", *RUN, "trainer.checkpoint_every=0",
                            f"hydra.run.dir={run_dir}"], cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr
    assert snapshot_bytes(run_dir) == snapshot_bytes(uninterrupted)


def test_a_run_killed_before_its_first_update_resumes(uninterrupted, tmp_path):
    run_dir = tmp_path / "run"
    process = start(run_dir)
    wait_for(process, checkpoint_path(run_dir).exists)
    process.send_signal(signal.SIGKILL)
    process.communicate(timeout=HANG)
    assert load_checkpoint(checkpoint_path(run_dir))["progress"]["step"] <= 28
    again = subprocess.run([sys.executable, "-m", "snapens.train", *RUN, f"hydra.run.dir={run_dir}"],
                           cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert again.returncode == 0, again.stderr
    assert snapshot_bytes(run_dir) == snapshot_bytes(uninterrupted)


def nan_at(steps):
    """A cross_entropy that returns NaN at the given 0-based update numbers."""
    calls, real = [], F.cross_entropy

    def loss(logits, y, **kwargs):
        calls.append(1)
        value = real(logits, y, **kwargs)
        return value * float("nan") if len(calls) - 1 in steps else value

    return loss


def test_nonfinite_stop_keeps_the_last_checkpoint(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at({6}))
    with pytest.raises(SnapensError, match=r"non-finite loss or gradient at step 6 \(lr .*, loss nan, gradient "
                                           r"norm nan\); stopped, the last checkpoint is intact"):
        train(make_cfg(*RUN, "trainer.checkpoint_every=0"), tmp_path)
    assert load_checkpoint(checkpoint_path(tmp_path))["progress"]["step"] == 4  # end of epoch 1, nothing newer
    assert [p.name for p in list_snapshots(tmp_path)] == ["cycle_01.safetensors"]


def test_nonfinite_skip_drops_the_update_and_counts_it(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at({6, 9}))
    weights = []
    step = snapens.training.train_step

    def recording(model, *args, **kwargs):
        out = step(model, *args, **kwargs)
        weights.append((out.applied, [p.detach().clone() for p in model.parameters()],
                        [b.clone() for b in model.buffers()]))
        return out

    monkeypatch.setattr(snapens.training, "train_step", recording)
    train(make_cfg(*RUN, "trainer.on_nonfinite=skip"), tmp_path)
    lines = [json.loads(x) for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["skipped"] for r in lines] == [0, 1, 2, 2, 2, 2, 2]
    assert [w[0] for w in weights].count(False) == 2 and not weights[6][0]
    assert all(torch.equal(a, b) for a, b in zip(weights[5][1], weights[6][1]))  # update 6 left the weights alone
    assert all(torch.equal(a, b) for a, b in zip(weights[5][2], weights[6][2]))  # and BatchNorm's statistics
    for path in list_snapshots(tmp_path):
        state, _ = snapens.snapshots.load_snapshot(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())
    assert len(list_snapshots(tmp_path)) == 3


def test_nonfinite_skip_stops_after_max_skipped_in_a_row(make_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(torch.nn.functional, "cross_entropy", nan_at(set(range(5, 100))))
    with pytest.raises(SnapensError, match=r"at step 7 .*3 non-finite updates in a row \(trainer.max_skipped=2\)"):
        train(make_cfg(*RUN, "trainer.on_nonfinite=skip", "trainer.max_skipped=2"), tmp_path)


def test_failed_snapshot_write_leaves_earlier_files_intact(make_cfg, tmp_path, monkeypatch):
    """The second snapshot's write fails halfway (a full disk): one clear error; snapshot 1 and the checkpoint
    before it are as they were, and no partial file is visible."""
    real = snapens.files.os.replace
    state = {}

    def replace(src, dst):
        if str(dst).endswith("cycle_02.safetensors"):
            state["checkpoint"] = checkpoint_path(tmp_path).read_bytes()
            state["cycle_01"] = (tmp_path / "snapshots/cycle_01.safetensors").read_bytes()
            raise OSError(28, "No space left on device")
        return real(src, dst)

    monkeypatch.setattr(snapens.files.os, "replace", replace)
    with pytest.raises(SnapensError, match="cannot write .*cycle_02.safetensors: No space left on device"):
        train(make_cfg(*RUN, "trainer.checkpoint_every=0"), tmp_path)
    assert checkpoint_path(tmp_path).read_bytes() == state["checkpoint"]
    assert (tmp_path / "snapshots/cycle_01.safetensors").read_bytes() == state["cycle_01"]
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == ["cycle_01.safetensors"]


def test_resume_never_refuses_a_run_dir_with_a_checkpoint(make_cfg, tmp_path):
    checkpoint_path(tmp_path).parent.mkdir(parents=True)
    checkpoint_path(tmp_path).write_bytes(b"whatever")
    with pytest.raises(SnapensError, match="holds a checkpoint and trainer.resume=never"):
        train(make_cfg(*RUN, "trainer.resume=never"), tmp_path)
    with pytest.raises(SnapensError, match="checkpoint .*last.ckpt cannot be read"):
        train(make_cfg(*RUN), tmp_path)


def test_checkpoint_holds_only_tensors_and_plain_values(make_cfg, tmp_path):
    train(make_cfg(*RUN, "trainer.epochs=1"), tmp_path)
    state = torch.load(checkpoint_path(tmp_path), weights_only=True)  # would raise on anything else
    assert state["progress"]["step"] == 4 and state["snapshots"] == ["cycle_01.safetensors"]
    assert set(state["rng"]) == {"torch", "cuda", "data", "python", "numpy"}


@pytest.mark.slow
def test_campaign_kills_from_process_start_and_a_second_training_into_the_same_dir(uninterrupted, tmp_path):
    """kill -9 at random moments counted from process start (imports, setup, between the config and the first
    checkpoint, during updates and snapshot writes), then the same command finishes with the uninterrupted run's
    bytes; and two trainings started together into one dir: one trains, the other stops at once, nothing mixed."""
    run_dir = tmp_path / "run"
    rng = random.Random(1234)
    for _ in range(4):
        process = start(run_dir)
        time.sleep(rng.uniform(0, 8))
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
        process.communicate(timeout=HANG)
        for path in list_snapshots(run_dir):  # whatever is visible under a final name is whole
            snapens.snapshots.read_metadata(path)
    final = subprocess.run([sys.executable, "-m", "snapens.train", *RUN, f"hydra.run.dir={run_dir}"], cwd=tmp_path,
                           capture_output=True, text=True, timeout=HANG)
    assert final.returncode == 0, final.stderr
    assert snapshot_bytes(run_dir) == snapshot_bytes(uninterrupted)
    both = tmp_path / "both"  # two trainings started together into one new dir: one trains, the other stops at once
    jobs = [start(both) for _ in range(2)]
    outcomes = sorted((job.wait(timeout=HANG), job.pid, job.communicate()[1]) for job in jobs)
    (ok, winner, _), (refused, _, message) = outcomes
    assert (ok, refused) == (0, 2) and f"is in use by process {winner}" in message
    assert snapshot_bytes(both) == snapshot_bytes(uninterrupted)
    assert json.loads((both / "results.json").read_text())["ensemble"] == \
        json.loads((uninterrupted / "results.json").read_text())["ensemble"]


# ---- 2. resume checks its data ----------------------------------------------------------------------------------


class Killed(Exception):
    pass


def killed_after(monkeypatch, updates: int):
    """train_step raises Killed once `updates` updates are done (as kill -9 would end the process there)."""
    import snapens.training
    real, count = snapens.training.train_step, [0]

    def step(*args, **kwargs):
        if count[0] == updates:
            raise Killed()
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(snapens.training, "train_step", step)


def test_resume_refuses_data_that_changed_under_the_same_names(make_cfg, tmp_path, monkeypatch):
    root = tmp_path / "images"
    write_image_folder(root)
    overrides = [*EQUAL_CYCLES_3, "data=imagefolder", f"data.root={root}", "data.num_classes=4",
                 "trainer.batch_size=16", "trainer.checkpoint_every=1"]
    killed_after(monkeypatch, 5)
    with pytest.raises(Killed):
        train(make_cfg(*overrides), tmp_path / "run")
    monkeypatch.undo()
    first = sorted((root / "train").rglob("*.png"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)  # same name, same count, other pixels
    with pytest.raises(SnapensError, match="cannot resume .*: the train images differ from those it started with"):
        train(make_cfg(*overrides), tmp_path / "run")
    first.unlink()  # one image fewer
    with pytest.raises(SnapensError, match="the train images differ"):
        train(make_cfg(*overrides), tmp_path / "run")
    assert load_checkpoint(checkpoint_path(tmp_path / "run"))["progress"]["step"] == 5  # nothing was changed


# ---- 4. a run killed before its first checkpoint ----------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(make_cfg, tmp_path, monkeypatch):
    import snapens.training
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "whole")

    def killed(run):
        raise Killed()

    monkeypatch.setattr(snapens.training, "save_progress", killed)  # dies right after writing .hydra/config.yaml
    with pytest.raises(Killed):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists() and not checkpoint_path(tmp_path / "run").exists()
    with pytest.raises(SnapensError, match="holds the config of a run that never started .* values of trainer.seed"):
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.seed=1"), tmp_path / "run")
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    for a, b in zip(list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "run"), strict=True):
        assert a.read_bytes() == b.read_bytes()


# ---- 13. smaller ones ---------------------------------------------------------------------------------------------
def test_a_stop_signal_during_setup_ends_with_a_checkpoint(make_cfg, tmp_path, monkeypatch):
    import signal

    import snapens.training
    real = snapens.training.setup

    def setup_then_signal(*args):
        built = real(*args)
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning arrives while the data is still loading
        return built

    monkeypatch.setattr(snapens.training, "setup", setup_then_signal)
    with pytest.raises(snapens.training.Interrupted, match="stopped by SIGUSR1 after step 1 with a checkpoint"):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    assert load_checkpoint(checkpoint_path(tmp_path))["progress"]["step"] == 1
