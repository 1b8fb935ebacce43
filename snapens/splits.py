"""A data set in memory: splits of uint8 images with their labels, and their digest."""

import hashlib
from dataclasses import dataclass
from typing import Optional

import torch


@dataclass
class Split:
    images: torch.Tensor  # uint8, N x 3 x H x W
    labels: torch.Tensor  # int64, N

    def __len__(self) -> int:
        return len(self.labels)

    def subset(self, index: torch.Tensor) -> "Split":
        return Split(self.images[index], self.labels[index])

    def to(self, device: torch.device) -> "Split":
        return Split(self.images.to(device), self.labels.to(device))


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
    file manifest (names, sizes, times: snapens.streaming) rather than its pixels, which are not in memory."""
    h = hashlib.sha256(str((tuple(split.images.shape), tuple(split.labels.shape))).encode())
    if isinstance(split.images, torch.Tensor):
        h.update(split.images.contiguous().cpu().numpy().tobytes())
    else:
        h.update(split.images.manifest.encode())
    h.update(split.labels.contiguous().cpu().numpy().tobytes())
    return h.hexdigest()
