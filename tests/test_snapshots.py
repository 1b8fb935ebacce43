"""Tests for snapens.snapshots: exact round trips, atomic writes, clear errors and cycle ordering."""

import errno
import json
import os
import shutil
import stat
from pathlib import Path

import pytest
import snapens.ensemble.tool as ensemble_tool
import torch
from PIL import Image
from safetensors.torch import save_file
from snapens.ensemble.ensemble import Ensemble
from snapens.errors import SnapensError
from snapens.ensemble.program import export_run
from snapens.files import file_digest
from snapens.models import CifarResNet, WideResNet
from snapens.snapshots import (
    list_snapshots,
    load_into,
    load_snapshot,
    read_metadata,
    save_snapshot,
    snapshot_path,
    verify,
)
from snapens.teacher import load_teacher, teacher_paths
from snapens.training import train

from conftest import EQUAL_CYCLES_2, EQUAL_CYCLES_3, compose_config

METADATA = {
    "cycle": 3,
    "step": 1200,
    "epoch": 10.0,  # stays a float
    "lr": 1.2345678901234567e-05,
    "model": "resnet8",
    "num_classes": 4,
    "classes": ["cat", "dog", "émeu", "a b"],
    "mean": [0.4914, 0.4822, 0.4465],
    "config_hash": "0123abcd",
}


def small_model(seed: int = 0, num_classes: int = 4) -> torch.nn.Module:
    torch.manual_seed(seed)
    return CifarResNet(depth=8, num_classes=num_classes)


def trained_model(seed: int = 0) -> torch.nn.Module:
    """A ResNet-8 after one SGD step, so weights and every BatchNorm buffer are away from their defaults."""
    model = small_model(seed)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(6, 3, 8, 8, generator=torch.Generator().manual_seed(seed))
    model.train()
    model(x).logsumexp(1).mean().backward()
    opt.step()
    return model


