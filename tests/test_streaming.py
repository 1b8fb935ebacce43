"""data.storage=stream (snapens.streaming): the same batches, statistics and snapshots as in memory, resume after
kill -9 mid-epoch, a rank's share, the crop for large images, and the errors."""

import json
import logging
import os
import signal
import subprocess
import sys
import time

import pytest
import snapens.streaming
import torch
from PIL import Image
from snapens.batches import Augmentation, eval_batches, random_resized_crop, train_batches
from snapens.checkpoint import checkpoint_path, load_checkpoint
from snapens.data import prepare, scan_image_folder, split_digest
from snapens.errors import SnapensError
from snapens.snapshots import list_snapshots
from snapens.training import train

from conftest import EQUAL_CYCLES_3, HANG, says, write_image_folder

SUBSETS = dict(train_limit=40, val_size=8, test_limit=12, seed=1)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root)
    return root


def batches(data, split, seed=3, aug=Augmentation(cutout=8)):
    return list(train_batches(getattr(data, split), 16, torch.Generator().manual_seed(seed), aug, data.mean,
                              data.std))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_streamed_data_set_gives_the_batches_and_statistics_of_the_in_memory_one(folder, workers):
    memory = prepare(*scan_image_folder(str(folder)), storage="memory", **SUBSETS)
    stream = prepare(*scan_image_folder(str(folder)), storage="stream", workers=workers, **SUBSETS)
    assert isinstance(stream.train.images, snapens.streaming.StreamedImages)
    assert (stream.mean, stream.std) == (memory.mean, memory.std)  # bit-equal: the same chunks, summed alike
    for name in ("train", "val", "test"):
        assert torch.equal(getattr(stream, name).labels, getattr(memory, name).labels)
    ours, theirs = batches(stream, "train"), batches(memory, "train")
    assert len(ours) == 3
    for (x, y), (mx, my) in zip(ours, theirs):
        assert torch.equal(x, mx) and torch.equal(y, my)
    for name in ("val", "test"):
        split_s, split_m = getattr(stream, name), getattr(memory, name)
        for (x, y), (mx, my) in zip(eval_batches(split_s, 5, stream.mean, stream.std),
                                    eval_batches(split_m, 5, memory.mean, memory.std), strict=True):
            assert torch.equal(x, mx) and torch.equal(y, my)


def test_a_rank_decodes_only_its_share_of_each_batch(folder, monkeypatch):
    memory = prepare(*scan_image_folder(str(folder)), storage="memory", **SUBSETS)
    stream = prepare(*scan_image_folder(str(folder)), storage="stream", workers=0, **SUBSETS)
    read, opened = snapens.streaming.read_image, []
    monkeypatch.setattr(snapens.streaming, "read_image", lambda path, size: opened.append(path) or read(path, size))
    index = torch.tensor([5, 0, 31, 7, 2])
    rank_1 = next(stream.train.images.read([index], share=(1, 2)))
    assert len(opened) == 2  # rows 3 and 4: torch's tensor_split gives rank 0 three of five
    assert torch.equal(rank_1[3:], memory.train.images[index][3:]) and not rank_1[:3].any()
    opened.clear()
    assert torch.equal(stream.train.images[index], memory.train.images[index])  # no share: every row
    assert len(opened) == 5


