"""Hardening (each test failed before its fix): one training per run dir, resume only on the data the run started
with, never a non-finite file, bounded model configs from files, 16-bit images."""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from snapens.models import model_from_metadata
from snapens.checkpoint import checkpoint_path, load_checkpoint, run_dir_lock
from snapens.data import make_synthetic, read_image
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots, load_snapshot
from snapens.train import train

from conftest import EQUAL_CYCLES_2, EQUAL_CYCLES_3, FAST, HANG


# ---- 1. one training per run dir --------------------------------------------------------------------------------
def test_a_second_training_into_a_locked_run_dir_stops_and_touches_nothing(make_cfg, tmp_path):
    with run_dir_lock(tmp_path):  # as a training in another process holds it
        with pytest.raises(SnapensError, match=f"run dir {tmp_path} is in use by process {os.getpid()}"):
            train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == [".lock"]
        result = subprocess.run([sys.executable, "-m", "snapens.train", *EQUAL_CYCLES_2, f"hydra.run.dir={tmp_path}"],
                                cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert result.returncode == 2 and f"is in use by process {os.getpid()}" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "snapshots").exists() and not checkpoint_path(tmp_path).exists()
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)  # the lock is released with its holder: the dir is usable again
    assert len(list_snapshots(tmp_path)) == 2


def test_runs_started_in_the_same_second_get_their_own_dirs(tmp_path):
    command = [sys.executable, "-m", "snapens.train", *FAST, "trainer.epochs=1", "scheduler=cosine",
               "data.train_size=64", "data.test_size=16"]
    jobs = [subprocess.Popen([*command, f"trainer.seed={seed}"], cwd=tmp_path, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for seed in (0, 1)]
    for job in jobs:
        _, err = job.communicate(timeout=HANG)
        assert job.returncode == 0, err
    runs = sorted(p for p in (tmp_path / "outputs" / "runs").glob("*/*") if p.is_dir())
    assert len(runs) == 2
    seeds = {load_checkpoint(checkpoint_path(run))["config"]["trainer"]["seed"] for run in runs}
    assert seeds == {0, 1}


# ---- 2. resume checks its data ----------------------------------------------------------------------------------
def write_image_folder(root, seed: int = 0):
    """make_synthetic's images as PNG files in root/{train,test}/<class>/."""
    train_split, test_split, classes = make_synthetic(4, 64, 16, 32, seed=seed)
    for name, split in (("train", train_split), ("test", test_split)):
        for i, (image, label) in enumerate(zip(split.images, split.labels.tolist())):
            (root / name / classes[label]).mkdir(parents=True, exist_ok=True)
            Image.fromarray(image.permute(1, 2, 0).numpy()).save(root / name / classes[label] / f"{i:03d}.png")


class Killed(Exception):
    pass


def killed_after(monkeypatch, updates: int):
    """train_step raises Killed once `updates` updates are done (as kill -9 would end the process there)."""
    import snapens.train
    real, count = snapens.train.train_step, [0]

    def step(*args, **kwargs):
        if count[0] == updates:
            raise Killed()
        count[0] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(snapens.train, "train_step", step)


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


# ---- 3. never a non-finite snapshot or checkpoint -----------------------------------------------------------------
@pytest.mark.parametrize("mode", ["stop", "skip"])
def test_no_file_ever_holds_a_nonfinite_tensor(make_cfg, tmp_path, mode):
    """A learning rate of 1e6 drives BatchNorm's running variance to inf while loss and gradient may still be finite:
    whatever happens, no snapshot or checkpoint is written with a NaN or inf in any tensor."""
    try:
        train(make_cfg(*EQUAL_CYCLES_3, "scheduler.eta_max=1e6", f"trainer.on_nonfinite={mode}"), tmp_path)
    except SnapensError as e:
        assert "stopped" in str(e) and "checkpoint is intact" in str(e)
    for path in list_snapshots(tmp_path):
        state, _ = load_snapshot(path)
        assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point()), path.name
    state = load_checkpoint(checkpoint_path(tmp_path))["model"]
    assert all(torch.isfinite(v).all() for v in state.values() if v.is_floating_point())


