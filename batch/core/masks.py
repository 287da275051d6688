"""Binary masks without torch: reading, their rows' runs, Kaggle run-length encoding, Dice and IoU.

Shared by the trainer (``unet/``) and the batch runner, which must run without torch. A mask file
and a run-length encoding come from outside (a user's folder, a submission CSV): both are checked
before any work is sized by them, so that a bad one costs one clear :class:`MaskError`, never a
hang, a traceback or the memory of a decompression bomb.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import numpy as np
from PIL import Image

from batch.core.errors import CarvanaError
from batch.core.files import FileRefused, read_input_file
from batch.core.images import DECODE_ERRORS, pillow_message

MASK_FORMATS = ("PNG", "GIF", "JPEG")
MAX_MASK_BYTES = 512 * 2**20  # an 89-megapixel 8-bit mask stored raw is 90 MB: a bigger file is not a mask
MAX_RLE_DIGITS = 18  # no mask has 10**18 pixels; numbers this short also add up inside int64
BYTES_LITERAL = re.compile(r"\bb'(?:[^'\\]|\\.)*'" + r'|\bb"(?:[^"\\]|\\.)*"')  # how Pillow quotes a file's bytes (b'\xf2j')
RLE_FIX = "encode the mask again (`unet-batch segment --format rle` writes Kaggle's encoding)"


class MaskError(CarvanaError):
    """A mask file or run-length encoding that cannot be read; the message names the file and the fix."""


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class MaskRuns:
    """A mask (or any (H, B) uint8 rows) as the stretches of equal values along its rows: each stretch's first pixel
    and value. A mask is a few runs per row (background, car, background), so what is done with its runs (a PNG's
    deflate stream) costs far less than a pass over its 2.45 million pixels at 1918x1280.

    Every row's first pixel starts a stretch; two stretches in a row may hold the same value (a stretch need not be
    a maximal run).
    """

    size: tuple[int, int]  # (H, W)
    starts: np.ndarray  # (k,) int64 flat indices r * W + c, ascending
    values: np.ndarray  # (k,) uint8: the value from each start to the next (or to the row's end)

    def __post_init__(self) -> None:
        height, width = self.size
        if self.starts.shape != self.values.shape or height < 1 or width < 1:
            raise ValueError(f"runs of a {height}x{width} mask need one value per start")

    @classmethod
    def of(cls, rows: np.ndarray) -> MaskRuns:
        """The maximal runs of ``rows`` ((H, W) uint8): one comparison of neighbouring pixels."""
        rows = np.ascontiguousarray(rows, dtype=np.uint8)
        height, width = rows.shape
        flat = rows.reshape(-1)
        change = changes(flat) + 1  # pixel i differs from pixel i - 1 (flat: 10x faster than 2-D)
        starts = np.union1d(change[change % width != 0], np.arange(height, dtype=np.int64) * width)
        return cls((height, width), starts, flat[starts])

    def pixels(self) -> np.ndarray:
        """The (H, W) uint8 rows."""
        lengths = np.diff(self.starts, append=self.size[0] * self.size[1])
        return np.repeat(self.values, lengths).reshape(self.size)


@dataclass
class FullMask:
    """A photo's full-size mask in the forms its writers need, each made once, on first use: its pixels (the
    (H, W) uint8 array, 0 or 255) or its rows' runs (what a PNG is deflated from, made without the pixels)."""

    make_pixels: Callable[[], np.ndarray]
    make_runs: Callable[[], MaskRuns]

    @classmethod
    def of(cls, pixels: np.ndarray) -> FullMask:
        return cls(lambda: pixels, lambda: MaskRuns.of(pixels))

    @cached_property
    def pixels(self) -> np.ndarray:
        return self.make_pixels()

    @cached_property
    def runs(self) -> MaskRuns:
        return self.make_runs()


