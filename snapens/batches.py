"""Batches on the training device: a "loader" is the uint8 tensors plus a permutation from an explicit
torch.Generator; crops, flips, cutout and normalisation run on whole batches where the data lives (the way airbench
does it, github.com/KellerJordan/cifar10-airbench). A streamed split (snapens.streaming) decodes each batch's files
instead of indexing a tensor; everything else is the same.
"""

import math
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.nn.functional as F

from snapens.data import Split
from snapens.precision import layout


@dataclass(frozen=True)
class Augmentation:
    """Training augmentation of He et al. 2016 (arXiv 1512.03385): pad-and-crop, horizontal flip; cutout optional."""

    padding: int = 4  # pixels of zero padding before the random crop; 0: no crop
    flip: bool = True
    cutout: int = 0  # side of the zeroed square (DeVries & Taylor 2017, arXiv 1708.04552); 0: none
    crop: str = "pad"  # pad: pad-and-crop as above | resized: random_resized_crop, for large images

    def __post_init__(self):
        if self.crop not in CROPS:
            raise ValueError(f"crop={self.crop!r}: give one of {', '.join(CROPS)}")


CROPS = ("pad", "resized")


def channel_tensors(mean, std, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel statistics as 1 x 3 x 1 x 1 float32 tensors on `device`: made once, not per batch (a host-to-GPU
    copy of a Python list would synchronise the stream at every step)."""
    return tuple(torch.tensor(v, dtype=torch.float32, device=device).view(1, 3, 1, 1) for v in (mean, std))


def normalize(images: torch.Tensor, mean, std) -> torch.Tensor:
    """uint8 B x 3 x H x W -> float32, standardised per channel (mean, std: sequences or channel_tensors)."""
    if not isinstance(mean, torch.Tensor):
        mean, std = channel_tensors(mean, std, images.device)
    return (images.float() / 255 - mean) / std


def random_crop(images: torch.Tensor, padding: int, generator: torch.Generator) -> torch.Tensor:
    """A different random HxW window of the zero-padded image for every image of the batch, in one gather."""
    b, c, h, w = images.shape
    padded = F.pad(images, (padding,) * 4)
    dy, dx = torch.randint(0, 2 * padding + 1, (2, b, 1), generator=generator, device=images.device)
    rows = (dy + torch.arange(h, device=images.device))[:, None, :, None]  # b x 1 x h x 1
    cols = (dx + torch.arange(w, device=images.device))[:, None, None, :]  # b x 1 x 1 x w
    batch = torch.arange(b, device=images.device)[:, None, None, None]
    channel = torch.arange(c, device=images.device)[None, :, None, None]
    return padded[batch, channel, rows, cols]


def random_flip(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(images), generator=generator, device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(3), images)


def random_resized_crop(x: torch.Tensor, generator: torch.Generator, scale=(0.08, 1.0),
                        ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """The ImageNet recipe's crop (Szegedy et al. 2015, arXiv 1409.4842; torchvision's RandomResizedCrop) on a whole
    float batch: for each image a window of a random share of its area in `scale` and a random aspect ratio
    (log-uniform in `ratio`), at a random place, resized bilinearly to the image's size. A window wider or taller
    than the image is clipped to it, where torchvision draws again (up to 10 times) and then falls back to a centre
    crop: one draw per image, so the generator's use does not depend on the values."""
    b, _, h, w = x.shape
    draws = torch.rand(4, b, generator=generator, device=x.device)
    area = scale[0] + (scale[1] - scale[0]) * draws[0]
    aspect = torch.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * draws[1])  # width / height
    width = (area * aspect * h / w).sqrt().clamp(max=1)  # shares of the sides: area * h * w pixels, in pixels
    height = (area / aspect * w / h).sqrt().clamp(max=1)  # width / height = aspect
    left, top = draws[2] * (1 - width), draws[3] * (1 - height)
    theta = torch.zeros(b, 2, 3, device=x.device)  # output grid (-1..1) -> input coordinates (-1..1)
    theta[:, 0, 0], theta[:, 0, 2] = width, 2 * left + width - 1
    theta[:, 1, 1], theta[:, 1, 2] = height, 2 * top + height - 1
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def cutout(x: torch.Tensor, size: int, generator: torch.Generator) -> torch.Tensor:
    """Zero a size x size square (clipped at the borders) centred at a random pixel of each image."""
    b, _, h, w = x.shape
    cy = torch.randint(0, h, (b, 1), generator=generator, device=x.device)
    cx = torch.randint(0, w, (b, 1), generator=generator, device=x.device)
    ys = torch.arange(h, device=x.device) - cy + size // 2  # b x h, in [0, size) inside the square
    xs = torch.arange(w, device=x.device) - cx + size // 2
    inside = ((ys >= 0) & (ys < size))[:, :, None] & ((xs >= 0) & (xs < size))[:, None, :]
    return x * ~inside[:, None]