# ---- 6. model configs read from files are bounded -----------------------------------------------------------------
@pytest.mark.parametrize("config, message", [
    ({"depth": 28, "widen_factor": -1}, "model.widen_factor must be between 1 and 32"),
    ({"depth": 28, "widen_factor": 4, "dropout": float("nan")}, "model.dropout must be a probability in [0, 1)"),
    ({"depth": 600004, "widen_factor": 1}, "model.depth must be 6n+4 between 10 and 1000"),
    ({"_target_": "snapens.models.CifarResNet", "depth": 20, "num_classes": 10**13},
     "model.num_classes must be between 1 and 100,000"),
    ({"_target_": "snapens.models.CifarResNet", "depth": 600002}, "model.depth must be 6n+2 between 8 and 1202"),
])
def test_tampered_model_metadata_is_refused_before_anything_is_built(config, message):
    config = {"_target_": "snapens.models.WideResNet", "num_classes": 10, **config}
    with pytest.raises(SnapensError, match=re.escape(f"snapshot x: {message}")):
        model_from_metadata(config, "snapshot x")


# ---- 9. 16-bit images ---------------------------------------------------------------------------------------------
def test_16_bit_grey_png_is_scaled_not_clipped(tmp_path):
    pixels = (np.arange(32 * 32).reshape(32, 32) * 64).astype(np.uint16)  # 0 .. 65472
    Image.fromarray(pixels).save(tmp_path / "grey16.png")
    with Image.open(tmp_path / "grey16.png") as image:
        assert image.mode.startswith("I;16")  # Pillow keeps the 16 bits
    image = read_image(tmp_path / "grey16.png", 0)
    expected = torch.from_numpy((pixels.astype(np.int64) * 255 + 32767) // 65535).to(torch.uint8)
    assert image.shape == (3, 32, 32) and all(torch.equal(channel, expected) for channel in image)
    Image.fromarray(np.full((4, 4), 70000, dtype=np.int32), mode="I").save(tmp_path / "wide.tif")
    with pytest.raises(SnapensError, match="pixels beyond 16 bits"):
        read_image(tmp_path / "wide.tif", 0)


# ---- 12. members by their metadata, copies refused ----------------------------------------------------------------
def test_members_are_ordered_by_their_metadata_and_copies_are_refused(make_cfg, tmp_path):
    import snapens.ensemble.__main__ as cli
    from conftest import compose_config
    run = tmp_path / "run"
    train(make_cfg(*EQUAL_CYCLES_3), run)
    (run / "snapshots" / "cycle_02.safetensors").rename(run / "snapshots" / "cycle_07.safetensors")
    cli.evaluate(compose_config(f"run={run}", "device=cpu", f"out={tmp_path / 'report'}", name="ensemble"))
    report = json.loads((tmp_path / "report" / "ensemble.json").read_text())
    assert [s["cycle"] for s in report["snapshots"]] == [1, 2, 3]  # the renamed cycle 2 is not "the last"
    assert report["single"]["file"].endswith("cycle_03.safetensors")
    cli.evaluate(compose_config(f"run={run}", "device=cpu", "members=[2,3]", f"out={tmp_path / 'two'}",
                                name="ensemble"))
    two = json.loads((tmp_path / "two" / "ensemble.json").read_text())
    assert [s["cycle"] for s in two["snapshots"]] == [2, 3]
    shutil.copy(run / "snapshots" / "cycle_03.safetensors", run / "snapshots" / "cycle_3.safetensors")
    with pytest.raises(SnapensError, match="hold the same snapshot .*; remove the copy"):
        cli.evaluate(compose_config(f"run={run}", "device=cpu", f"out={tmp_path / 'three'}", name="ensemble"))


# ---- 5. the benchmark's naive contender builds models only through the allow-list ---------------------------------
def test_bench_ensemble_naive_never_calls_what_a_snapshot_names(tmp_path):
    from snapens.models import CifarResNet
    from snapens.snapshots import save_snapshot
    victim = tmp_path / "victim.txt"
    victim.write_text("precious")
    (tmp_path / "run" / ".hydra").mkdir(parents=True)
    (tmp_path / "run" / ".hydra" / "config.yaml").write_text(f"data:\n  root: {tmp_path}\n")
    evil = {"_target_": "builtins.open", "file": str(victim), "mode": "w"}
    save_snapshot(tmp_path / "run" / "snapshots" / "cycle_01.safetensors", CifarResNet(depth=8),
                  {"model_config": evil, "mean": [0.5] * 3, "std": [0.5] * 3})
    script = Path(__file__).resolve().parents[1] / "scripts" / "bench_ensemble.py"
    result = subprocess.run([sys.executable, str(script), "--naive", str(tmp_path / "run"), "--device", "cpu"],
                            capture_output=True, text=True, timeout=HANG)
    assert result.returncode != 0 and "cannot build safely" in result.stderr
    assert victim.read_text() == "precious"


# ---- 4. a run killed before its first checkpoint ----------------------------------------------------------------
def test_a_run_killed_before_its_first_checkpoint_starts_again_in_place(make_cfg, tmp_path, monkeypatch):
    import snapens.train
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "whole")

    def killed(run):
        raise Killed()

    monkeypatch.setattr(snapens.train, "save_progress", killed)  # dies right after writing .hydra/config.yaml
    with pytest.raises(Killed):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    monkeypatch.undo()
    assert (tmp_path / "run" / ".hydra" / "config.yaml").exists() and not checkpoint_path(tmp_path / "run").exists()
    with pytest.raises(SnapensError, match="holds the config of a run that never started .* values of trainer.seed"):
        train(make_cfg(*EQUAL_CYCLES_2, "trainer.seed=1"), tmp_path / "run")
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    for a, b in zip(list_snapshots(tmp_path / "whole"), list_snapshots(tmp_path / "run"), strict=True):
        assert a.read_bytes() == b.read_bytes()


