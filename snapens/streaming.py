"""Image folders read from their files batch by batch (data.storage=stream), for data sets larger than memory.

A `StreamedImages` stands in for a split's uint8 N x 3 x H x W tensor: indexing it, or reading it batch by batch
(`read`, what snapens.batches does), decodes just those files, in a torch DataLoader's worker processes that
decode the next batches while the current one trains. The batch order is still the run's seeded permutation and
the augmentation is still drawn on the training device from the run's generator, so a streamed run trains on
exactly the batches an in-memory run does (bit-identical snapshots), resumes mid-epoch the same way, and its
memory does not grow with the data set: what is held is the file names, and a few batches.
"""

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from snapens.errors import SnapensError
from snapens.files import write_atomic
from snapens.folders import Listing, cache_dir, file_manifest
from snapens.images import read_image, read_size, sizes_differ
from snapens.splits import STREAMED, Split, split_digest

log = logging.getLogger(__name__)
FIRST_DECODE_FACTOR = 4  # a split's first decode peaks near 4x its decoded bytes (docs/configuration.md)
STORAGES = ("auto", "memory", "stream")


class _Files(torch.utils.data.Dataset):
    """File i decoded; a problem (an unreadable file, or one whose size is not the split's, as when it was replaced
    since it was listed) comes back as its message, raised in the main process as one line rather than as the
    DataLoader's wrapped worker traceback."""

    def __init__(self, paths: list[Path], size: int, shape: torch.Size):
        self.paths, self.size, self.shape = paths, size, shape

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> torch.Tensor | str:
        try:
            image = read_image(self.paths[i], self.size)
        except SnapensError as e:
            return str(e)
        if image.shape != self.shape[1:]:
            (h, w), (ih, iw) = self.shape[2:], image.shape[1:]
            return sizes_differ(self.paths[0], (w, h), self.paths[i], (iw, ih))
        return image