def changes(flat: np.ndarray) -> np.ndarray:
    """The sorted indices ``i`` where ``flat[i + 1] != flat[i]``: one comparison, its few hits found by :func:`true_at`."""
    n = flat.size - 1
    differs = np.empty(-(-max(n, 0) // 8) * 8, bool)
    differs[n:] = False
    np.not_equal(flat[1:], flat[:-1], out=differs[:n])
    return true_at(differs)


def true_at(flags: np.ndarray) -> np.ndarray:
    """The sorted flat indices of the True values of the bool array ``flags``.

    A sparse array's hits are found 8 at a time, in the array read as 64-bit words (padded to a whole word,
    when it is not, in a copy): 5x faster than ``np.flatnonzero`` over the 2.45 million bytes of a 1918x1280
    mask.
    """
    flat = np.ascontiguousarray(flags).reshape(-1)
    if flat.size % 8:
        flat = np.concatenate((flat, np.zeros(8 - flat.size % 8, bool)))
    words = np.flatnonzero(flat.view(np.uint64) != 0)
    hits = np.flatnonzero(flat.reshape(-1, 8)[words])
    return words[hits // 8] * 8 + hits % 8


def read_mask(path: str | Path, max_pixels: int | None = None) -> np.ndarray:
    """Read a mask file (PNG, GIF or JPEG) as a (H, W) bool array: any non-zero value is car.

    Palette images (Kaggle's GIFs) are read by palette index, not by colour. Only a regular file
    (a FIFO or device in a mask's place is refused, never waited on) of at most ``MAX_MASK_BYTES``
    is read, and only a header of at most ``max_pixels`` (default: Pillow's decompression-bomb
    limit) is decoded: a hostile file is refused before it costs time or memory.
    """
    data = read_mask_file(path)
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    try:
        with Image.open(io.BytesIO(data), formats=MASK_FORMATS) as im:
            check_mask_size(im.width, im.height, limit, path)
            im.load()
            if im.mode not in ("1", "L", "P", "I", "I;16", "F"):
                im = im.convert("L")
            values = np.asarray(im)
    except Image.DecompressionBombError as e:  # Pillow's own refusal, at twice its limit, before our check
        raise MaskError(f"mask {path} is too large to decode safely ({pillow_message(e)}): {TOO_LARGE_FIX}") from e
    except DECODE_ERRORS as e:
        raise MaskError(
            f"cannot read mask {path}: not a PNG, GIF or JPEG image that decodes ({decode_message(e)}); "
            "re-export it as an 8-bit PNG or GIF"
        ) from e
    except MemoryError as e:
        raise MaskError(f"cannot read mask {path}: not enough memory to decode it; free memory or remove the file") from e
    if values.ndim != 2:
        raise MaskError(f"mask {path} has shape {values.shape}; re-export it with one channel")
    return values != 0


TOO_LARGE_FIX = "a mask is the size of its photo; re-export it at that size"


def decode_message(error: BaseException) -> str:
    """Pillow's message without the bytes of the file it sometimes quotes (a mask's place may hold a secret)."""
    return BYTES_LITERAL.sub("<bytes>", pillow_message(error))


def read_mask_file(path: str | Path) -> bytes:
    """The bytes of a mask file: a regular file of at most ``MAX_MASK_BYTES``, read without blocking."""
    try:
        return read_input_file(path, MAX_MASK_BYTES)
    except FileRefused as e:
        raise MaskError(f"mask {path} {e}: replace it by the mask file or remove it") from e


def check_mask_size(width: int, height: int, limit: int, path: str | Path) -> None:
    """A :class:`MaskError` for a header giving an empty image or more than ``limit`` pixels (before decoding)."""
    if width < 1 or height < 1:
        raise MaskError(f"mask {path} has an empty {width}x{height} header; re-export it as an 8-bit PNG or GIF")
    if width * height > limit:
        raise MaskError(
            f"mask {path} is {width}x{height} ({width * height / 1e6:.0f} megapixels): too large to decode safely, more "
            f"than the {limit / 1e6:.0f} MP limit; {TOO_LARGE_FIX}"
        )


def rle_encode(mask: np.ndarray) -> str:
    """Kaggle run-length encoding: 1-indexed ``start length`` pairs over the row-major flattened mask."""
    flat = np.asarray(mask, dtype=bool).ravel()
    padded = np.concatenate([[False], flat, [False]])
    edges = np.flatnonzero(padded[1:] != padded[:-1]) + 1  # 1-indexed starts and ends, alternating
    edges[1::2] -= edges[::2]  # ends -> lengths
    return " ".join(map(str, edges))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """Inverse of :func:`rle_encode`: a (H, W) bool mask; a :class:`MaskError` for anything else.

    The text comes from a CSV anyone may have written: it is checked to be ASCII decimal ``start
    length`` pairs (no signs, no Unicode digits, numbers that fit int64), no more runs than pixels,
    every run inside the mask, before a mask is made from it.
    """
    height, width = shape
    pixels = height * width
    numbers = rle_numbers(rle, pixels)
    starts, lengths = numbers[::2] - 1, numbers[1::2]
    if numbers.size and (starts.min() < 0 or (starts + lengths).max() > pixels):
        raise MaskError(f"run-length encoding runs outside a {height}x{width} mask (starts count from 1); {RLE_FIX}")
    flat = np.zeros(pixels, dtype=bool)
    for start, length in zip(starts, lengths):
        flat[start : start + length] = True
    return flat.reshape(height, width)


def rle_numbers(rle: str, pixels: int) -> np.ndarray:
    """The numbers of a run-length encoding as int64, each checked to be ASCII decimal of at most 18 digits."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise MaskError(f"run-length encoding must have an even count of numbers (start length pairs); {RLE_FIX}")
    if len(tokens) > 2 * pixels:
        raise MaskError(f"run-length encoding has {len(tokens) // 2} runs, more runs than the mask has pixels; {RLE_FIX}")
    digits = "".join(tokens)
    if not (digits.isascii() and digits.isdigit()) and tokens:
        raise MaskError(f"run-length encoding must be decimal numbers separated by spaces; {RLE_FIX}")
    if tokens and max(map(len, tokens)) > MAX_RLE_DIGITS:
        raise MaskError(f"run-length encoding has a number of more than {MAX_RLE_DIGITS} digits; {RLE_FIX}")
    return np.array(tokens, dtype=np.int64)


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
