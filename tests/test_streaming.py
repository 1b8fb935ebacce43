"""data.storage=stream (snapens.streaming): the same batches, statistics and snapshots as in memory, resume after
kill -9 mid-epoch, a rank's share, the crop for large images, and the errors."""

import json
import logging
import math
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
    for (x, y), (mx, my) in zip(ours, theirs, strict=True):
        assert torch.equal(x, mx) and torch.equal(y, my)
    for name in ("val", "test"):
        split_s, split_m = getattr(stream, name), getattr(memory, name)
        for (x, y), (mx, my) in zip(eval_batches(split_s, 5, stream.mean, stream.std),
                                    eval_batches(split_m, 5, memory.mean, memory.std), strict=True):
            assert torch.equal(x, mx) and torch.equal(y, my)


def test_a_streamed_split_s_statistics_are_computed_once_and_again_when_a_file_changes(tmp_path, monkeypatch):
    import snapens.data

    root = tmp_path / "images"
    write_image_folder(root)
    first = prepare(*scan_image_folder(str(root)), storage="stream", workers=0)
    real, computed = snapens.data.channel_stats, []
    monkeypatch.setattr(snapens.data, "channel_stats", lambda images: computed.append(1) or real(images))
    again = prepare(*scan_image_folder(str(root)), storage="stream", workers=0)
    assert (again.mean, again.std) == (first.mean, first.std) and not computed  # read back, to the last bit
    image = sorted((root / "train").rglob("*.png"))[0]
    Image.new("RGB", (32, 32), (255, 0, 0)).save(image)
    changed = prepare(*scan_image_folder(str(root)), storage="stream", workers=0)
    assert computed == [1] and changed.mean != first.mean


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


