"""The offline demo: scikit-learn's handwritten digits as a dataset (data=digits) and the experiment=demo preset."""

import json

import pytest
import torch
from sklearn.datasets import load_digits as sklearn_digits

from snapens.build import build_data
from snapens.data import load_digits, stratified_split
from snapens.training import train

# Per class (digits 0..9): 178 182 177 183 181 182 181 179 174 180 images, 1,797 in all. The test split holds
# ceil(0.2 * 1797) = 360, each class its floor(360 * size / 1797) and the 5 left over to the largest remainders.
TEST_COUNTS = [36, 37, 35, 37, 36, 36, 36, 36, 35, 36]
CLASS_SIZES = [178, 182, 177, 183, 181, 182, 181, 179, 174, 180]


@pytest.fixture(scope="module")
def digits():
    return load_digits()


def test_sizes_shapes_and_exact_stratified_counts(digits):
    train, test, classes = digits
    assert classes == [str(d) for d in range(10)]
    assert (len(train), len(test)) == (1437, 360)
    for split in (train, test):
        assert split.images.dtype == torch.uint8 and split.images.shape[1:] == (3, 32, 32)
        assert split.labels.dtype == torch.int64 and 0 <= split.labels.min() and split.labels.max() <= 9
    assert torch.bincount(test.labels, minlength=10).tolist() == TEST_COUNTS
    assert torch.bincount(train.labels, minlength=10).tolist() == [s - t for s, t in zip(CLASS_SIZES, TEST_COUNTS)]


def test_grey_images_in_three_equal_channels(digits):
    for split in digits[:2]:
        assert torch.equal(split.images[:, 0], split.images[:, 1])
        assert torch.equal(split.images[:, 0], split.images[:, 2])


def test_pixels_are_the_source_values_scaled_in_4x4_blocks(digits):
    """Every image is an 8x8 source image, each pixel v as a constant 4x4 block of round(v * 255 / 16), half up;
    train and test together are all 1,797 source images, each exactly once, with its own label."""
    source = sklearn_digits()
    scaled = [int(v * 255 / 16 + 0.5) for v in range(17)]  # written out independently of the library
    assert scaled[:3] == [0, 16, 32] and scaled[8] == 128 and scaled[16] == 255
    expected = torch.tensor(scaled, dtype=torch.uint8)[torch.from_numpy(source.images).long()]  # N x 8 x 8
    expected = expected.repeat_interleave(4, 1).repeat_interleave(4, 2)  # N x 32 x 32: 4x4 blocks
    train, test, _ = digits
    images = torch.cat([train.images, test.images])[:, 0]
    labels = torch.cat([train.labels, test.labels])
    # match each loaded image to its source image (equal pixels); some digits occur twice in the data, so compare
    # as sorted multisets of (pixels, label) rows
    def rows(pixels, lab):
        return sorted(zip(map(bytes, pixels.flatten(1).numpy()), lab.tolist()))

    assert rows(images, labels) == rows(expected, torch.from_numpy(source.target))
    blocks = images.unfold(1, 4, 4).unfold(2, 4, 4)  # N x 8 x 8 x 4 x 4
    assert torch.equal(blocks, blocks[..., :1, :1].expand_as(blocks))


def test_split_is_fixed_by_its_seed():
    """The same split_seed gives the same split on every call; another seed gives another (same counts)."""
    a_train, a_test, _ = load_digits(seed=0)
    b_train, b_test, _ = load_digits(seed=0)
    assert torch.equal(a_train.images, b_train.images) and torch.equal(a_test.images, b_test.images)
    assert torch.equal(a_train.labels, b_train.labels) and torch.equal(a_test.labels, b_test.labels)
    c_train, c_test, _ = load_digits(seed=1)
    assert not torch.equal(a_test.images, c_test.images)
    assert torch.bincount(c_test.labels, minlength=10).tolist() == TEST_COUNTS


def test_stratified_split_indices_partition_and_follow_the_generator():
    labels = torch.tensor([0] * 7 + [1] * 5 + [2] * 3)
    train, test = stratified_split(labels, 0.2, torch.Generator().manual_seed(0))
    assert sorted(train.tolist() + test.tolist()) == list(range(15))
    assert torch.equal(train, train.sort().values) and torch.equal(test, test.sort().values)
    # 3 test images: exact shares 1.4, 1.0, 0.6 -> floors 1, 1, 0; the one left over goes to class 2 (0.6)
    assert torch.bincount(labels[test], minlength=3).tolist() == [1, 1, 1]
    others = {tuple(stratified_split(labels, 0.2, torch.Generator().manual_seed(s))[1].tolist()) for s in range(8)}
    assert len(others) > 1


def test_digits_config_builds_without_a_root(make_cfg):
    cfg = make_cfg("data=digits", "data.val_size=100")
    assert cfg.data.flip is False and cfg.data.crop_padding == 4 and cfg.data.split_seed == 0
    data = build_data(cfg.data)
    assert (len(data.train), len(data.val), len(data.test)) == (1337, 100, 360)
    assert data.mean[0] == data.mean[1] == data.mean[2]


def test_demo_experiment_composes(make_cfg):
    cfg = make_cfg("experiment=demo")
    assert cfg.data.name == "digits"
    assert cfg.trainer.device == "auto"
    assert cfg.scheduler.name == "snapshot" and cfg.scheduler.cycles >= 3


def test_demo_end_to_end_with_a_short_budget(make_cfg, tmp_path):
    """The demo's config, its budget cut to three 1-epoch cycles on a 500-image subset: snapshots and results."""
    cfg = make_cfg("experiment=demo", "trainer.device=cpu", "data.train_limit=500", "scheduler.cycles=3",
                   "trainer.epochs=3")
    ensemble_acc = train(cfg, tmp_path)
    snapshots = sorted(p.name for p in (tmp_path / "snapshots").glob("*.safetensors"))
    assert snapshots == ["cycle_01.safetensors", "cycle_02.safetensors", "cycle_03.safetensors"]
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["num_images"] == 360 and results["val"]["num_images"] == 360  # the demo holds out 360
    assert results["val"]["ensemble"]["acc"] == ensemble_acc  # what a job returns: validation
    assert len(results["ensemble"]["members"]) == 3
