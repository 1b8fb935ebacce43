"""Tests for snapens.data: augmentation invariants, loaders, subsets, statistics and the image-folder cache."""

import os
import pickle
import shutil
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import snapens.data
import snapens.folders
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from snapens.batches import (
    Augmentation,
    cutout,
    eval_batches,
    normalize,
    random_crop,
    random_flip,
    train_batches,
)
from snapens.data import (
    Split,
    balanced_subset,
    channel_stats,
    load_cifar,
    load_image_folder,
    make_synthetic,
    prepare,
    scan_image_folder,
    split_digest,
)
from snapens.errors import SnapensError
from snapens.images import read_image
from torchvision.io import encode_png, write_jpeg, write_png

from conftest import write_image_folder, says

# The tests write their image files with torchvision.io, which warns that it is deprecated (torchcodec replaces it).
pytestmark = pytest.mark.filterwarnings("ignore:The image decoding and encoding:DeprecationWarning")

MEAN = (0.49, 0.48, 0.45)
STD = (0.25, 0.24, 0.26)


# ---------------------------------------------------------------- helpers


def gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def random_images(n: int, size: int = 8, seed: int = 0, low: int = 0) -> torch.Tensor:
    """uint8 n x 3 x size x size; low=1 keeps 0 for the padding only."""
    return torch.randint(low, 256, (n, 3, size, size), generator=gen(seed), dtype=torch.uint8)


def direct_normalize(images: torch.Tensor, mean=MEAN, std=STD) -> torch.Tensor:
    """(x/255 - mean)/std in float64, written out independently of the library."""
    m = torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1)
    s = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    return (images.double() / 255 - m) / s


def indexed_split(n: int, size: int = 8) -> Split:
    """Labels 0..n-1 (unique), so a batch's labels say exactly which images it holds."""
    return Split(random_images(n, size), torch.arange(n))


def crop_offsets(out: torch.Tensor, images: torch.Tensor, padding: int) -> list[list[tuple[int, int]]]:
    """For every image, all (dy, dx) whose window of the zero-padded input equals the output (brute force)."""
    h, w = images.shape[2:]
    padded = F.pad(images, (padding,) * 4)
    return [[(dy, dx) for dy in range(2 * padding + 1) for dx in range(2 * padding + 1)
             if torch.equal(out[b], padded[b, :, dy:dy + h, dx:dx + w])] for b in range(len(images))]


def zero_rectangle(mask: torch.Tensor) -> tuple[int, int, int, int]:
    """(top, height, left, width) of the zeroed pixels of an H x W mask, asserting they form one rectangle."""
    rows = mask.any(1).nonzero().flatten()
    cols = mask.any(0).nonzero().flatten()
    assert len(rows) and len(cols), "cutout zeroed nothing"
    assert torch.equal(rows, torch.arange(int(rows[0]), int(rows[-1]) + 1)), "zeroed rows are not contiguous"
    assert torch.equal(cols, torch.arange(int(cols[0]), int(cols[-1]) + 1)), "zeroed columns are not contiguous"
    rect = torch.zeros_like(mask)
    rect[rows[0]:rows[-1] + 1, cols[0]:cols[-1] + 1] = True
    assert torch.equal(mask, rect), "zeroed pixels are not a rectangle"
    return int(rows[0]), len(rows), int(cols[0]), len(cols)


def class_counts(labels: torch.Tensor, num_classes: int) -> list[int]:
    return torch.bincount(labels, minlength=num_classes).tolist()


# ---------------------------------------------------------------- augmentation


@pytest.mark.parametrize("padding", [1, 2, 4])
def test_random_crop_outputs_windows_of_the_padded_image(padding):
    """Each output image is exactly one HxW window of its zero-padded input; shape and dtype are kept."""
    images = random_images(48, low=1)
    out = random_crop(images, padding, gen(1))
    assert out.shape == images.shape and out.dtype == images.dtype
    offsets = crop_offsets(out, images, padding)
    assert all(len(o) == 1 for o in offsets), "some output is not a window of its padded input"
    assert len({o[0] for o in offsets}) > 1, "every image got the same crop"


def test_random_crop_offsets_cover_the_whole_range():
    """With padding 1 every shift -1, 0, +1 occurs on each axis (both ends of the range are reachable)."""
    images = random_images(200, size=6, low=1)
    offsets = [o[0] for o in crop_offsets(random_crop(images, 1, gen(2)), images, 1)]
    assert {dy for dy, _ in offsets} == {0, 1, 2}
    assert {dx for _, dx in offsets} == {0, 1, 2}


def test_random_crop_padding_zero_is_identity():
    """padding=0 leaves the only window there is: the image itself."""
    images = random_images(16)
    assert torch.equal(random_crop(images, 0, gen()), images)


def test_random_flip_is_identity_or_mirror_and_both_occur():
    """Every output is the input or its left-right mirror, and a batch of 64 has both."""
    images = random_images(64)
    out = random_flip(images, gen(3))
    same = [torch.equal(o, i) for o, i in zip(out, images)]
    mirrored = [torch.equal(o, i.flip(-1)) for o, i in zip(out, images)]
    assert all(s or m for s, m in zip(same, mirrored))
    assert any(same) and any(mirrored)


