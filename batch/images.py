"""Reading photos with Pillow: the CPU decode path, shared by training and the batch runner."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


def load_resized_rgb(path: str | Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    """Decode ``path`` as RGB resized to ``size`` = (H, W); return it (H, W, 3 uint8) and the original (H, W).

    JPEGs are decoded at a reduced DCT scale (Pillow's draft mode: 1/2, 1/4 or 1/8) no smaller than
    ``size``, so a 1918x1280 photo bound for 480x320 is decoded at 480x320 directly. The remaining
    resize is Pillow's antialiased bilinear filter. Grayscale, CMYK, palette, 16-bit and RGBA inputs
    become 8-bit RGB (alpha dropped).
    """
    height, width = size
    with Image.open(path) as im:
        original = (im.height, im.width)
        im.draft("RGB", (width, height))
        rgb = im.convert("RGB") if im.mode != "RGB" else im
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb), original
