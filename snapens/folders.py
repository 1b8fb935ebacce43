"""Image folders (root/train/<class>/*, root/test/<class>/*): listing the files, decoding only those a run uses,
and the decode cache.

Image files are decoded once: the tensors of a whole split are cached next to the data (safetensors, keyed by the
source files' names, sizes and times), so a second run starts in seconds. A run that uses part of a split (a
validation split, data.train_limit, data.test_limit) reads those images from that cache when it is there, and else
decodes only them."""

import contextlib
import hashlib
import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save
from tqdm import tqdm

from snapens.errors import SnapensError
from snapens.files import write_atomic
from snapens.images import IMAGE_EXTENSIONS, read_image, sizes_differ
from snapens.splits import Split, split_digest

log = logging.getLogger(__name__)
CACHE_VERSION = "2"  # 2: keyed by ctime too, arrays verified on load
WAIT_SECONDS = 0.5  # how often a rank waiting for local rank 0's decode cache looks for it


def _scan_split(folder: Path, classes: list[str]) -> tuple[list[Path], list[int]]:
    paths, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS)
        if not files:
            raise SnapensError(f"class folder {folder / name} has no images ({', '.join(IMAGE_EXTENSIONS)}): "
                               "add images or remove the folder")
        broken = [p for p in files if not p.exists()]
        if broken:
            raise SnapensError(f"{broken[0]} is a link to a file that does not exist: restore its target or remove it")
        paths += files
        labels += [label] * len(files)
    return paths, labels


def _stack(images: list[torch.Tensor], paths: list[Path]) -> torch.Tensor:
    first = images[0].shape
    for image, path in zip(images, paths):
        if image.shape != first:
            raise SnapensError(sizes_differ(paths[0], (first[2], first[1]), path, (image.shape[2], image.shape[1])))
    return torch.stack(images)


def file_manifest(paths: list[Path], root: Path, size: int) -> str:
    """SHA-256 of the files' names, sizes and modification and status-change times. A file rewritten with
    other pixels may keep its size, and its modification time can be set back (os.utime), but its status-change time
    (ctime) moves with every write and cannot be set: the decoded cache is found only for these very files. Reading
    every file's bytes instead would cost seconds per run on CIFAR's 60,000 files."""
    h = hashlib.sha256(f"{CACHE_VERSION} {size}".encode())
    for p in paths:
        st = p.stat()
        h.update(f"{p.relative_to(root)} {st.st_size} {st.st_mtime_ns} {st.st_ctime_ns}\n".encode())
    return h.hexdigest()


def cache_dir(root: Path) -> Path | None:
    """Next to the data; in ~/.cache/snapens when the data folder is read-only; None when neither can be written
    (the images are then decoded at every run)."""
    def elsewhere() -> Path:  # only looked up when needed: HOME may be unset where the data folder is writable
        return Path.home() / ".cache" / "snapens" / hashlib.sha1(str(root.resolve()).encode()).hexdigest()[:16]

    for place in (lambda: root / ".snapens_cache", elsewhere):
        try:
            folder = place()
            folder.mkdir(parents=True, exist_ok=True)
            if os.access(folder, os.W_OK):
                return folder
        except (OSError, RuntimeError):  # RuntimeError: no home folder to be found
            pass
    log.warning(f"neither {root} nor the home folder can be written: the decoded images are not cached")
    return None


def _decode(paths: list[Path], size: int, what: str) -> torch.Tensor:
    with ThreadPoolExecutor(os.cpu_count()) as pool:  # Pillow releases the GIL while decoding
        decoded = tqdm(pool.map(lambda p: read_image(p, size), paths), total=len(paths), unit="image",
                       desc=f"decoding {what}", disable=None)
        return _stack(list(decoded), paths)


def _load_or_decode(split: str, root: Path, paths: list[Path], labels: list[int], size: int) -> Split:
    """The whole split: from the decode cache when it holds exactly these files, else decoded and cached (`labels`:
    the split's own class indices, as the cache has always stored them)."""
    cache, source = _cache_file(split, root, paths, size)
    if cache is None:  # nowhere to cache: every process decodes for itself
        return _decoded(paths, labels, size, str(root / split))
    cached = _read_cache(cache, source)
    if cached is None and _waits_for_local_rank_0():
        cached = _wait_for(cache, source)
        if cached is None:  # rank 0 could not cache these files: decode them here, and write nothing
            return _decoded(paths, labels, size, str(root / split))
    if cached is not None:
        return cached
    failed = cache.with_suffix(".failed")
    failed.unlink(missing_ok=True)  # an earlier run's word that it could not cache
    try:
        result = _decoded(paths, labels, size, f"{root / split} (once: cached)")
    except BaseException:  # a bad image, a stop signal: the ranks waiting for this cache must not wait forever
        with contextlib.suppress(OSError):
            failed.touch()
        raise
    _write_cache(cache, result, source, paths)
    return result