@pytest.fixture
def umask():
    """Set a umask for the test and restore the old one."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def test_round_trip_restores_every_tensor_and_the_metadata(tmp_path):
    """save_snapshot then load_into a fresh model: all state_dict tensors (BN buffers too) and metadata equal."""
    model, fresh = trained_model(seed=1), small_model(seed=2)
    path = tmp_path / "snapshots" / "cycle_03.safetensors"
    save_snapshot(path, model, METADATA)
    saved, before = model.state_dict(), fresh.state_dict()
    assert saved["bn.num_batches_tracked"].item() == 1  # buffers moved away from their defaults
    assert not torch.equal(saved["bn.running_var"], before["bn.running_var"])

    metadata = load_into(fresh, path)
    loaded = fresh.state_dict()
    assert loaded.keys() == saved.keys()
    for key in saved:
        assert loaded[key].dtype == saved[key].dtype, key
        assert torch.equal(loaded[key], saved[key]), key
    state, _ = load_snapshot(path)  # the file itself keeps every dtype (num_batches_tracked is int64)
    assert all(state[k].dtype == saved[k].dtype and torch.equal(state[k], saved[k]) for k in saved)
    assert metadata == METADATA
    assert read_metadata(path) == METADATA
    assert type(metadata["epoch"]) is float and type(metadata["cycle"]) is int


@pytest.mark.parametrize("mask, mode", [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_snapshot_file_mode_follows_umask(tmp_path, umask, mask, mode):
    """A snapshot is an ordinary file: mode 0o666 minus the umask (world-readable under umask 022)."""
    umask(mask)
    path = tmp_path / "cycle_01.safetensors"
    save_snapshot(path, small_model(), {"cycle": 1})
    assert stat.S_IMODE(path.stat().st_mode) == mode


def test_failed_save_leaves_previous_file_and_no_temporaries(tmp_path, monkeypatch):
    """If the rename fails, the old snapshot stays byte-identical and the temporary file is removed."""
    path = tmp_path / "cycle_01.safetensors"
    save_snapshot(path, small_model(seed=0), {"cycle": 1})
    before = path.read_bytes()

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(SnapensError, match=f"cannot write {path}: No space left on device; the earlier file under "
                                           "that name is intact"):
        save_snapshot(path, trained_model(seed=5), {"cycle": 2})
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cycle_01.safetensors"]


def test_unwritable_folder_is_one_clear_error(tmp_path):
    """A snapshot folder that cannot be made (a file is in the way) names the path; nothing else is written."""
    (tmp_path / "snapshots").write_text("a file, not a folder")
    with pytest.raises(SnapensError, match="cannot write .*cycle_01.safetensors: .*make the folder writable"):
        save_snapshot(tmp_path / "snapshots" / "cycle_01.safetensors", small_model(), {"cycle": 1})


def cut_end(data: bytes) -> bytes:
    return data[:-1]


def cut_half(data: bytes) -> bytes:
    return data[: len(data) // 2]


def cut_to_header_length(data: bytes) -> bytes:
    return data[:8]


def garbage(data: bytes) -> bytes:
    return b"this is not a safetensors file at all" * 10


def empty(data: bytes) -> bytes:
    return b""


@pytest.mark.parametrize("damage", [cut_end, cut_half, cut_to_header_length, garbage, empty])
def test_damaged_file_is_reported_as_truncated_or_corrupt(tmp_path, damage):
    """A truncated or garbage file gives a SnapensError naming the path and saying truncated or corrupt."""
    path = tmp_path / "cycle_01.safetensors"
    save_snapshot(path, small_model(), METADATA)
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(SnapensError) as info:
        load_into(small_model(), path)
    assert str(path) in str(info.value)
    assert "truncated or corrupt" in str(info.value)


@pytest.mark.parametrize("metadata", [None, {"format": "pt"}])
def test_foreign_safetensors_file_is_not_a_snapshot(tmp_path, metadata):
    """A valid safetensors file without snapens metadata is rejected as 'not a snapens snapshot'."""
    path = tmp_path / "weights.safetensors"
    save_file(small_model().state_dict(), str(path), metadata=metadata)
    with pytest.raises(SnapensError, match="not a snapens snapshot") as info:
        load_into(small_model(), path)
    assert str(path) in str(info.value)


def test_missing_file(tmp_path):
    """A missing snapshot is a SnapensError naming it."""
    path = tmp_path / "cycle_09.safetensors"
    with pytest.raises(SnapensError, match="does not exist") as info:
        load_into(small_model(), path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("other", [
    lambda: CifarResNet(depth=14, num_classes=4),  # more blocks: missing keys
    lambda: CifarResNet(depth=8, num_classes=10),  # other class count: size mismatch
    lambda: WideResNet(depth=10, widen_factor=1, num_classes=4),  # another family
    lambda: torch.nn.Sequential(small_model()),  # same shapes under other names: only missing/unexpected keys
], ids=["deeper", "classes", "wrn", "renamed"])
def test_load_into_a_different_model_is_rejected(tmp_path, other):
    """Loading into another architecture or class count says the snapshot does not fit, and what it was saved from."""
    path = tmp_path / "cycle_01.safetensors"
    save_snapshot(path, small_model(), {"cycle": 1, "model": "resnet8", "num_classes": 4})
    model = other()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(SnapensError, match="does not fit the model") as info:
        load_into(model, path)
    assert str(path) in str(info.value) and "resnet8" in str(info.value)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items()), "a failed load changed the model"


def test_list_snapshots_orders_cycles_numerically_and_ignores_other_files(tmp_path):
    """cycle_01 < cycle_2 < cycle_10 < cycle_100; SWA files, notes and temporaries are not snapshots."""
    folder = tmp_path / "snapshots"
    folder.mkdir()
    names = ["cycle_100.safetensors", "cycle_10.safetensors", "cycle_2.safetensors", "cycle_01.safetensors",
             "cycle_01_swa.safetensors", "notes.txt", ".cycle_03.safetensors.k2j4.tmp", "cycle_04.safetensors.tmp",
             "last.safetensors", "cycle_.safetensors"]
    for name in names:
        (folder / name).write_bytes(b"")
    assert [p.name for p in list_snapshots(tmp_path)] == [
        "cycle_01.safetensors", "cycle_2.safetensors", "cycle_10.safetensors", "cycle_100.safetensors"]
    assert all(p.parent == folder for p in list_snapshots(tmp_path))


def test_list_snapshots_finds_snapshot_path_files_in_cycle_order(tmp_path):
    """Files named by snapshot_path come back in cycle order; a run without snapshots lists none."""
    assert list_snapshots(tmp_path) == []
    cycles = [10, 1, 100, 9]
    for cycle in cycles:
        save_snapshot(snapshot_path(tmp_path, cycle), small_model(), {"cycle": cycle})
    listed = list_snapshots(tmp_path)
    assert listed == [snapshot_path(tmp_path, c) for c in sorted(cycles)]
    assert [read_metadata(p)["cycle"] for p in listed] == sorted(cycles)
    assert snapshot_path(tmp_path, 3).name == "cycle_03.safetensors"


# ---- the run's manifest: every reader refuses a changed or foreign snapshot ------------------------------------------
def flip_a_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-100] ^= 0x01  # inside the last tensor's bytes: the header still parses
    path.write_bytes(bytes(data))


def readers(run: Path, tmp_path: Path) -> dict:
    """Every tool that reads a finished run's snapshots, each as a call."""
    folder = tmp_path / "images"
    folder.mkdir(exist_ok=True)
    Image.new("RGB", (32, 32), (9, 99, 199)).save(folder / "a.png")
    stats = read_metadata(run / "snapshots" / "cycle_01.safetensors")
    tool = lambda *extra: ensemble_tool.evaluate(compose_config(f"run={run}", *extra, name="ensemble"))  # noqa: E731
    return {
        "report": lambda: tool(f"out={tmp_path / 'report'}"),
        "predict=": lambda: tool(f"predict={folder}", f"out={tmp_path / 'predictions'}"),
        "export": lambda: export_run(compose_config(f"run={run}", f"out={tmp_path / 'e.pt2'}", name="export")),
        "Ensemble.from_run": lambda: Ensemble.from_run(run),
        "distillation teacher": lambda: load_teacher(teacher_paths(run, "all"), "logits", 4.0, stats["mean"],
                                                     stats["std"], torch.device("cpu"), None, False),
    }