def test_images_of_another_size_are_refused_when_the_split_is_listed_not_when_evaluation_meets_them(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    other = sorted((root / "test").rglob("*.png"))[3]
    Image.new("RGB", (40, 40)).save(other)
    with pytest.raises(SnapensError) as e:  # before training, though the test images are read only after it
        prepare(*scan_image_folder(str(root)), storage="stream", workers=0)
    says(e.value, "images differ in size", f"{other} is 40x40", "data.image_size=N")


def test_an_image_replaced_by_one_of_another_size_after_listing_is_one_line_from_the_worker(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    data = prepare(*scan_image_folder(str(root)), storage="stream", workers=2)
    other = sorted((root / "test").rglob("*.png"))[5]
    Image.new("RGB", (40, 40)).save(other)
    with pytest.raises(SnapensError) as e:
        list(eval_batches(data.test, 8, data.mean, data.std))
    says(e.value, "images differ in size", f"{other} is 40x40", "data.image_size=N")


def test_a_broken_first_image_is_one_line_whatever_the_storage(tmp_path):
    root = tmp_path / "images"
    write_image_folder(root)
    first = sorted((root / "train").rglob("*.png"))[0]
    first.write_bytes(b"not an image")
    for storage in ("auto", "stream"):
        with pytest.raises(SnapensError) as e:
            prepare(*scan_image_folder(str(root)), storage=storage, workers=0)
        says(e.value, f"cannot read image {first}", "replace or remove the file")


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


def test_a_run_resumed_with_its_images_held_otherwise_is_told_the_storage_it_started_with(folder, make_cfg,
                                                                                            tmp_path, monkeypatch):
    import snapens.training

    real, done = snapens.training.train_step, []

    def dies_after_5(*args, **kwargs):
        if len(done) == 5:
            raise KeyboardInterrupt  # as kill -9 would end it there: the step-5 checkpoint stays
        done.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(snapens.training, "train_step", dies_after_5)
    with pytest.raises(KeyboardInterrupt):
        train(make_cfg(*run_overrides(folder), "data.storage=memory"), tmp_path / "run")
    monkeypatch.undo()
    with pytest.raises(SnapensError) as e:
        train(make_cfg(*run_overrides(folder), "data.storage=stream"), tmp_path / "run")
    says(e.value, "data.storage=memory", "resume with data.storage=memory")
    assert load_checkpoint(checkpoint_path(tmp_path / "run"))["progress"]["step"] == 5


def test_the_ensemble_tool_holds_the_images_as_training_did_and_reuses_its_logits(folder, make_cfg, tmp_path,
                                                                                  monkeypatch):
    import snapens.ensemble.cache
    import snapens.ensemble.tool as cli

    from conftest import compose_config
    run = tmp_path / "run"
    train(make_cfg(*run_overrides(folder), "data.storage=stream"), run)
    monkeypatch.setattr(snapens.ensemble.cache, "compute_logits", lambda *a, **k: pytest.fail("logits computed"))
    accuracy = cli.evaluate(compose_config(f"run={run}", name="ensemble"))
    assert accuracy == json.loads((run / "results.json").read_text())["ensemble"]["acc"]


def test_runs_that_differ_in_how_their_images_are_held_are_scored_as_the_same_data(make_cfg):
    from omegaconf import OmegaConf
    from snapens.ensemble.tool import same_data

    new = make_cfg(*EQUAL_CYCLES_3, "data.storage=stream", "data.workers=4", "data.memory_gib=2").data
    old = OmegaConf.create(OmegaConf.to_container(make_cfg(*EQUAL_CYCLES_3).data))  # as a run's file holds it
    for key in ("storage", "workers", "memory_gib", "crop"):  # a run made before these keys
        del old[key]
    assert same_data(old, new) and same_data(new, old)
    assert not same_data(old, make_cfg(*EQUAL_CYCLES_3, "data.crop=resized").data)
    assert not same_data(old, make_cfg(*EQUAL_CYCLES_3, "data.val_size=8").data)


# ---- the crop for large images ------------------------------------------------------------------------------------
def test_random_resized_crop_of_the_whole_area_at_the_image_s_aspect_ratio_is_the_image():
    for h, w in ((24, 24), (20, 40)):  # the image's own aspect ratio, 1 and 2
        x = torch.rand(3, 3, h, w)
        out = random_resized_crop(x, torch.Generator().manual_seed(0), scale=(1, 1), ratio=(w / h, w / h))
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


def test_random_resized_crop_keeps_the_aspect_ratio_in_pixels_on_a_wide_image():
    h, w = 32, 64
    columns = torch.arange(float(w)).expand(3, 3, h, w)
    rows = torch.arange(float(h))[:, None].expand(3, 3, h, w)
    g = dict(scale=(0.25, 0.25), ratio=(2, 2))  # a quarter of 32 x 64 at 2:1: a 32 x 16 pixel window
    across = random_resized_crop(columns, torch.Generator().manual_seed(1), **g)[:, 0, 0, 1:-1].diff()
    down = random_resized_crop(rows, torch.Generator().manual_seed(1), **g)[:, 0, 1:-1, 0].diff()
    assert torch.allclose(across, torch.full_like(across, 32 / w), atol=1e-4)  # 32 pixels over 64 outputs
    assert torch.allclose(down, torch.full_like(down, 16 / h), atol=1e-4)  # 16 pixels over 32 outputs


def test_crop_resized_trains_end_to_end_and_pad_keeps_the_hash_of_runs_made_before_the_key(make_cfg, tmp_path):
    from snapens.build import config_hash, recipe

    for crop in ("pad", "resized"):
        train(make_cfg(*EQUAL_CYCLES_3, f"data.crop={crop}"), tmp_path / crop)
    resized, pad = (json.loads((tmp_path / c / "metrics.jsonl").read_text().splitlines()[0])
                    for c in ("resized", "pad"))
    assert resized["train_loss"] != pad["train_loss"] and math.isfinite(resized["train_loss"])  # other images seen
    before = recipe(make_cfg(*EQUAL_CYCLES_3))
    del before["data"]["crop"]  # a run made before data.crop existed
    assert config_hash(before) == config_hash(recipe(make_cfg(*EQUAL_CYCLES_3)))
    assert config_hash(recipe(make_cfg(*EQUAL_CYCLES_3, "data.crop=resized"))) != config_hash(before)