def _decoded(paths: list[Path], labels: list[int], size: int, what: str) -> Split:
    return Split(_decode(paths, size, what), torch.tensor(labels, dtype=torch.int64))


def _write_cache(cache: Path, split: Split, source: str, paths: list[Path]) -> None:
    """The decoded split to `cache`, and the caches of files since changed or copied removed. A full disk: the run
    goes on (decoding again next time), and `<cache>.failed` tells the ranks waiting for it to decode for themselves."""
    metadata = {"classes": json.dumps(sorted({p.parent.name for p in paths})), "source": source,
                "arrays": split_digest(split)}
    try:
        write_atomic(cache, save({"images": split.images, "labels": split.labels}, metadata=metadata))
    except SnapensError as e:
        log.warning(f"decoded images not cached: {e}")
        with contextlib.suppress(OSError):
            cache.with_suffix(".failed").touch()
        return
    for stale in _other_caches(cache):
        stale.unlink(missing_ok=True)


def _waits_for_local_rank_0() -> bool:
    """A process of a multi-process job (torchrun's or submitit's variables) other than its node's first: it lets
    local rank 0 decode and cache a split, and reads the cache, instead of every rank decoding every image and
    writing the same file. A file is waited for, not a barrier: a long decode would outlast NCCL's timeout."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and int(os.environ.get("LOCAL_RANK", "0")) > 0


def _wait_for(cache: Path, source: str) -> Split | None:
    """The split once local rank 0 has cached it; None when it could not (it leaves `<cache>.failed`, also when its
    decode failed) or cached other files (one changed between the two looks: this rank decodes what it sees)."""
    log.info(f"waiting for local rank 0 to decode and cache {cache}")
    start = time.time()
    while not cache.with_suffix(".failed").exists():
        cached = _read_cache(cache, source)
        if cached is not None:
            return cached
        if _cached_since(cache, start):  # rank 0 saw the files otherwise
            return None
        time.sleep(WAIT_SECONDS)
    return None


def _cached_since(cache: Path, start: float) -> bool:
    """Whether a cache of this split and size other than `cache` was written after `start`."""
    for other in _other_caches(cache):
        with contextlib.suppress(FileNotFoundError):  # removed as stale meanwhile
            if other.stat().st_mtime > start:
                return True
    return False


def _other_caches(cache: Path) -> list[Path]:
    """The decode caches of the same split and size as `cache` but of other files (<split>-<size>-<files>)."""
    prefix = cache.name.rsplit("-", 1)[0]
    return [p for p in cache.parent.glob(f"{prefix}-*.safetensors") if p != cache]


def _cached_only(split: str, root: Path, paths: list[Path], size: int) -> Split | None:
    """The whole split from the decode cache, or None when it is not there (nothing is decoded)."""
    cache, source = _cache_file(split, root, paths, size)
    return None if cache is None else _read_cache(cache, source)


def _cache_file(split: str, root: Path, paths: list[Path], size: int) -> tuple[Path | None, str]:
    """Where the decode cache of exactly these files is (None: nowhere writable), and their fingerprint."""
    folder = cache_dir(root)
    if folder is None:
        return None, ""
    source = file_manifest(paths, root, size)
    return folder / f"{split}-{size}-{source[:16]}.safetensors", source


@dataclass
class Listing:
    """An image folder's split before decoding: every file with its label, and the files chosen so far (`index`,
    ascending). `subset` narrows the choice without decoding; `load` decodes only the chosen files, so
    data.train_limit=64 of a 4,000-image folder decodes 64 images (and the validation and test images chosen), not
    4,000. When the whole split is cached, or when most of it is used (a validation split held out of all of it),
    the whole split is loaded once, cached for the next run, and shared by the subsets. The images are the same
    either way."""
    root: Path
    split: str
    paths: list[Path]
    all_labels: torch.Tensor  # int64, one per path, in the data set's class indices
    own_labels: list[int]  # the same in the split's own class indices, as the decode cache stores them
    size: int
    index: torch.Tensor
    memo: dict = field(default_factory=dict, repr=False)  # the whole split, shared by every subset of it

    @property
    def labels(self) -> torch.Tensor:
        return self.all_labels[self.index]

    def __len__(self) -> int:
        return len(self.index)

    def subset(self, index: torch.Tensor) -> "Listing":
        return replace(self, index=self.index[index])

    def load(self) -> Split:
        whole = self.whole()
        if whole is None:
            chosen = [self.paths[i] for i in self.index.tolist()]
            return Split(_decode(chosen, self.size, f"{len(chosen)} of {self.root / self.split}"), self.labels)
        if torch.equal(self.index, torch.arange(len(self.paths))):
            return Split(whole.images, self.all_labels)
        return Split(whole.images[self.index], self.labels)

    def whole(self) -> Split | None:
        """The whole split in memory: once, when it is cached or when this subset is most of it; else None."""
        if "whole" not in self.memo:
            most = 2 * len(self.index) >= len(self.paths)
            self.memo["whole"] = (_load_or_decode(self.split, self.root, self.paths, self.own_labels, self.size)
                                  if most else _cached_only(self.split, self.root, self.paths, self.size))
        return self.memo["whole"]


def load(split: "Split | Listing | None") -> Split | None:
    """A split in memory: a Listing's chosen files decoded, a Split as it is."""
    return split.load() if isinstance(split, Listing) else split