def test_the_resume_digest_of_a_streamed_split_follows_its_files(folder, tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    digest = split_digest(prepare(*scan_image_folder(str(root)), storage="stream", workers=0).train)
    assert digest == split_digest(prepare(*scan_image_folder(str(root)), storage="stream", workers=0).train)
    first = sorted((root / "train").rglob("*.png"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(first)  # same name, same count, other pixels
    assert digest != split_digest(prepare(*scan_image_folder(str(root)), storage="stream", workers=0).train)


def test_auto_streams_when_the_first_decode_would_exceed_the_budget_and_says_why(folder, caplog):
    train, test, classes = scan_image_folder(str(folder))  # 80 images of 32 px: 245,760 bytes decoded
    caplog.set_level(logging.INFO, logger="snapens.streaming")
    low = prepare(train, test, classes, storage="auto", memory_gib=0.0009, workers=0)  # 4x: 0.00092 GiB
    assert isinstance(low.train.images, snapens.streaming.StreamedImages)
    assert "streamed from the files: its first decode needs about 0.00 GiB, over the budget" in caplog.text
    high = prepare(train, test, classes, storage="auto", memory_gib=0.001, workers=0)
    assert isinstance(high.train.images, torch.Tensor)
    assert "in memory: its first decode needs about 0.00 GiB, within the budget of 0.001 GiB" in caplog.text


def test_a_bad_image_met_while_streaming_is_one_line_naming_the_file(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    bad = sorted((root / "train").rglob("*.png"))[10]
    bad.write_bytes(b"not an image")
    with pytest.raises(SnapensError) as e:  # met by a worker process, in the statistics' pass over the files
        prepare(*scan_image_folder(str(root)), storage="stream", workers=2)
    says(e.value, f"cannot read image {bad}", "replace or remove the file")


def test_images_of_another_size_met_while_streaming_say_to_set_image_size(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    Image.new("RGB", (40, 40)).save(sorted((root / "test").rglob("*.png"))[3])
    data = prepare(*scan_image_folder(str(root)), storage="stream", workers=0)
    with pytest.raises(SnapensError) as e:
        list(eval_batches(data.test, 8, data.mean, data.std))
    says(e.value, "images differ in size", "the first is 32x32, another 40x40", "data.image_size=N")


def test_storage_stream_on_arrays_names_the_key_and_the_fix(make_cfg, tmp_path):
    with pytest.raises(SnapensError) as e:
        train(make_cfg(*EQUAL_CYCLES_3, "data.storage=stream"), tmp_path / "run")
    says(e.value, "data.storage=stream", "data=synthetic", "data.storage=auto", "data=imagefolder")
    assert not (tmp_path / "run" / "snapshots").exists()


# ---- a training run: streamed = in memory, and resumed after kill -9 mid-epoch ------------------------------------
def run_overrides(root):  # 56 training images in batches of 4: 14 updates an epoch, a checkpoint after each
    return [*EQUAL_CYCLES_3, "data=imagefolder", f"data.root={root}", "data.num_classes=4", "data.val_size=8",
            "trainer.batch_size=4", "trainer.checkpoint_every=1", "data.workers=2"]


def test_a_streamed_run_killed_mid_epoch_resumes_to_the_in_memory_run_s_snapshots(folder, make_cfg, tmp_path):
    train(make_cfg(*run_overrides(folder), "data.storage=memory"), tmp_path / "memory")
    run_dir = tmp_path / "stream"
    command = [sys.executable, "-m", "snapens.train", *run_overrides(folder), "data.storage=stream",
               f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + HANG
    while process.poll() is None and time.monotonic() < deadline and step_of(run_dir) < 18:  # epoch 2's 4th update
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait(timeout=HANG)
    position = load_checkpoint(checkpoint_path(run_dir))["progress"]["position"]
    assert 0 < position < 14  # killed inside an epoch, its batch order and decoding workers mid-way
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG)
    assert done.returncode == 0, done.stderr
    assert "data streamed from the files: asked for" in done.stderr + done.stdout
    ours = {p.name: p.read_bytes() for p in list_snapshots(run_dir)}
    assert ours == {p.name: p.read_bytes() for p in list_snapshots(tmp_path / "memory")} and len(ours) == 3


def step_of(run_dir) -> int:
    try:
        return load_checkpoint(checkpoint_path(run_dir))["progress"]["step"]
    except (FileNotFoundError, SnapensError):
        return -1


# ---- the crop for large images ------------------------------------------------------------------------------------
def test_random_resized_crop_at_the_whole_area_and_aspect_1_is_the_image():
    x = torch.rand(3, 3, 20, 28)
    out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(1, 1))
    assert torch.allclose(out, x, atol=1e-5)


def test_random_resized_crop_takes_a_window_of_the_asked_share_resized_to_the_image():
    columns = torch.arange(64.0).expand(2, 3, 64, 64)  # each pixel's value is its column
    rows = columns.transpose(2, 3)
    for seed in range(5):
        across = random_resized_crop(columns, torch.Generator().manual_seed(seed), scale=(0.25, 0.25),
                                     ratio=(1, 1))
        down = random_resized_crop(rows, torch.Generator().manual_seed(seed), scale=(0.25, 0.25), ratio=(1, 1))
        for out in (across[:, 0, 0, :], down[:, 0, :, 0]):  # a window half as wide and half as high
            step = out[:, 1:-1].diff()  # half a pixel per output pixel (the two edge pixels may sample past the
            assert torch.allclose(step, torch.full_like(step, 0.5), atol=1e-4)  # outer pixel centres: clamped)
            assert out.min() >= 0 and out.max() <= 63
        assert not torch.equal(across[0], across[1])  # each image its own window


def test_crop_resized_trains_end_to_end_and_pad_keeps_the_hash_of_runs_made_before_the_key(make_cfg, tmp_path):
    from snapens.build import config_hash, recipe

    assert train(make_cfg(*EQUAL_CYCLES_3, "data.crop=resized"), tmp_path / "run") is not None
    before = recipe(make_cfg(*EQUAL_CYCLES_3))
    del before["data"]["crop"]  # a run made before data.crop existed
    assert config_hash(before) == config_hash(recipe(make_cfg(*EQUAL_CYCLES_3)))
    assert config_hash(recipe(make_cfg(*EQUAL_CYCLES_3, "data.crop=resized"))) != config_hash(before)


@pytest.mark.slow
def test_two_ranks_streaming_their_shares_write_the_snapshots_of_two_ranks_in_memory(folder, tmp_path):
    """torchrun with 2 CPU processes (gloo): each rank decodes only its half of every batch."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    runs = {}
    for storage in ("memory", "stream"):
        runs[storage] = tmp_path / storage
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                   "snapens.train", *run_overrides(folder), "trainer.batch_size=8", f"data.storage={storage}",
                   f"hydra.run.dir={runs[storage]}"]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=HANG, env=env)
        assert done.returncode == 0, done.stderr[-3000:]
    first, second = json.loads((runs["stream"] / "results.json").read_text())["training"]["rank_weights_sha256"]
    assert first == second
    ours = {p.name: p.read_bytes() for p in list_snapshots(runs["stream"])}
    assert ours == {p.name: p.read_bytes() for p in list_snapshots(runs["memory"])} and len(ours) == 3