@pytest.mark.parametrize("size", [1, 3, 4])
def test_cutout_zeroes_one_clipped_square(size):
    """Cutout zeroes one size x size square (clipped at the borders, same in every channel) and nothing else."""
    h = w = 12
    x = torch.ones(96, 3, h, w)
    out = cutout(x, size, gen(4))
    assert out.shape == x.shape
    assert set(out.unique().tolist()) <= {0.0, 1.0}
    shapes = set()
    for image in out:
        zero = image == 0
        assert torch.equal(zero[0], zero[1]) and torch.equal(zero[0], zero[2]), "channels differ"
        top, height, left, width = zero_rectangle(zero[0])
        for start, length, limit in ((top, height, h), (left, width, w)):
            if 0 < start and start + length < limit:  # away from the border: the whole side
                assert length == size
            else:  # the centre pixel is in the image, so at least half the square around it is kept
                assert (size + 1) // 2 <= length <= size
        shapes.add((height, width))
    assert (size, size) in shapes, "no whole square in 96 draws"
    assert size == 1 or len(shapes) > 1, "no square clipped at a border in 96 draws"


def test_normalize_matches_direct_formula():
    """normalize gives float32 (x/255 - mean)/std per channel."""
    images = random_images(5, size=4)
    out = normalize(images, MEAN, STD)
    assert out.dtype == torch.float32 and out.shape == images.shape
    torch.testing.assert_close(out.double(), direct_normalize(images), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- batches


def collect(batches):
    xs, ys = zip(*batches)
    return list(xs), list(ys)


def test_train_batches_are_reproducible_for_a_seed():
    """The same seed gives identical batches, images and labels, augmentation included."""
    split = indexed_split(50)
    aug = Augmentation(padding=2, flip=True, cutout=3)
    xs1, ys1 = collect(train_batches(split, 16, gen(7), aug, MEAN, STD))
    xs2, ys2 = collect(train_batches(split, 16, gen(7), aug, MEAN, STD))
    assert len(xs1) == len(xs2)
    assert all(torch.equal(a, b) for a, b in zip(xs1, xs2))
    assert all(torch.equal(a, b) for a, b in zip(ys1, ys2))


def test_train_batches_order_depends_on_seed():
    """Different seeds give different example orders."""
    split = indexed_split(64)
    aug = Augmentation(padding=0, flip=False)
    _, ys1 = collect(train_batches(split, 16, gen(0), aug, MEAN, STD))
    _, ys2 = collect(train_batches(split, 16, gen(1), aug, MEAN, STD))
    assert not torch.equal(torch.cat(ys1), torch.cat(ys2))


@pytest.mark.parametrize("n, batch_size", [(50, 16), (48, 16), (5, 8)])
def test_train_batches_cover_each_example_once(n, batch_size):
    """One epoch visits every example exactly once; only the last batch may be smaller."""
    split = indexed_split(n)
    xs, ys = collect(train_batches(split, batch_size, gen(), Augmentation(), MEAN, STD))
    sizes = [len(y) for y in ys]
    expected = [batch_size] * (n // batch_size) + ([n % batch_size] if n % batch_size else [])
    assert sizes == expected
    assert [len(x) for x in xs] == sizes
    assert sorted(torch.cat(ys).tolist()) == list(range(n))
    assert all(x.dtype == torch.float32 and x.shape[1:] == (3, 8, 8) for x in xs)


def test_train_batches_without_augmentation_are_normalised_images_in_shuffled_order():
    """padding=0, flip=False, cutout=0: each batch is exactly the normalised images of its labels."""
    split = indexed_split(40)
    xs, ys = collect(train_batches(split, 16, gen(5), Augmentation(padding=0, flip=False, cutout=0), MEAN, STD))
    order = torch.cat(ys)
    assert not torch.equal(order, torch.arange(40)), "the order should be shuffled"
    torch.testing.assert_close(torch.cat(xs).double(), direct_normalize(split.images[order]), rtol=0, atol=1e-5)


@pytest.mark.parametrize("aug", [Augmentation(padding=0, flip=True), Augmentation(padding=0, flip=False, cutout=3)],
                         ids=["flip", "cutout"])
def test_train_batches_apply_the_augmentation(aug):
    """flip: each image is the normalised input or its mirror, both occur; cutout: only a square becomes 0."""
    split = indexed_split(64)
    xs, ys = collect(train_batches(split, 16, gen(6), aug, MEAN, STD))
    plain = direct_normalize(split.images[torch.cat(ys)]).float()
    out = torch.cat(xs)

    def close(a, b):
        return torch.allclose(a, b, rtol=0, atol=1e-5)

    if aug.flip:
        same = [close(o, p) for o, p in zip(out, plain)]
        mirrored = [close(o, p.flip(-1)) for o, p in zip(out, plain)]
        assert all(s or m for s, m in zip(same, mirrored)) and any(same) and any(mirrored)
    else:
        changed = ~torch.isclose(out, plain, rtol=0, atol=1e-5)
        assert torch.all(out[changed] == 0) and changed.any()
        for image in changed:
            _, height, _, width = zero_rectangle(image.any(0))
            assert height <= 3 and width <= 3


def test_eval_batches_in_order_without_augmentation():
    """eval_batches yields the split in order, normalised, in batch_size chunks."""
    split = indexed_split(21)
    xs, ys = collect(eval_batches(split, 8, MEAN, STD))
    assert [len(y) for y in ys] == [8, 8, 5]
    assert torch.equal(torch.cat(ys), torch.arange(21))
    torch.testing.assert_close(torch.cat(xs).double(), direct_normalize(split.images), rtol=0, atol=1e-5)


# ---------------------------------------------------------------- subsets and statistics


@pytest.mark.parametrize("class_sizes, n", [
    ([10, 10, 10], 12),  # divisible: exactly n/C each
    ([10, 10, 10], 13),  # not divisible: counts differ by one
    ([7, 12, 9, 20], 22),
    ([2, 10, 10], 12),  # a small class is used up, the rest share the remainder
])
def test_balanced_subset_is_as_balanced_as_possible(class_sizes, n):
    """Per-class counts differ by at most 1 among classes that are not used up; no index repeats."""
    labels = torch.cat([torch.full((s,), c) for c, s in enumerate(class_sizes)])
    labels = labels[torch.randperm(len(labels), generator=gen(9))]
    index = balanced_subset(labels, n, gen())
    assert len(index) == n and len(set(index.tolist())) == n
    assert torch.equal(index, index.sort().values)
    counts = class_counts(labels[index], len(class_sizes))
    for count_a, size_a in zip(counts, class_sizes):
        assert count_a <= size_a
        if count_a < size_a:  # class a still had examples: nobody may have more than one extra
            assert all(count_b <= count_a + 1 for count_b in counts)
    if n % len(class_sizes) == 0 and min(class_sizes) >= n // len(class_sizes):
        assert counts == [n // len(class_sizes)] * len(class_sizes)


def test_balanced_subset_is_deterministic_for_a_seed():
    """The same seed picks the same indices; another seed picks others."""
    labels = torch.arange(100) % 5
    a = balanced_subset(labels, 20, gen(1))
    assert torch.equal(a, balanced_subset(labels, 20, gen(1)))
    assert not torch.equal(a, balanced_subset(labels, 20, gen(2)))


def direct_stats(images: torch.Tensor):
    x = images.double() / 255
    return x.mean((0, 2, 3)).tolist(), x.std((0, 2, 3), correction=0).tolist()


def test_channel_stats_matches_direct_computation():
    """Per-channel mean and population std on the 0..1 scale, across several 4096-image chunks."""
    images = torch.randint(0, 256, (9000, 3, 2, 2), generator=gen(), dtype=torch.uint8)
    images[:, 1] //= 2  # make the channels differ
    mean, std = channel_stats(images)
    exp_mean, exp_std = direct_stats(images)
    assert mean == pytest.approx(exp_mean, abs=1e-12)
    assert std == pytest.approx(exp_std, abs=1e-10)


def test_channel_stats_chunks_are_bounded_in_bytes_at_any_image_size(monkeypatch):
    """At 224 px a chunk is 83 images (96 MiB of float64), not 4,096 (4.6 GiB); at 32 px it stays 4,096."""
    from snapens import data
    assert data.stats_chunk(torch.zeros(1, 3, 224, 224, dtype=torch.uint8)) == 83
    assert data.stats_chunk(torch.zeros(1, 3, 32, 32, dtype=torch.uint8)) == 4096
    assert data.stats_chunk(torch.zeros(1, 3, 8000, 8000, dtype=torch.uint8)) == 1
    monkeypatch.setattr(data, "STATS_CHUNK_BYTES", 8 * 3 * 224 * 224 * 7)  # 7 images a chunk: several chunks
    images = torch.randint(0, 256, (30, 3, 224, 224), generator=gen(), dtype=torch.uint8)
    sizes = []
    real = torch.Tensor.split
    monkeypatch.setattr(torch.Tensor, "split", lambda self, n, *a: sizes.append(n) or real(self, n, *a))
    mean, std = data.channel_stats(images)
    assert sizes == [7]
    exp_mean, exp_std = direct_stats(images)
    assert mean == pytest.approx(exp_mean, abs=1e-12) and std == pytest.approx(exp_std, abs=1e-10)


def id_split(n: int, num_classes: int, size: int = 4, seed: int = 0) -> Split:
    """Image i carries its id i in pixel (0, 0, 0) and has label i % num_classes; the other pixels are noise."""
    images = random_images(n, size, seed)
    images[:, 0, 0, 0] = torch.arange(n, dtype=torch.uint8)
    return Split(images, torch.arange(n) % num_classes)


def ids(split: Split) -> list[int]:
    return split.images[:, 0, 0, 0].tolist()


@pytest.mark.parametrize("val_size", [12, 10])
def test_prepare_holds_out_a_balanced_disjoint_validation_split(val_size):
    """val and train are disjoint, together exactly the original train; val is class-balanced; labels stay put."""
    train, test = id_split(60, 3), id_split(30, 3, seed=1)
    ds = prepare(train, test, ["a", "b", "c"], val_size=val_size, seed=3)
    assert len(ds.val) == val_size and len(ds.train) == 60 - val_size
    assert set(ids(ds.val)).isdisjoint(ids(ds.train))
    assert sorted(ids(ds.val) + ids(ds.train)) == list(range(60))
    counts = class_counts(ds.val.labels, 3)
    assert max(counts) - min(counts) <= 1
    for part in (ds.val, ds.train):
        assert part.labels.tolist() == [i % 3 for i in ids(part)]
    assert ds.test is test and ds.classes == ["a", "b", "c"]


def test_prepare_limits_and_statistics():
    """train_limit/test_limit give balanced subsets of those sizes after the val split; stats are of train."""
    train, test = id_split(90, 3), id_split(60, 3, seed=1)
    ds = prepare(train, test, ["a", "b", "c"], train_limit=30, test_limit=21, val_size=9, seed=0)
    assert (len(ds.train), len(ds.test), len(ds.val)) == (30, 21, 9)
    assert class_counts(ds.train.labels, 3) == [10, 10, 10]
    assert class_counts(ds.test.labels, 3) == [7, 7, 7]
    assert set(ids(ds.val)).isdisjoint(ids(ds.train))
    assert class_counts(ds.val.labels, 3) == [3, 3, 3]
    assert len(set(ids(ds.test))) == 21
    exp_mean, exp_std = direct_stats(ds.train.images)
    assert ds.mean == pytest.approx(exp_mean, abs=1e-12)
    assert ds.std == pytest.approx(exp_std, abs=1e-10)


def test_prepare_is_deterministic_for_a_seed():
    """The same seed gives the same val/train split; another seed another one."""
    train, test = id_split(60, 3), id_split(30, 3)
    a, b, c = (prepare(train, test, ["a", "b", "c"], val_size=9, train_limit=21, seed=s) for s in (5, 5, 6))
    assert ids(a.val) == ids(b.val) and ids(a.train) == ids(b.train)
    assert ids(a.val) != ids(c.val)


@pytest.mark.parametrize("val_size", [60, 61])
def test_prepare_rejects_val_size_that_leaves_no_training_images(val_size):
    """val_size >= len(train) is a SnapensError naming the key."""
    with pytest.raises(SnapensError, match="val_size"):
        prepare(id_split(60, 3), id_split(30, 3), ["a", "b", "c"], val_size=val_size)


def test_make_synthetic_shapes_balance_and_determinism():
    """Synthetic splits are uint8 N x 3 x S x S, balanced, seeded, and each class has its dominant colour."""
    train, test, classes = make_synthetic(4, 40, 20, 6, seed=1)
    assert classes == ["class0", "class1", "class2", "class3"]
    for split, n in ((train, 40), (test, 20)):
        assert split.images.shape == (n, 3, 6, 6) and split.images.dtype == torch.uint8
        assert split.labels.dtype == torch.int64
        assert class_counts(split.labels, 4) == [n // 4] * 4
        channel_means = split.images.double().mean((2, 3))  # n x 3
        assert torch.equal(channel_means.argmax(1), split.labels % 3)
    again, _, _ = make_synthetic(4, 40, 20, 6, seed=1)
    other, _, _ = make_synthetic(4, 40, 20, 6, seed=2)
    assert torch.equal(again.images, train.images) and torch.equal(again.labels, train.labels)
    assert not torch.equal(other.images, train.images)


# ---------------------------------------------------------------- image folders


def solid(colour, size=(8, 8)) -> torch.Tensor:
    return torch.tensor(colour, dtype=torch.uint8).view(3, 1, 1).expand(3, *size).contiguous()


def write_image(path: Path, image: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".png":
        write_png(image, str(path))
    else:
        write_jpeg(image, str(path), quality=100)


def write_tree(root: Path, tree: dict) -> None:
    """tree: {split: {class: {file name: image}}}."""
    for split, classes in tree.items():
        (root / split).mkdir(parents=True, exist_ok=True)
        for name, files in classes.items():
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for file, image in files.items():
                write_image(root / split / name / file, image)


def small_tree() -> dict:
    """Classes created unsorted; test lacks 'moose'; one JPEG; PNGs of noise so every pixel is checked."""
    def noise(seed):
        return random_images(1, 8, seed)[0]

    return {
        "train": {
            "zebra": {"b.png": noise(1), "a.png": noise(2)},
            "ant": {"c.jpg": solid((200, 40, 90)), "a.png": noise(3)},
            "moose": {"x.png": noise(4)},
        },
        "test": {
            "zebra": {"t.png": noise(5)},
            "ant": {"u.png": noise(6), "s.png": noise(7)},
        },
    }


def expected_split(tree_split: dict, classes: list[str]):
    """Images, labels and which files are JPEGs, in class-name order, then file-name order."""
    images, labels, lossy = [], [], []
    for name in sorted(tree_split):
        for file in sorted(tree_split[name]):
            images.append(tree_split[name][file])
            labels.append(classes.index(name))
            lossy.append(file.endswith(".jpg"))
    return torch.stack(images), labels, lossy


def assert_images_match(actual: torch.Tensor, expected: torch.Tensor, lossy: list[bool]) -> None:
    assert actual.shape == expected.shape and actual.dtype == torch.uint8
    for a, e, jpeg in zip(actual, expected, lossy):
        if jpeg:  # a solid colour survives JPEG at quality 100 almost exactly
            assert (a.int() - e.int()).abs().max() <= 3
        else:
            assert torch.equal(a, e)


def assert_splits_equal(a: Split, b: Split) -> None:
    assert torch.equal(a.images, b.images) and torch.equal(a.labels, b.labels)


def test_load_image_folder_reads_images_labels_and_class_order(tmp_path):
    """Classes sorted by name; images in class then file order; a test split lacking a class keeps train's labels."""
    tree = small_tree()
    write_tree(tmp_path, tree)
    train, test, classes = load_image_folder(str(tmp_path))
    assert classes == ["ant", "moose", "zebra"]
    for split, name in ((train, "train"), (test, "test")):
        images, labels, lossy = expected_split(tree[name], classes)
        assert_images_match(split.images, images, lossy)
        assert split.labels.tolist() == labels
    assert test.labels.tolist() == [0, 0, 2]  # zebra is class 2 even though test has only two classes


def test_an_image_folder_decodes_only_the_images_a_run_uses(tmp_path, monkeypatch):
    """The validation split, data.train_limit and data.test_limit choose files by their labels before any file is
    decoded (issue 22): 8 training, 4 validation and 4 test images of the folder's 64 + 16 are decoded, and they are
    the images, labels and statistics the whole decoded folder gives; once the whole folder is cached, a run decodes
    nothing."""
    write_image_folder(tmp_path)
    decoded, real = [], snapens.folders.read_image
    monkeypatch.setattr(snapens.folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    options = dict(train_limit=8, test_limit=4, val_size=4, seed=3)
    part = prepare(*scan_image_folder(str(tmp_path)), **options)
    assert len(decoded) == len(set(decoded)) == 8 + 4 + 4
    whole = prepare(*load_image_folder(str(tmp_path)), **options)  # decodes all 80 images and caches them
    assert len(decoded) == 16 + 80
    decoded.clear()
    cached = prepare(*scan_image_folder(str(tmp_path)), **options)
    assert decoded == []
    for data in (part, cached):
        for name in ("train", "val", "test"):
            mine, full = getattr(data, name), getattr(whole, name)
            assert torch.equal(mine.images, full.images) and torch.equal(mine.labels, full.labels)
        assert (data.mean, data.std, data.classes) == (whole.mean, whole.std, whole.classes)


def waiting_rank_1(monkeypatch, load) -> tuple[threading.Thread, dict]:
    """`load()` started as local rank 1 in a thread (the only thread that waits for rank 0's cache), once it waits:
    the thread, and a dict that gets its result under "got"."""
    monkeypatch.setattr(snapens.folders, "WAIT_SECONDS", 0.01)
    waiting, wait = threading.Event(), snapens.folders._wait_for
    monkeypatch.setattr(snapens.folders, "_wait_for", lambda *a: waiting.set() or wait(*a))
    result = {}
    rank_1 = threading.Thread(target=lambda: result.update(got=load()), daemon=True)
    monkeypatch.setattr(snapens.folders, "_waits_for_local_rank_0", lambda: threading.current_thread() is rank_1)
    rank_1.start()
    assert waiting.wait(timeout=60)  # rank 1 found no cache and waits
    return rank_1, result


@pytest.mark.parametrize("rank_0_caches", [True, False])
def test_other_ranks_wait_for_local_rank_0_to_decode(tmp_path, monkeypatch, rank_0_caches):
    """Two processes of a node with a cold cache (issue 22: both decoded every image and wrote the same file): local
    rank 1 waits for local rank 0's cache file and decodes nothing; when rank 0 cannot write the cache (a full disk),
    it says so with a marker file and rank 1 decodes for itself."""
    write_image_folder(tmp_path)  # 64 + 16 images
    decoded, real = [], snapens.folders.read_image
    monkeypatch.setattr(snapens.folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    if not rank_0_caches:
        monkeypatch.setattr(snapens.folders, "write_atomic", lambda *a: (_ for _ in ()).throw(SnapensError("full")))
    rank_1, result = waiting_rank_1(monkeypatch, lambda: load_image_folder(str(tmp_path)))
    train, test, _ = load_image_folder(str(tmp_path))  # rank 0 decodes both splits
    rank_1.join(timeout=60)
    assert not rank_1.is_alive()
    assert torch.equal(result["got"][0].images, train.images) and torch.equal(result["got"][1].images, test.images)
    assert len(decoded) == (80 if rank_0_caches else 160)


def test_a_waiting_rank_decodes_for_itself_when_rank_0_fails_to(tmp_path, monkeypatch):
    """Rank 0's decode of the training split stops with an error (a bad image, a stop signal): it leaves the marker
    on its way out, so rank 1 stops waiting and decodes (here it can; with a bad image it would meet the same error
    and say so) instead of waiting forever."""
    write_image_folder(tmp_path)
    real, failed = snapens.folders.read_image, []
    monkeypatch.setattr(snapens.folders, "read_image", lambda path, size: real(path, size) if failed else
                        failed.append(path) or 1 / 0)  # the first image read fails, later ones do not
    rank_1, result = waiting_rank_1(monkeypatch, lambda: scan_image_folder(str(tmp_path))[0].load())
    with pytest.raises(ZeroDivisionError):
        scan_image_folder(str(tmp_path))[0].load()  # rank 0
    rank_1.join(timeout=60)
    assert not rank_1.is_alive() and len(result["got"]) == 64


def test_a_waiting_rank_stops_when_rank_0_cached_other_files(tmp_path, monkeypatch):
    """A file changed between rank 1's look and rank 0's: rank 0 caches under another fingerprint, which rank 1 never
    sees under its own name; it stops waiting when that cache appears and decodes what it sees."""
    write_image_folder(tmp_path)
    rank_1, result = waiting_rank_1(monkeypatch, lambda: scan_image_folder(str(tmp_path))[0].load())
    other = tmp_path / ".snapens_cache" / "train-0-0123456789abcdef.safetensors"
    other.write_bytes(b"rank 0's, of other files")
    os.utime(other, (time.time() + 10,) * 2)  # written after rank 1 began to wait, whatever the clock's resolution
    rank_1.join(timeout=60)
    assert not rank_1.is_alive() and len(result["got"]) == 64


def test_a_validation_split_of_a_whole_folder_caches_it(tmp_path, monkeypatch):
    """A validation split held out of all the training images (no train_limit) uses the whole split: it is decoded
    once, cached, and the next run decodes nothing."""
    write_image_folder(tmp_path)
    decoded, real = [], snapens.folders.read_image
    monkeypatch.setattr(snapens.folders, "read_image", lambda path, size: decoded.append(path) or real(path, size))
    first = prepare(*scan_image_folder(str(tmp_path)), val_size=8, seed=1)
    assert len(decoded) == 64 + 16
    decoded.clear()
    again = prepare(*scan_image_folder(str(tmp_path)), val_size=8, seed=1)
    assert decoded == [] and torch.equal(again.train.images, first.train.images)
    assert torch.equal(again.val.images, first.val.images) and (len(again.train), len(again.val)) == (56, 8)


@pytest.mark.parametrize("env, waits", [({}, False), ({"WORLD_SIZE": "2", "LOCAL_RANK": "0"}, False),
                                        ({"WORLD_SIZE": "2", "LOCAL_RANK": "1"}, True),
                                        ({"WORLD_SIZE": "4", "LOCAL_RANK": "3"}, True)])
def test_which_ranks_wait_for_the_decode_cache(monkeypatch, env, waits):
    """torchrun's (and submitit's exported) variables: every process but each node's first waits."""
    for key in ("WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert snapens.folders._waits_for_local_rank_0() is waits


def test_load_image_folder_second_load_reads_the_cache(tmp_path, monkeypatch):
    """After one load, a second one decodes nothing (decoding is made to fail) and returns equal tensors."""
    write_tree(tmp_path, small_tree())
    first = load_image_folder(str(tmp_path))
    assert len(list((tmp_path / ".snapens_cache").glob("*.safetensors"))) == 2

    def no_decode(*args):
        raise AssertionError("decoded an image although the cache is valid")

    monkeypatch.setattr(snapens.folders, "read_image", no_decode)
    second = load_image_folder(str(tmp_path))
    assert_splits_equal(first[0], second[0])
    assert_splits_equal(first[1], second[1])
    assert first[2] == second[2]


def same_length_png(old: torch.Tensor) -> torch.Tensor:
    """A different solid image whose PNG has exactly as many bytes as `old`'s."""
    want = len(encode_png(old))
    for value in range(256):
        image = solid((value, 255 - value, 7))
        if not torch.equal(image, old) and len(encode_png(image)) == want:
            return image
    raise AssertionError("no same-length PNG found")


@pytest.mark.parametrize("change", ["size", "mtime", "pixels"])
def test_load_image_folder_changed_file_invalidates_the_cache(tmp_path, change):
    """Editing an image is seen: a new byte size (same mtime), a new mtime (same byte size), or only other pixels
    (same byte size and mtime set back: the status-change time still moved) all re-decode."""
    path = tmp_path / "train" / "cat" / "a.png"
    write_tree(tmp_path, {"train": {"cat": {"a.png": solid((10, 20, 30)), "b.png": solid((1, 2, 3))}},
                          "test": {"cat": {"c.png": solid((4, 5, 6))}}})
    load_image_folder(str(tmp_path))
    before = path.stat()
    if change == "size":
        new = random_images(1, 8, seed=11)[0]
        write_image(path, new)
        assert path.stat().st_size != before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    else:  # mtime, pixels
        new = same_length_png(solid((10, 20, 30)))
        write_image(path, new)
        assert path.stat().st_size == before.st_size
        os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns + 10**9 * (change == "mtime")))
    train, _, _ = load_image_folder(str(tmp_path))
    assert torch.equal(train.images[0], new)


def test_a_cache_file_copied_over_another_is_not_trusted(tmp_path):
    """The test split's cache copied over the train split's file name: train is decoded again, not taken from it."""
    write_tree(tmp_path, small_tree())
    train, test, _ = load_image_folder(str(tmp_path))
    caches = {p.name.split("-")[0]: p for p in (tmp_path / ".snapens_cache").glob("*.safetensors")}
    shutil.copyfile(caches["test"], caches["train"])
    again, _, _ = load_image_folder(str(tmp_path))
    assert_splits_equal(again, train)


def test_load_image_folder_image_size_resizes(tmp_path):
    """data.image_size=N resizes images of any size to N x N (a solid colour stays that colour)."""
    colours = [(200, 10, 50), (0, 128, 255)]
    write_tree(tmp_path, {"train": {"a": {"big.png": solid(colours[0], (12, 10))},
                                    "b": {"small.png": solid(colours[1], (5, 7))}},
                          "test": {"a": {"t.png": solid(colours[0], (9, 9))}}})
    train, test, _ = load_image_folder(str(tmp_path), image_size=6)
    assert train.images.shape == (2, 3, 6, 6) and test.images.shape == (1, 3, 6, 6)
    for image, colour in zip(train.images, colours):
        assert (image.int() - solid(colour, (6, 6)).int()).abs().max() <= 1


def _only_test(root):
    write_tree(root, {"test": {"a": {"x.png": solid((1, 1, 1))}}})


def _only_train(root):
    write_tree(root, {"train": {"a": {"x.png": solid((1, 1, 1))}}})


def _no_classes(root):
    write_image(root / "train" / "loose.png", solid((1, 1, 1)))  # an image, but not in a class folder
    (root / "test").mkdir()


def _empty_class(root):
    write_tree(root, {"train": {"a": {"x.png": solid((1, 1, 1))}, "b": {}}, "test": {"a": {"y.png": solid((1, 1, 1))}}})
    (root / "train" / "b" / "notes.txt").write_text("not an image")


def _corrupt(root):
    write_tree(root, {"train": {"a": {"x.png": solid((1, 1, 1))}}, "test": {"a": {"y.png": solid((1, 1, 1))}}})
    (root / "train" / "a" / "broken.png").write_bytes(b"\x89PNG this is not really a png")


def _mixed_sizes(root):
    write_tree(root, {"train": {"a": {"x.png": solid((1, 1, 1), (8, 8))}, "b": {"y.png": solid((1, 1, 1), (6, 8))}},
                      "test": {"a": {"z.png": solid((1, 1, 1))}}})


def _extra_test_class(root):
    write_tree(root, {"train": {"a": {"x.png": solid((1, 1, 1))}},
                      "test": {"a": {"y.png": solid((1, 1, 1))}, "ghost": {"z.png": solid((1, 1, 1))}}})


@pytest.mark.parametrize("make, fragments", [
    (_only_test, lambda r: ["no train/ folder"]),
    (_only_train, lambda r: ["no test/ folder"]),
    (_no_classes, lambda r: ["no images", "no class folders"]),
    (_empty_class, lambda r: [str(r / "train" / "b"), "no images"]),
    (_corrupt, lambda r: [str(r / "train" / "a" / "broken.png"), "cannot read"]),
    (_mixed_sizes, lambda r: ["differ in size", "data.image_size"]),
    (_extra_test_class, lambda r: ["ghost"]),
], ids=["no-train", "no-test", "no-classes", "empty-class", "corrupt", "mixed-sizes", "extra-test-class"])
def test_load_image_folder_errors_name_the_problem(tmp_path, make, fragments):
    """Each malformed folder gives a SnapensError whose message names what is wrong."""
    make(tmp_path)
    with pytest.raises(SnapensError) as info:
        load_image_folder(str(tmp_path))
    for fragment in fragments(tmp_path):
        assert fragment in str(info.value)


def test_load_image_folder_ignores_hidden_folders_in_train(tmp_path):
    """A hidden folder in train/ (here with an image in it) is not a class."""
    write_tree(tmp_path, {"train": {"a": {"x.png": solid((1, 1, 1))}, ".hidden": {"y.png": solid((2, 2, 2))}},
                          "test": {"a": {"z.png": solid((3, 3, 3))}}})
    train, _, classes = load_image_folder(str(tmp_path))
    assert classes == ["a"] and train.labels.tolist() == [0]


def test_load_image_folder_ignores_hidden_folders_in_test(tmp_path):
    """A hidden folder such as .ipynb_checkpoints is ignored in test/ as it is in train/."""
    write_tree(tmp_path, {"train": {"a": {"x.png": solid((1, 1, 1))}, ".ipynb_checkpoints": {}},
                          "test": {"a": {"y.png": solid((2, 2, 2))}, ".ipynb_checkpoints": {}}})
    train, test, classes = load_image_folder(str(tmp_path))
    assert classes == ["a"] and test.labels.tolist() == [0]


def test_load_image_folder_unwritable_root_caches_under_home(tmp_path, monkeypatch):
    """A data folder where no cache folder can be made gets its cache in $HOME/.cache/snapens, and the second load
    reads it from there. (A file named .snapens_cache blocks the folder even for root, whom chmod cannot stop.)"""
    root, home = tmp_path / "data", tmp_path / "home"
    write_tree(root, small_tree())
    (root / ".snapens_cache").write_text("in the way")
    monkeypatch.setenv("HOME", str(home))
    first = load_image_folder(str(root))
    assert (root / ".snapens_cache").read_text() == "in the way"
    assert len(list((home / ".cache" / "snapens").rglob("*.safetensors"))) == 2
    monkeypatch.setattr(snapens.folders, "read_image", lambda *a: pytest.fail("decoded although cached"))
    second = load_image_folder(str(root))
    assert_splits_equal(first[0], second[0])
    assert_splits_equal(first[1], second[1])


# ---------------------------------------------------------------- CIFAR


def test_load_cifar_missing_without_download_names_folder(tmp_path):
    """download=False on an empty folder: a SnapensError naming cifar-10-batches-py and the folder."""
    with pytest.raises(SnapensError) as info:
        load_cifar(str(tmp_path), "cifar10", download=False)
    assert "cifar-10-batches-py" in str(info.value)
    assert str(tmp_path.resolve()) in str(info.value)


def write_fake_cifar10(root: Path, per_batch: int = 2, n_test: int = 3):
    """torchvision's python format: pickled dicts of uint8 N x 3072 rows (R plane, G plane, B plane, row-major)."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    g = gen(0)
    rows, labels = {}, {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        n = n_test if name == "test_batch" else per_batch
        rows[name] = torch.randint(0, 256, (n, 3072), generator=g, dtype=torch.uint8).numpy()
        labels[name] = torch.randint(0, 10, (n,), generator=g).tolist()
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rows[name], "labels": labels[name], "batch_label": name}, f)
    names = [f"name{i}" for i in range(10)]
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": names, "num_cases_per_batch": per_batch}, f)
    return rows, labels, names


def images_from_rows(rows) -> torch.Tensor:
    """Pixel (c, y, x) of an image is byte c*1024 + y*32 + x of its row."""
    c, y, x = torch.meshgrid(torch.arange(3), torch.arange(32), torch.arange(32), indexing="ij")
    return torch.from_numpy(rows)[:, c * 1024 + y * 32 + x]


def test_load_cifar_reads_torchvision_python_format(tmp_path, monkeypatch):
    """A tiny fake CIFAR-10 loads to uint8 N x 3 x 32 x 32 in RGB channel order with its labels and class names."""
    rows, labels, names = write_fake_cifar10(tmp_path)
    first = rows["data_batch_1"]
    first[0, [0 * 1024 + 5 * 32 + 7, 1 * 1024 + 5 * 32 + 7, 2 * 1024 + 5 * 32 + 7]] = [11, 22, 33]
    with open(tmp_path / "cifar-10-batches-py" / "data_batch_1", "wb") as f:
        pickle.dump({"data": first, "labels": labels["data_batch_1"]}, f)
    # the files are not the real ones, so their md5 sums cannot match
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "_check_integrity", lambda self: True)
    monkeypatch.setattr(torchvision.datasets.cifar, "check_integrity", lambda *a, **k: True)

    train, test, classes = load_cifar(str(tmp_path), "cifar10", download=False)
    assert classes == names
    assert train.images.shape == (10, 3, 32, 32) and train.images.dtype == torch.uint8
    assert train.images[0, :, 5, 7].tolist() == [11, 22, 33]
    train_rows = [rows[f"data_batch_{i}"] for i in range(1, 6)]
    assert torch.equal(train.images, images_from_rows(np.concatenate(train_rows)))
    assert train.labels.tolist() == sum((labels[f"data_batch_{i}"] for i in range(1, 6)), [])
    assert train.labels.dtype == torch.int64
    assert torch.equal(test.images, images_from_rows(rows["test_batch"]))
    assert test.labels.tolist() == labels["test_batch"]


def test_test_subset_does_not_depend_on_val_size_or_train_limit():
    """Runs meant to be compared are scored on the same test images whatever they hold out or subsample."""
    train, test = Split(random_images(60, 4, 1), torch.arange(60) % 3), Split(random_images(30, 4, 2),
                                                                             torch.arange(30) % 3)
    subsets = [prepare(train, test, ["a", "b", "c"], test_limit=9, seed=4, **kw).test.images
               for kw in ({}, {"val_size": 12}, {"train_limit": 20}, {"val_size": 6, "train_limit": 30})]
    assert all(torch.equal(s, subsets[0]) for s in subsets[1:])


def test_load_image_folder_without_test_classes(tmp_path):
    write_tree(tmp_path, {"train": {"a": {"x.png": solid((1, 1, 1))}}, "test": {}})
    (tmp_path / "test" / ".hidden").mkdir()
    with pytest.raises(SnapensError, match="has no test images: .*/test has no class folders"):
        load_image_folder(str(tmp_path))


def test_load_image_folder_train_and_test_sizes_must_agree(tmp_path):
    write_tree(tmp_path, {"train": {"a": {"x.png": solid((1, 1, 1), (8, 8))}},
                          "test": {"a": {"y.png": solid((1, 1, 1), (16, 12))}}})
    with pytest.raises(SnapensError) as info:
        load_image_folder(str(tmp_path))
    says(info.value, "test images are 12x16", "set data.image_size")
    train, test, _ = load_image_folder(str(tmp_path), image_size=10)
    assert train.images.shape[2:] == test.images.shape[2:] == (10, 10)


# ---- 2. resume checks its data ----------------------------------------------------------------------------------


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


def test_a_dangling_link_among_the_images_is_one_line(tmp_path):
    from snapens.data import load_image_folder
    write_image_folder(tmp_path)
    (tmp_path / "train" / "class0" / "zz.png").symlink_to(tmp_path / "gone.png")
    with pytest.raises(SnapensError, match="zz.png is a link to a file that does not exist"):
        load_image_folder(str(tmp_path))


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


def test_read_image_resizes_to_a_non_square_size(tmp_path):
    Image.new("RGB", (10, 10), (9, 99, 199)).save(tmp_path / "square.png")
    image = read_image(tmp_path / "square.png", (6, 8))  # what predict= asks for a model trained on 6 x 8 images
    assert image.shape == (3, 6, 8) and image[:, 0, 0].tolist() == [9, 99, 199]


def test_a_changed_image_leaves_one_cache_file_per_split(tmp_path):
    from snapens.data import load_image_folder
    write_image_folder(tmp_path)
    load_image_folder(str(tmp_path))
    Image.new("RGB", (32, 32), (1, 2, 3)).save(sorted((tmp_path / "train").rglob("*.png"))[0])
    load_image_folder(str(tmp_path))
    names = sorted(p.name.split("-")[0] for p in (tmp_path / ".snapens_cache").glob("*.safetensors"))
    assert names == ["test", "train"]  # the stale train cache is gone, not piled up


def test_a_split_is_hashed_once_however_often_its_digest_is_asked(monkeypatch):
    import snapens.splits

    split = make_synthetic(4, 16, 8, 8)[0]
    hashed = []
    real = snapens.splits._digest
    monkeypatch.setattr(snapens.splits, "_digest", lambda s: hashed.append(s) or real(s))
    first = split_digest(split)
    assert split_digest(split) == split_digest(split.to("cpu")) == first and len(hashed) == 1
    assert first == real(Split(split.images.clone(), split.labels.clone()))  # the same value as before the memo