def _read_cache(path: Path, source: str) -> Split | None:
    """The decoded split if the cache file was made from exactly these files and its arrays are the ones written
    (a cache file copied over another one's name, or edited, is decoded again); else None."""
    try:
        with safe_open(path, framework="pt") as f:
            metadata = f.metadata() or {}
            if metadata.get("source") != source:  # not read further: waiting ranks look often
                return None
            split = Split(f.get_tensor("images"), f.get_tensor("labels"))
    except (FileNotFoundError, SafetensorError, OSError):
        return None  # first run, or a damaged cache
    return split if metadata.get("arrays") == split_digest(split) else None


def scan_image_folder(root: str, image_size: int = 0) -> tuple[Listing, Listing, list[str]]:
    """The files in root/train/<class>/* and root/test/<class>/*, classes sorted by name as torchvision's
    ImageFolder, none decoded yet (`Listing`)."""
    base = Path(root)
    for split in ("train", "test"):
        if not (base / split).is_dir():
            raise SnapensError(f"data.root={root} has no {split}/ folder: expected {root}/train/<class>/*.jpg and "
                               f"{root}/test/<class>/*.jpg")
    classes = sorted(d.name for d in (base / "train").iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise SnapensError(f"data.root={root} has no images: {root}/train has no class folders")
    extra = sorted(d.name for d in (base / "test").iterdir()
                   if d.is_dir() and not d.name.startswith(".") and d.name not in classes)
    if extra:
        raise SnapensError(f"{root}/test has class folders that {root}/train lacks: {', '.join(extra)}")
    test_classes = [c for c in classes if (base / "test" / c).is_dir()]
    if not test_classes:
        raise SnapensError(f"data.root={root} has no test images: {root}/test has no class folders")
    splits = []
    for split, names in (("train", classes), ("test", test_classes)):
        paths, own = _scan_split(base / split, names)
        labels = torch.tensor([classes.index(c) for c in names], dtype=torch.int64)[torch.tensor(own)]
        splits.append(Listing(base, split, paths, labels, own, image_size, torch.arange(len(paths))))
    return splits[0], splits[1], classes


def same_size(train: Split, test: Split) -> None:
    if test.images.shape[2:] != train.images.shape[2:]:
        (h, w), (th, tw) = train.images.shape[2:], test.images.shape[2:]
        raise SnapensError(f"test images are {tw}x{th} but train images are {w}x{h}; "
                           "set data.image_size=N to resize both to NxN")


def load_image_folder(root: str, image_size: int = 0) -> tuple[Split, Split, list[str]]:
    """Every image in root/train/<class>/* and root/test/<class>/*, decoded (see scan_image_folder)."""
    train, test, classes = scan_image_folder(root, image_size)
    train, test = train.load(), test.load()
    same_size(train, test)
    return train, test, classes