def epoch_order(n: int, generator: torch.Generator) -> torch.Tensor:
    """The permutation of one epoch, on the generator's device."""
    return torch.randperm(n, generator=generator, device=generator.device)


def train_batches(split: Split, batch_size: int, generator: torch.Generator, aug: Augmentation,
                  mean, std, order: torch.Tensor | None = None, channels_last: bool = False,
                  drop_last: bool = False,
                  share: tuple[int, int] = (0, 1)) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """One epoch of shuffled, augmented, normalised batches (the last one may be smaller, unless drop_last: what
    torch.compile wants, as a batch of another size compiles the model again), in the channels_last memory layout
    when asked (the model's, so its first convolution needs no conversion).

    The generator must live on the same device as the split; it alone decides the order and the augmentation.
    `order` is the epoch's permutation, drawn from the generator when None; a resumed epoch passes what was left
    of it. Augmentation is drawn lazily, batch by batch, so the generator's state after an update is exactly what
    the next batch needs. `share` = (rank, world) under torchrun: a streamed split decodes only this rank's rows.
    """
    if order is None:
        order = epoch_order(len(split), generator)
    if drop_last:
        order = order[:len(order) // batch_size * batch_size]
    mean, std = channel_tensors(mean, std, split.images.device)
    for index, images in zip(order.split(batch_size), gathered(split.images, order, batch_size, share)):
        if aug.padding and aug.crop == "pad":
            images = random_crop(images, aug.padding, generator)
        if aug.flip:
            images = random_flip(images, generator)
        x = normalize(images, mean, std)
        if aug.crop == "resized":
            x = random_resized_crop(x, generator)
        if aug.cutout:
            x = cutout(x, aug.cutout, generator)
        yield x.contiguous(memory_format=layout(channels_last)), split.labels[index]


def eval_batches(split: Split, batch_size: int, mean, std, device: torch.device | None = None,
                 channels_last: bool = False) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The split in order, normalised on `device` (default: where the split is), without augmentation, in the
    channels_last layout when asked. `batch_size` counts 32x32 images: larger ones go in proportionally smaller
    batches, so that a batch's activations take about the same memory whatever the image size."""
    device = device or split.images.device
    mean, std = channel_tensors(mean, std, device)
    pixels = split.images.shape[-2] * split.images.shape[-1]
    batch_size = max(1, batch_size * 1024 // pixels) if pixels > 1024 else batch_size
    # Consecutive chunks: views of a tensor (callers that evaluate several models move the split once), decoded
    # files of a streamed split
    for images, labels in zip(split.images.split(batch_size), split.labels.split(batch_size), strict=True):
        yield normalize(images.to(device), mean, std).contiguous(memory_format=layout(channels_last)), labels


def gathered(images, order: torch.Tensor, batch_size: int, share: tuple[int, int] = (0, 1)) -> Iterator[torch.Tensor]:
    """The images of each batch of `order` (batch_size at a time): indexed from a tensor, or read from their files
    by a streamed split, which decodes the next batches meanwhile (only this rank's `share` of each)."""
    if isinstance(images, torch.Tensor):
        return (images[index] for index in order.split(batch_size))
    return images.read(order.cpu().split(batch_size), share)  # the file names are on the host: one copy an epoch
