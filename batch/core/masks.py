"""Binary masks without torch: reading, Kaggle run-length encoding, Dice and IoU.

Shared by the trainer (``unet/``) and the batch runner, which must run without torch.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from batch.core.errors import CarvanaError


class MaskError(CarvanaError):
    """A mask file that cannot be read; the message names the file."""


def read_mask(path: str | Path) -> np.ndarray:
    """Read a mask file (PNG, GIF or JPEG) as a (H, W) bool array: any non-zero value is car.

    Palette images (Kaggle's GIFs) are read by palette index, not by colour.
    """
    try:
        with Image.open(path) as im:
            im.load()
            if im.mode not in ("1", "L", "P", "I", "I;16", "F"):
                im = im.convert("L")
            values = np.asarray(im)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise MaskError(f"cannot read mask {path}: {e}. Re-export it as an 8-bit PNG or GIF.") from e
    if values.ndim != 2:
        raise MaskError(f"mask {path} has shape {values.shape}; expected one channel")
    return values != 0


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle run-length encoding: 1-indexed ``start length`` pairs over the row-major flattened mask."""
    flat = np.asarray(mask, dtype=bool).ravel()
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed starts and ends, alternating
    edges[1::2] -= edges[::2]  # ends -> lengths
    return " ".join(map(str, edges))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: a (H, W) bool mask."""
    height, width = shape
    numbers = np.array(rle.split(), dtype=np.int64)
    if numbers.size % 2:
        raise ValueError("run-length encoding must have an even count of numbers (start length pairs)")
    starts, lengths = numbers[::2] - 1, numbers[1::2]
    if numbers.size and (starts.min() < 0 or (starts + lengths).max() > height * width):
        raise ValueError(f"run-length encoding runs outside a {height}x{width} mask")
    flat = np.zeros(height * width, dtype=bool)
    for start, length in zip(starts, lengths):
        flat[start : start + length] = True
    return flat.reshape(height, width)


def area_fraction(mask: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A (H, W) bool mask shrunk to ``size`` (h, w): each pixel's car fraction * 255, uint8 (soft at edges).

    This is the training target at the model's input size (a box filter, so every source pixel counts once).
    """
    height, width = size
    return np.asarray(Image.fromarray(mask.astype(np.uint8) * 255).resize((width, height), Image.Resampling.BOX))


def dice(pred: np.ndarray, truth: np.ndarray) -> float:
    """Dice coefficient of two bool masks; 1.0 when both are empty (Kaggle's convention)."""
    check_same_shape(pred, truth)
    total = int(pred.sum()) + int(truth.sum())
    if total == 0:
        return 1.0
    return 2.0 * int(np.logical_and(pred, truth).sum()) / total


def iou(pred: np.ndarray, truth: np.ndarray) -> float:
    """Intersection over union of two bool masks; 1.0 when both are empty."""
    check_same_shape(pred, truth)
    union = int(np.logical_or(pred, truth).sum())
    if union == 0:
        return 1.0
    return int(np.logical_and(pred, truth).sum()) / union


def check_same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(f"masks differ in size: {a.shape} vs {b.shape}")