# ---- 8. keys that do not exist, even appended with + ---------------------------------------------------------------
@pytest.mark.parametrize("override, message", [
    ("+trainer.epoch=3", "trainer.epoch is not a key of trainer; did you mean trainer.epochs?"),
    ("+data.trainlimit=5", "data.trainlimit is not a key of data=synthetic; did you mean data.train_limit?"),
    ("+scheduler.T0=3", "scheduler.T0 is not a key of scheduler=sgdr; did you mean scheduler.T_0?"),
    ("+trainer.swa.begin=0.5", "trainer.swa.begin is not a key of trainer.swa; did you mean trainer.swa.start?"),
])
def test_unknown_keys_are_refused_even_with_plus(make_cfg, tmp_path, override, message):
    with pytest.raises(SnapensError, match=re.escape(message)):
        train(make_cfg(*EQUAL_CYCLES_2, override), tmp_path)
    assert not any(tmp_path.iterdir())


# ---- 13. smaller ones ---------------------------------------------------------------------------------------------
def test_a_stop_signal_during_setup_ends_with_a_checkpoint(make_cfg, tmp_path, monkeypatch):
    import signal

    import snapens.train
    real = snapens.train.setup

    def setup_then_signal(*args):
        built = real(*args)
        os.kill(os.getpid(), signal.SIGUSR1)  # SLURM's warning arrives while the data is still loading
        return built

    monkeypatch.setattr(snapens.train, "setup", setup_then_signal)
    with pytest.raises(snapens.train.Interrupted, match="stopped by SIGUSR1 after step 1 with a checkpoint"):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    assert load_checkpoint(checkpoint_path(tmp_path))["progress"]["step"] == 1