def test_the_manifest_lists_every_snapshot_with_its_digest(held_out_run):
    manifest = json.loads((held_out_run / "manifest.json").read_text())["snapshots"]
    assert manifest == {p.name: file_digest(p) for p in list_snapshots(held_out_run)}
    assert all(verify(p, file_digest(p)) for p in list_snapshots(held_out_run))


def test_a_flipped_byte_is_refused_by_every_reader(held_out_copy, tmp_path):
    flip_a_byte(held_out_copy / "snapshots" / "cycle_02.safetensors")
    for name, read in readers(held_out_copy, tmp_path).items():
        with pytest.raises(SnapensError, match=r"cycle_02.safetensors has changed since its run wrote it .* restore"):
            read()


def test_another_runs_snapshot_is_refused_by_every_reader(held_out_copy, make_cfg, tmp_path):
    other = tmp_path / "other"
    train(make_cfg(*EQUAL_CYCLES_2, "trainer.seed=1"), other)
    shutil.copy(other / "snapshots" / "cycle_02.safetensors", held_out_copy / "snapshots" / "cycle_04.safetensors")
    for name, read in readers(held_out_copy, tmp_path).items():
        with pytest.raises(SnapensError, match=r"cycle_04.safetensors is not a snapshot its run wrote"):
            read()


def test_a_renamed_snapshot_of_the_run_still_verifies(held_out_copy):
    (held_out_copy / "snapshots" / "cycle_02.safetensors").rename(held_out_copy / "snapshots" / "cycle_07.safetensors")
    assert len(Ensemble.from_run(held_out_copy).members) == 3  # its bytes are the ones the run wrote


def test_a_run_without_a_manifest_is_read_unverified(held_out_copy, tmp_path):
    (held_out_copy / "manifest.json").unlink()  # a run of an older snapens
    assert Ensemble.from_run(held_out_copy).probs(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)).shape == (1, 4)
    (held_out_copy / "manifest.json").write_text("{not json")
    with pytest.raises(SnapensError, match=r"manifest.json is damaged"):
        Ensemble.from_run(held_out_copy)


def test_a_snapshot_copied_over_another_of_its_run_is_refused(held_out_copy):
    """Its bytes are the run's, but not under this name while their own file is still there: a replaced file."""
    shutil.copy(held_out_copy / "snapshots" / "cycle_01.safetensors", held_out_copy / "snapshots" / "cycle_03.safetensors")
    with pytest.raises(SnapensError, match=r"cycle_03.safetensors has changed since its run wrote it"):
        Ensemble.from_run(held_out_copy, members="last:2")  # the copy sorts by its metadata, cycle 1


def test_keep_only_the_newest_snapshots(make_cfg, tmp_path):
    train(make_cfg(*EQUAL_CYCLES_3, "trainer.epochs=4", "trainer.keep_snapshots=2", "trainer.swa.start=0.5"), tmp_path)
    assert sorted(p.name for p in (tmp_path / "snapshots").iterdir()) == [
        "cycle_03.safetensors", "cycle_03_swa.safetensors", "cycle_04.safetensors", "cycle_04_swa.safetensors"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["ensemble"]["members"] == ["cycle_03.safetensors", "cycle_04.safetensors"]
