"""Datasets as uint8 tensors: the sources (CIFAR, image folders, digits, synthetic), the validation split,
subsets and statistics.

Every dataset becomes `Split`s: images uint8 N x 3 x H x W and labels int64 N (snapens.splits); image folders are
listed first and decoded only where used (snapens.folders). Batches and their augmentation are made from these
tensors on the training device by snapens.batches."""

import math
import socket
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F

from snapens.errors import SnapensError
from snapens.folders import Listing, load, load_image_folder, same_size, scan_image_folder
from snapens.splits import Dataset, Split, split_digest
from snapens.streaming import statistics, streamed, streams

__all__ = ["Dataset", "Listing", "SOURCES", "Split", "balanced_subset", "channel_stats", "choose", "load", "placement",
           "load_cifar", "load_digits", "load_image_folder", "make_synthetic", "prepare", "scan_image_folder",
           "split_digest", "stratified_split"]


# --- loading ----------------------------------------------------------------------------------------------------
def load_cifar(root: str, name: str, download: bool) -> tuple[Split, Split, list[str]]:
    """CIFAR-10/100 from torchvision's python format in `root`, downloading when allowed and possible."""
    from torchvision.datasets import CIFAR10, CIFAR100

    cls = CIFAR10 if name == "cifar10" else CIFAR100

    def read(train: bool):
        ds = cls(root, train=train, download=False)
        images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
        return Split(images, torch.tensor(ds.targets, dtype=torch.int64)), list(ds.classes)

    def fetch():
        old = socket.getdefaulttimeout()
        socket.setdefaulttimeout(60)  # torchvision's urlopen has no timeout of its own
        try:
            cls(root, train=True, download=True)
        finally:
            socket.setdefaulttimeout(old)

    missing = (f"{name} is not in {Path(root).resolve()}: put {cls.base_folder}/ "
               f"(extracted from {cls.filename}, {cls.url}) there")
    try:
        if download and not (Path(root) / cls.base_folder).is_dir():
            fetch()
        (train, classes), (test, _) = read(True), read(False)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted"
        raise SnapensError(f"{missing}, or pass data.root=DIR where it is ({e})") from None
    except OSError as e:  # no network, refused, timed out
        raise SnapensError(f"{missing}; downloading it failed ({e})") from None
    return train, test, classes