def test_a_stop_signal_during_start_up_is_one_line(tmp_path):
    import signal
    import time
    run_dir = tmp_path / "run"
    process = subprocess.Popen([sys.executable, "-m", "snapens.train", *EQUAL_CYCLES_2, f"hydra.run.dir={run_dir}"],
                               cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    while not run_dir.exists() and process.poll() is None:  # Hydra has composed the config and made the dir
        time.sleep(0.005)
    process.send_signal(signal.SIGUSR1)
    _, stderr = process.communicate(timeout=HANG)
    assert process.returncode == 75 and len(stderr.strip().splitlines()) == 1, stderr
    assert stderr.startswith("snapens: stop")


def test_checkpoint_without_its_keys_is_one_line(make_cfg, tmp_path):
    from snapens.checkpoint import save_checkpoint
    save_checkpoint(checkpoint_path(tmp_path), {"model": {}})
    with pytest.raises(SnapensError, match="lacks optimizer, rng, progress, config, device: it was not written"):
        train(make_cfg(*EQUAL_CYCLES_2), tmp_path)


def test_a_dangling_link_among_the_images_is_one_line(tmp_path):
    from snapens.data import load_image_folder
    write_image_folder(tmp_path)
    (tmp_path / "train" / "class0" / "zz.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(SnapensError, match="zz.png is a link to a file that does not exist"):
        load_image_folder(str(tmp_path))


def test_report_refuses_a_results_json_with_nan(tmp_path):
    from snapens.report import read_run
    (tmp_path / "results.json").write_text(json.dumps({"single": {"acc": float("nan")}, "ensemble": {
        "acc": 0.5, "members": ["a"]}}))
    with pytest.raises(SnapensError, match="cannot read .*results.json: ValueError: accuracies nan and 0.5"):
        read_run(tmp_path, "trainer.seed")


def test_ensemble_out_inside_the_snapshots_folder_is_refused(make_cfg, tmp_path):
    import snapens.ensemble.__main__ as cli
    from conftest import compose_config
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    before = sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir())
    with pytest.raises(SnapensError, match="lies inside the snapshots' folder"):
        cli.evaluate(compose_config(f"run={tmp_path / 'run'}", f"out={tmp_path / 'run' / 'snapshots' / 'r'}",
                                    "device=cpu", name="ensemble"))
    assert sorted(p.name for p in (tmp_path / "run" / "snapshots").iterdir()) == before


# ---- 11. unwritable places ------------------------------------------------------------------------------------------
def test_unwritable_data_folder_and_home_decode_without_a_cache(tmp_path, monkeypatch):
    from snapens.data import load_image_folder
    write_image_folder(tmp_path / "images")
    train_split, _, _ = load_image_folder(str(tmp_path / "images"))
    (tmp_path / "home").write_text("a file where the home folder should be: nothing can be made below it")
    monkeypatch.setattr(Path, "home", lambda: tmp_path / "home")
    monkeypatch.setattr(os, "access", lambda *args: False)  # the data folder is read-only (as root: pretended)
    again, _, _ = load_image_folder(str(tmp_path / "images"))
    assert torch.equal(again.images, train_split.images) and torch.equal(again.labels, train_split.labels)


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


def test_read_image_resizes_to_a_non_square_size(tmp_path):
    Image.new("RGB", (10, 10), (9, 99, 199)).save(tmp_path / "square.png")
    image = read_image(tmp_path / "square.png", (6, 8))  # what predict= asks for a model trained on 6 x 8 images
    assert image.shape == (3, 6, 8) and image[:, 0, 0].tolist() == [9, 99, 199]


def test_a_hand_edited_run_config_is_one_line_in_the_ensemble_tool(make_cfg, tmp_path):
    import snapens.ensemble.__main__ as cli
    from conftest import compose_config
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path / "run")
    config = tmp_path / "run" / ".hydra" / "config.yaml"
    config.write_text(config.read_text().replace("train_limit: 0", "train_limit: abc"))
    with pytest.raises(SnapensError, match="config.yaml: data.train_limit: Value 'abc' of type 'str' could not"):
        cli.evaluate(compose_config(f"run={tmp_path / 'run'}", "device=cpu", name="ensemble"))


def test_a_blocked_model_target_is_one_whole_line(make_cfg, tmp_path):
    with pytest.raises(SnapensError) as info:
        train(make_cfg(*EQUAL_CYCLES_2, "model._target_=os.system"), tmp_path)
    message = str(info.value)
    assert message.startswith("model=os.system: Target 'os.system' is blocklisted") and "\n" not in message
    assert message.endswith("HYDRA_INSTANTIATE_ALLOWLIST_OVERRIDE.")  # not cut off after its first line


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


def test_a_filesystem_without_flock_trains_without_the_lock(make_cfg, tmp_path, monkeypatch, caplog):
    import errno
    import fcntl

    def unsupported(*args):
        raise OSError(errno.ENOSYS, "Function not implemented")

    monkeypatch.setattr(fcntl, "flock", unsupported)  # Lustre without -o flock, some NFS mounts
    train(make_cfg(*EQUAL_CYCLES_2), tmp_path)
    assert len(list_snapshots(tmp_path)) == 2 and "cannot lock run dir" in caplog.text


def test_a_changed_image_leaves_one_cache_file_per_split(tmp_path):
    from snapens.data import load_image_folder
    write_image_folder(tmp_path)
    load_image_folder(str(tmp_path))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(sorted((tmp_path / "train").rglob("*.png"))[0])
    load_image_folder(str(tmp_path))
    names = sorted(p.name.split("-")[0] for p in (tmp_path / ".snapens_cache").glob("*.safetensors"))
    assert names == ["test", "train"]  # the stale train cache is gone, not piled up
