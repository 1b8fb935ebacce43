"""A data set in memory: splits of uint8 images with their labels, and their digest."""

import hashlib
from dataclasses import dataclass, field
from typing import Optional

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x H x W (or a snapens.streaming.StreamedImages standing in for it)
    labels: torch.Tensor  # int64, N
    digest: str | None = field(default=None, repr=False, compare=False)  # split_digest's, kept once computed

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device), self.digest)  # the same data


@dataclass
class Dataset:
    train: Split
    test: Split
    val: Optional[Split]
    classes: list[str]
    mean: tuple[float, float, float]  # per channel, of the training images on 0..1 pixels
    std: tuple[float, float, float]


def split_digest(split: Split) -> str:
    """SHA-256 of a split's images and labels (and their shapes), so any change of data shows; of a streamed split's
    file manifest (names, sizes, times: snapens.streaming) rather than its pixels, which are not in memory, marked
    "files:" so that a resume can tell a change of storage from a change of data. Computed
    once per Split (the resume check at the start and the logits cache at the end share it); splits are not changed
    in place."""
    if split.digest is None:
        split.digest = _digest(split)
    return split.digest


def _digest(split: Split) -> str:
    h = hashlib.sha256(str((tuple(split.images.shape), tuple(split.labels.shape))).encode())
    in_memory = isinstance(split.images, torch.Tensor)
    h.update(split.images.contiguous().cpu().numpy().tobytes() if in_memory else split.images.manifest.encode())
    h.update(split.labels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest() if in_memory else f"{STREAMED}{h.hexdigest()}"


STREAMED = "files:"  # the mark of a streamed split's digest
