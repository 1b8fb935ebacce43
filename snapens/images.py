"""Image files as uint8 tensors, read the one way snapens reads them everywhere (the data, predict=, an Ensemble's
`read_images`): Pillow, RGB, 16-bit grey scaled rather than clipped, resized bilinearly where asked."""

from pathlib import Path

import numpy as np
import torch
from PIL import Image

from snapens.errors import SnapensError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")  # read with Pillow


def read_image(path: Path, size: int | tuple[int, int]) -> torch.Tensor:
    """One image file -> uint8 3 x H x W (RGB; resized to size x size when size > 0, or to (H, W) when a pair)."""
    try:
        with Image.open(path) as image:
            image = to_8_bits(image, path).convert("RGB")
            if size:
                height, width = (size, size) if isinstance(size, int) else size
                image = image.resize((width, height), Image.Resampling.BILINEAR)
            return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SnapensError(f"cannot read image {path}: {e}; replace or remove the file") from None


def read_size(path: Path) -> tuple[int, int]:
    """(width, height) as an image file declares it, read from its header without decoding the pixels."""
    try:
        with Image.open(path) as image:
            return image.size
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SnapensError(f"cannot read image {path}: {e}; replace or remove the file") from None


def sizes_differ(first: Path, first_size: tuple[int, int], other: Path, other_size: tuple[int, int]) -> str:
    """The one-line refusal of images of two sizes in one data set ((width, height) each), with the fix."""
    return (f"images differ in size: {first} is {first_size[0]}x{first_size[1]}, {other} is "
            f"{other_size[0]}x{other_size[1]}; set data.image_size=N to resize all to NxN")


def read_images(files: list[Path], size: tuple[int, int] | None = None) -> torch.Tensor:
    """uint8 N x 3 x H x W: image files read as the training data was (RGB), each resized to `size` (H, W) only
    when it differs (None: as they are, which must agree)."""
    images = []
    for f in files:
        image = read_image(f, 0)
        same = size is None or tuple(image.shape[1:]) == tuple(size)
        images.append(image if same else read_image(f, tuple(size)))
    return torch.stack(images)


def to_8_bits(image: Image.Image, path: Path) -> Image.Image:
    """A 16-bit grey image (PNG, TIFF) scaled to 8 bits: Pillow's convert("RGB") would clip every value above 255,
    turning almost the whole image white. 0..65535 maps to 0..255, rounded; 32-bit integer images are refused."""
    if image.mode not in ("I", "I;16", "I;16B", "I;16L", "I;16N"):
        return image
    pixels = np.asarray(image).astype(np.int64)
    if pixels.min() < 0 or pixels.max() > 65535:
        raise SnapensError(f"cannot read image {path}: {image.mode} pixels beyond 16 bits (0..65535); convert it to "
                           "8-bit RGB")
    return Image.fromarray(((pixels * 255 + 32767) // 65535).astype(np.uint8))
