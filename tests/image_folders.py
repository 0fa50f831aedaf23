"""Generated image folders for the own-data tests (Python device, Node, browser page).

A folder in tf_keras' class-subfolder layout with a few easy classes (where the bright
part of the picture is), mixed formats (png, jpeg, bmp, gif) and sizes, written with
Pillow in well under a second: no downloads, nothing checked in.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

CLASSES = ("bottom", "left", "top")
FORMATS = (("png", "PNG"), ("jpg", "JPEG"), ("bmp", "BMP"), ("gif", "GIF"))


def picture(kind: str, height: int, width: int, rng: np.random.Generator) -> np.ndarray:
    """An RGB uint8 image whose bright region says its class."""
    img = rng.uniform(0, 70, (height, width, 3))
    if kind == "top":
        img[: height // 2] += 160
    elif kind == "bottom":
        img[height // 2 :] += 160
    elif kind == "left":
        img[:, : width // 2] += 160
    else:
        img[:, width // 2 :] += 160
    img *= rng.uniform(0.8, 1.0, 3)  # a colour tint per image
    return np.clip(img, 0, 255).astype(np.uint8)


def make_image_folder(
    root: Path,
    per_class: int = 12,
    classes: tuple[str, ...] = CLASSES,
    formats: tuple[tuple[str, str], ...] = FORMATS,
    seed: int = 0,
    sizes: tuple[int, int] = (8, 24),
) -> Path:
    """``root/<class>/<i>.<ext>``: ``per_class`` images per class, formats cycled, each of
    a random size in ``sizes``."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for kind in classes:
        (root / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            ext, fmt = formats[i % len(formats)]
            h, w = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, 2))
            Image.fromarray(picture(kind, h, w, rng)).save(root / kind / f"{i:03d}.{ext}", fmt)
    return root
