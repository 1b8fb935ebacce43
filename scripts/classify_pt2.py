"""Classify a folder of images with an exported ensemble, using torch and Pillow alone (snapens not installed):
`python scripts/classify_pt2.py ensemble.pt2 FOLDER > predictions.csv`.

The .pt2 comes from `python -m snapens.export run=DIR out=ensemble.pt2`; its `snapens.json` says the classes and
the image size. Each image is read as RGB and resized to that size (bilinear, as `snapens.ensemble predict=` does,
so both give the same classes and probabilities); the program takes the uint8 batch and returns probabilities.
"""

import csv
import json
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".webp", ".tif", ".tiff")  # snapens.images.IMAGE_EXTENSIONS


def read(path: Path, height: int, width: int) -> torch.Tensor:
    with Image.open(path) as image:
        if image.mode.startswith("I"):  # 16-bit grey: scaled to 8 bits (convert("RGB") would clip it to white)
            pixels = np.asarray(image).astype(np.int64)
            image = Image.fromarray(((pixels.clip(0, 65535) * 255 + 32767) // 65535).astype(np.uint8))
        image = image.convert("RGB")
        if image.size != (width, height):
            image = image.resize((width, height), Image.Resampling.BILINEAR)
        return torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)  # uint8 3 x H x W


def main() -> None:
    program_file, folder = sys.argv[1], Path(sys.argv[2])
    extra = {"snapens.json": ""}
    program = torch.export.load(program_file, extra_files=extra).module()
    info = json.loads(extra["snapens.json"])
    height, width = info["image_size"]
    files = sorted(p for p in folder.rglob("*") if p.suffix.lower() in SUFFIXES and p.is_file())
    if not files:
        sys.exit(f"no image files ({', '.join(SUFFIXES)}) under {folder}")
    with torch.no_grad():
        probs = torch.cat([program(torch.stack([read(f, height, width) for f in files[i:i + 256]]))
                           for i in range(0, len(files), 256)])
    out = csv.writer(sys.stdout)
    out.writerow(["file", "class", "probability"])
    for path, p in zip(files, probs):
        out.writerow([path, info["classes"][int(p.argmax())], f"{p.max().item():.6f}"])


if __name__ == "__main__":
    main()