def make_synthetic(num_classes: int, train_size: int, test_size: int, size: int, seed: int = 0):
    """Tiny random images whose class sets a dominant colour and a stripe period: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def split(n: int) -> Split:
        labels = torch.arange(n) % num_classes
        images = torch.randint(0, 96, (n, 3, size, size), generator=g)
        images[torch.arange(n), labels % 3] += 120
        rows = torch.arange(size)[None, :] % (2 + labels[:, None] // 3) == 0  # n x size
        images += 35 * rows[:, None, :, None]
        return Split(images.to(torch.uint8), labels)

    return split(train_size), split(test_size), [f"class{i}" for i in range(num_classes)]


def stratified_split(labels: torch.Tensor, test_fraction: float,
                     generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded class-stratified (train, test) indices, each sorted ascending. The test split has ceil(test_fraction *
    N) examples (as scikit-learn's train_test_split), shared among the classes in proportion to their sizes: each
    class gets the floor of its exact share, and the examples left over go to the classes with the largest remainders
    (ties to the lower label). The shares are computed in integers, so the counts are the same on every machine; the
    generator only decides which examples of a class go to test."""
    n = len(labels)
    n_test = min(n, math.ceil(test_fraction * n))
    sizes = torch.bincount(labels).tolist()
    shares = [n_test * size for size in sizes]  # class c's exact share is shares[c] / n
    quota = [share // n for share in shares]
    by_remainder = sorted(range(len(sizes)), key=lambda c: (-(shares[c] % n), c))
    for c in by_remainder[:n_test - sum(quota)]:
        quota[c] += 1
    test = [torch.nonzero(labels == c).flatten()[torch.randperm(size, generator=generator)[:quota[c]]]
            for c, size in enumerate(sizes)]
    is_test = torch.zeros(n, dtype=torch.bool)
    is_test[torch.cat(test)] = True
    return (~is_test).nonzero().flatten(), is_test.nonzero().flatten()


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> tuple[Split, Split, list[str]]:
    """scikit-learn's 1,797 handwritten digits (UCI optdigits' test set, 8x8 grey, 0..16) as 32x32 RGB uint8.

    The data is a file inside the scikit-learn wheel: no network, no data.root. Grey levels v in 0..16 become
    round(v * 255 / 16) (half up, in integers: 0 -> 0, 8 -> 128, 16 -> 255). Each pixel becomes a 4x4 block
    (nearest-neighbour upscaling): the images keep exactly the source's values, with no blur that bilinear
    interpolation would invent between pixels, and the CIFAR models and their pad-4 random crop (a shift of up to
    one source pixel) apply unchanged. The grey image is copied into the 3 channels the models expect.

    Args:
        seed: seed of the class-stratified train/test split (not of training), so the split is the same on every
            machine and for every trainer.seed.
        test_fraction: share of the images in the test split: 0.2 gives 1,437 train and 360 test images.
    Returns:
        train and test Splits (uint8 N x 3 x 32 x 32, int64 labels 0..9) and the class names "0".."9"."""
    from sklearn.datasets import load_digits as sklearn_digits  # lazily: only this dataset needs scikit-learn

    digits = sklearn_digits()
    grey = (torch.from_numpy(digits.images).round().long() * 255 + 8) // 16  # N x 8 x 8, 0..255
    big = F.interpolate(grey[:, None].float(), scale_factor=4, mode="nearest")  # N x 1 x 32 x 32, exact copies
    images = big.round().to(torch.uint8).expand(-1, 3, -1, -1).contiguous()
    labels = torch.from_numpy(digits.target).long()
    train, test = stratified_split(labels, test_fraction, torch.Generator().manual_seed(seed))
    return Split(images[train], labels[train]), Split(images[test], labels[test]), list(map(str, digits.target_names))


# --- subsets and statistics ---------------------------------------------------------------------------------------
def balanced_subset(labels: torch.Tensor, n: int, generator: torch.Generator) -> torch.Tensor:
    """Indices of n examples, as equal per class as possible, chosen at random; sorted ascending."""
    order = torch.randperm(len(labels), generator=generator)
    shuffled = labels[order]
    # rank of each example within its class (in shuffled order): take all rank-0s first, then rank-1s, ...
    rank = torch.empty_like(shuffled)
    for c in shuffled.unique():
        where = (shuffled == c).nonzero().flatten()
        rank[where] = torch.arange(len(where))
    pick = torch.argsort(rank * (int(labels.max()) + 1) + shuffled, stable=True)[:n]
    return order[pick].sort().values


STATS_CHUNK_BYTES = 96 * 2**20  # float64 per chunk: 4,096 CIFAR images, as every earlier run chunked them


def stats_chunk(images: torch.Tensor) -> int:
    """Images per chunk of `channel_stats`: its float64 copy of a chunk stays within STATS_CHUNK_BYTES whatever the
    image size (83 images at 224 px), and at most 4,096 images, so the statistics of 32-pixel data stay bit-equal."""
    per_image = 8 * math.prod(images.shape[1:]) if len(images) else 1
    return max(1, min(4096, STATS_CHUNK_BYTES // per_image))


def channel_stats(images: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean and std of uint8 images on the 0..1 scale, in float64 chunks of bounded size (stats_chunk):
    exact, and memory-light at any image size."""
    total, squares = torch.zeros(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64)
    for chunk in images.split(stats_chunk(images)):
        x = chunk.to(torch.float64) / 255
        total += x.sum((0, 2, 3))
        squares += (x * x).sum((0, 2, 3))
    count = images.numel() / 3
    mean = total / count
    std = (squares / count - mean**2).clamp_min(1e-12).sqrt()
    return tuple(mean.tolist()), tuple(std.tolist())


def choose(train: Split | Listing, test: Split | Listing, *, train_limit: int = 0, test_limit: int = 0,
           val_size: int = 0, seed: int = 0) -> tuple[Split | Listing, Split | Listing | None, Split | Listing]:
    """(train, val, test): a class-balanced validation split held out of train, then seeded class-balanced subsets.
    The choices read labels only, so an image folder's Listings are decoded after them, and only where used."""
    # One generator per purpose, so the test subset does not change with val_size or train_limit.
    g_val, g_train, g_test = (torch.Generator().manual_seed(3 * seed + k) for k in range(3))
    val = None
    if val_size:
        if val_size >= len(train):
            raise SnapensError(f"data.val_size={val_size} leaves no training images (train has {len(train)})")
        val_index = balanced_subset(train.labels, val_size, g_val)
        keep = torch.ones(len(train), dtype=torch.bool)
        keep[val_index] = False
        val, train = train.subset(val_index), train.subset(keep.nonzero().flatten())
    if train_limit and train_limit < len(train):
        train = train.subset(balanced_subset(train.labels, train_limit, g_train))
    if test_limit and test_limit < len(test):
        test = test.subset(balanced_subset(test.labels, test_limit, g_test))
    return train, val, test


def prepare(train: Split | Listing, test: Split | Listing, classes: list[str], storage: str = "memory",
            workers: int = 0, memory_gib: float = 8.0, **subsets) -> Dataset:
    """The data set a run trains on: the splits `choose` makes with `subsets` (its keyword arguments), held as
    `placement` says, and the training split's statistics."""
    splits = choose(train, test, **subsets)
    train, val, test = map(placement(splits, storage, workers, memory_gib), splits)
    same_size(train, test)
    mean, std = statistics(train, channel_stats)
    return Dataset(train, test, val, classes, mean, std)


def placement(splits: list, storage: str, workers: int, memory_gib: float) -> Callable:
    """How the chosen splits are held, decided on all of them together: in memory (`load`), or streamed from their
    files (`storage`: memory, stream or auto, which streams when a first decode would need more than `memory_gib`
    GiB; `workers`: decoding processes; snapens.streaming). Training and the ensemble tool decide alike, so the
    digests their logits caches are keyed on agree."""
    if streams(storage, [s for s in splits if s is not None], memory_gib):
        return lambda split: None if split is None else streamed(split, workers)
    return load


# ---- the sources, by data.name: a data set is its loader here plus one YAML file under conf/data/ ----------------
Loader = Callable[[Mapping], tuple[Split | Listing, Split | Listing, list[str]]]  # data config -> train, test, classes
SOURCES: dict[str, Loader] = {
    **dict.fromkeys(("cifar10", "cifar100"), lambda c: load_cifar(c["root"], c["name"], c["download"])),
    "imagefolder": lambda c: scan_image_folder(c["root"], c["image_size"]),
    "digits": lambda c: load_digits(c["split_seed"]),
    "synthetic": lambda c: make_synthetic(c["num_classes"], c["train_size"], c["test_size"], c["size"]),
}