@dataclass(frozen=True, eq=False)
class StreamedImages:
    """A split's images as files, read when indexed or batch by batch (`read`)."""

    root: Path
    paths: list[Path]
    size: int  # data.image_size; 0: the files' own size, which must agree
    shape: torch.Size  # N x 3 x H x W, as the tensor this stands in for
    workers: int = 0
    device: torch.device = torch.device("cpu")
    dtype = torch.uint8
    nbytes = 0  # nothing held: the training device needs no room for the data

    def __len__(self) -> int:
        return len(self.paths)

    def numel(self) -> int:
        return math.prod(self.shape)

    def to(self, device) -> "StreamedImages":
        return replace(self, device=torch.device(device))

    @cached_property
    def manifest(self) -> str:
        """What the resume check compares: the files' names, sizes and times (snapens.folders.file_manifest), not
        their bytes, which would be a full read of the data set at every start."""
        return file_manifest(self.paths, self.root, self.size)

    def __getitem__(self, index: torch.Tensor | slice) -> torch.Tensor:
        """The images of a slice or of a 1-D tensor of integer indices (what snapens indexes splits with)."""
        rows = torch.arange(len(self))[index] if isinstance(index, slice) else index
        integer = isinstance(rows, torch.Tensor) and not rows.is_floating_point() and rows.dtype != torch.bool
        if not integer or rows.dim() != 1:
            raise TypeError(f"a streamed split is indexed by a slice or a 1-D integer tensor, not {index!r}")
        return next(self.read([rows]))

    def split(self, n: int) -> Iterator[torch.Tensor]:
        """Consecutive chunks of n images, as torch.Tensor.split gives them."""
        return self.read(torch.arange(len(self)).split(n))

    def read(self, batches: Iterable[torch.Tensor], share: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
        """The images of each index batch, on self.device. `share` = (rank, world) of a torchrun job: only the rows
        of each batch that snapens.distributed.share gives this rank are decoded, the others left zero."""
        batches = [b.cpu() for b in batches]
        rank, world = share
        wanted = [b.tensor_split(world)[rank] for b in batches]
        loader = DataLoader(_Files(self.paths, self.size, self.shape), batch_sampler=[w.tolist() for w in wanted],
                            num_workers=self.workers, collate_fn=self._stack, pin_memory=self.device.type == "cuda",
                            generator=torch.Generator())  # its worker seeds, drawn from torch's global generator
        # otherwise, would shift dropout's random numbers by one draw per epoch (and per resume)
        for whole, part, images in zip(batches, wanted, loader):
            if isinstance(images, str):
                raise SnapensError(images)
            if world > 1:
                full = images.new_zeros((len(whole), *images.shape[1:]))
                start = sum(len(p) for p in whole.tensor_split(world)[:rank])
                full[start:start + len(part)] = images
                images = full
            yield images.to(self.device, non_blocking=True)

    def _stack(self, images: list) -> torch.Tensor | str:
        problem = next((i for i in images if isinstance(i, str)), None)
        if problem is not None:
            return problem
        return torch.stack(images) if images else torch.empty((0, *self.shape[1:]), dtype=torch.uint8)


def streamed(listing: Listing, workers: int) -> Split:
    """A Listing's chosen files as a streamed Split. Nothing is decoded; with data.image_size=0 every file's header
    is read, so that an image of another size is refused now, not when an evaluation meets it after training."""
    paths = [listing.paths[i] for i in listing.index.tolist()]
    height = width = listing.size
    if not listing.size:
        width, height = read_size(paths[0])
        other = next(((p, size) for p in paths if (size := read_size(p)) != (width, height)), None)
        if other is not None:
            raise SnapensError(sizes_differ(paths[0], (width, height), *other))
    shape = torch.Size((len(paths), 3, height, width))
    return Split(StreamedImages(listing.root, paths, listing.size, shape, workers), listing.labels)


def decoded_bytes(listing: Listing) -> int:
    """What a Listing's chosen images take decoded (the first file's size for all, when data.image_size is 0)."""
    width, height = (listing.size, listing.size) if listing.size else read_size(listing.paths[int(listing.index[0])])
    return len(listing) * 3 * width * height


def statistics(split: Split, compute: Callable) -> tuple:
    """`compute(split.images)` (the channel statistics), kept for a streamed split beside the decode caches, keyed
    by its digest (its files' names, sizes and times, its labels): computing them reads every training file, which
    a start of a large data set should not repeat. The values are exactly those computed."""
    folder = None if isinstance(split.images, torch.Tensor) else cache_dir(split.images.root)
    if folder is None:  # in memory, or nowhere to keep them
        return compute(split.images)
    path = folder / f"stats-{split_digest(split).removeprefix(STREAMED)[:32]}.json"
    with contextlib.suppress(OSError, ValueError, KeyError, TypeError):  # none yet, or damaged: computed again
        saved = json.loads(path.read_text())
        return tuple(map(float, saved["mean"])), tuple(map(float, saved["std"]))
    mean, std = compute(split.images)
    with contextlib.suppress(SnapensError):  # a full disk: computed again next time
        write_atomic(path, json.dumps({"mean": mean, "std": std}).encode())
    return mean, std


class StorageError(ValueError):
    """A storage that the data cannot have."""


def streams(storage: str, splits: list[Split | Listing], memory_gib: float) -> bool:
    """Whether the splits are streamed: storage=stream, or auto and their first decode (FIRST_DECODE_FACTOR x the
    decoded bytes) would not fit in memory_gib GiB. Only image folders stream; other data sets are arrays already.
    The log says which and why."""
    if storage not in STORAGES:
        raise StorageError(f"storage={storage!r}: give one of {', '.join(STORAGES)}")
    listings = [s for s in splits if isinstance(s, Listing)]
    if not listings and storage == "stream":
        raise StorageError("storage='stream' reads image files, and this data set is arrays in memory already")
    if not listings:
        return False
    stream, why = (storage == "stream", "asked for") if storage != "auto" else beyond_budget(listings, memory_gib)
    log.info(f"data {'streamed from the files' if stream else 'in memory'}: {why}")
    return stream


def beyond_budget(listings: list[Listing], memory_gib: float) -> tuple[bool, str]:
    """Whether a first decode of the listed images (FIRST_DECODE_FACTOR x their decoded bytes) exceeds memory_gib
    GiB, and why."""
    need = FIRST_DECODE_FACTOR * sum(decoded_bytes(s) for s in listings) / 2**30
    over = need > memory_gib
    return over, f"its first decode needs about {need:.2f} GiB, {'over' if over else 'within'} the budget of " \
                 f"{memory_gib:g} GiB"
