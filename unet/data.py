"""Training data: pairing photos with masks, the by-car split, and an in-memory cache of resized pairs.

Two folder layouts are read:
- Kaggle: ``DATA_DIR/train/<car>_NN.jpg`` with ``DATA_DIR/train_masks/<car>_NN_mask.gif``;
- generic: ``DATA_DIR/images/<stem>.<jpg|png>`` with ``DATA_DIR/masks/<stem>[_mask].<png|gif|jpg>``.
Every photo is decoded and resized once, into uint8 arrays held in memory, not once per epoch.
"""

from __future__ import annotations

import logging
import random
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from batch.core.errors import CarvanaError
from batch.core.files import DuplicateNameError, index_by_stem
from batch.core.images import is_image_file, load_resized_rgb, pad_edges
from batch.core.masks import MaskError, area_fraction, read_mask

log = logging.getLogger(__name__)

LAYOUTS = {"kaggle": ("train", "train_masks"), "generic": ("images", "masks")}
MASK_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg")
CAR_VIEW = re.compile(r"^(?P<car>.+)_(?P<view>\d+)$")


class DataError(CarvanaError):
    """Unusable training data; the message names the file or folder and the fix."""


@dataclass(frozen=True)
class Sample:
    image: Path
    mask: Path

    @property
    def name(self) -> str:
        return self.image.stem

    @property
    def car_id(self) -> str:
        return car_id(self.image.stem)


@dataclass(frozen=True)
class Pairing:
    samples: list[Sample]  # photos with a mask, sorted by name
    images_without_mask: list[str]
    masks_without_image: list[str]


def car_id(stem: str) -> str:
    """``<car>_NN`` -> ``<car>``; a name without a view number is its own car."""
    match = CAR_VIEW.match(stem)
    return match["car"] if match else stem


def find_layout(data_dir: Path) -> tuple[Path, Path]:
    if not data_dir.is_dir():
        raise DataError(f"data folder {data_dir} does not exist")
    for images, masks in LAYOUTS.values():
        if (data_dir / images).is_dir() and (data_dir / masks).is_dir():
            return data_dir / images, data_dir / masks
    raise DataError(
        f"{data_dir} holds neither train/ + train_masks/ (Kaggle layout) nor images/ + masks/: "
        "put the photos and their masks in one of these pairs of sub-folders"
    )


def files_by_stem(folder: Path, keep: Callable[[Path], bool], strip_suffix: str = "") -> dict[str, Path]:
    """stem -> file for the files of ``folder`` that ``keep`` accepts; two with one stem are a DataError."""
    try:
        return index_by_stem((p for p in sorted(folder.iterdir()) if p.is_file() and keep(p)), strip_suffix)
    except DuplicateNameError as e:
        raise DataError(str(e)) from e


def pair_files(data_dir: str | Path) -> Pairing:
    """Pair photos and masks by file stem (a mask may end in ``_mask``); report the unpaired by name."""
    image_dir, mask_dir = find_layout(Path(data_dir))
    images = files_by_stem(image_dir, is_image_file)
    masks = files_by_stem(mask_dir, lambda p: p.suffix.lower() in MASK_SUFFIXES, strip_suffix="_mask")
    samples = [Sample(images[s], masks[s]) for s in sorted(images.keys() & masks.keys())]
    if not samples:
        raise DataError(
            f"no photo in {image_dir} has a mask in {mask_dir}: masks must share the photo's name "
            "(optionally ending in _mask), e.g. car_01.jpg and car_01_mask.gif"
        )
    return Pairing(
        samples=samples,
        images_without_mask=sorted(images.keys() - masks.keys()),
        masks_without_image=sorted(masks.keys() - images.keys()),
    )


def split_by_car(samples: list[Sample], val_cars: int, seed: int) -> tuple[list[Sample], list[Sample]]:
    """Deterministic split with ``val_cars`` whole cars in validation and no car on both sides."""
    cars = sorted({s.car_id for s in samples})
    if not 1 <= val_cars < len(cars):
        raise DataError(
            f"cannot hold out {val_cars} of {len(cars)} cars for validation: "
            f"choose --val-cars between 1 and {len(cars) - 1} (or add cars)"
        )
    random.Random(seed).shuffle(cars)
    held_out = set(cars[:val_cars])
    train = [s for s in samples if s.car_id not in held_out]
    val = [s for s in samples if s.car_id in held_out]
    return train, val


def default_val_cars(samples: list[Sample]) -> int:
    """About 10% of the cars, at least one."""
    return max(1, round(0.1 * len({s.car_id for s in samples})))


def resolve_size(first_image: Path, multiple: int, scale: float | None, size: tuple[int, int] | None) -> tuple[int, int]:
    """Training size (H, W): ``size`` as given, or ``scale`` times the first photo's size rounded to ``multiple``."""
    if size is not None:
        height, width = size
        if height % multiple or width % multiple or height <= 0 or width <= 0:
            raise DataError(f"--size {height}x{width}: both sides must be positive multiples of {multiple} (2**depth)")
        return size
    if scale is None or not 0 < scale <= 4:
        raise DataError(f"--scale must be in (0, 4], got {scale}")
    try:
        with Image.open(first_image) as im:
            width, height = im.size
    except (OSError, UnidentifiedImageError) as e:
        raise DataError(f"cannot read photo {first_image}: {e}") from e
    return tuple(max(multiple, round(side * scale / multiple) * multiple) for side in (height, width))


@dataclass
class CachedSet:
    """Resized pairs in memory. Full-resolution masks (bit-packed) only where validation needs them."""

    names: list[str]
    images: np.ndarray  # (N, H, W, 3) uint8
    targets: np.ndarray  # (N, H, W) uint8, the mask's car fraction per pixel * 255 (soft at edges)
    full_masks: list[tuple[np.ndarray, tuple[int, int]]] | None  # (np.packbits(mask), (H0, W0)) per image
    contents: list[tuple[int, int]]  # (h, w) of each image that is the photo (the rest: its edges repeated)

    def __len__(self) -> int:
        return len(self.names)

    def full_mask(self, i: int) -> np.ndarray:
        packed, shape = self.full_masks[i]
        return np.unpackbits(packed, count=shape[0] * shape[1]).reshape(shape).astype(bool)


def load_pair(sample: Sample, size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray, np.ndarray, tuple[int, int]]:
    """Decode one pair: the photo at ``size``, the soft target at ``size``, the full-resolution mask, and the (h, w)
    of the first two that is the photo (the runner's decode: a photo a little short of ``size`` is padded)."""
    try:
        fitted = load_resized_rgb(sample.image, size)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise DataError(f"cannot read photo {sample.image}: {e}. Re-save it as JPEG or PNG, or remove it.") from e
    try:
        mask = read_mask(sample.mask)
    except MaskError as e:
        raise DataError(str(e)) from e
    if mask.shape != fitted.shown:
        raise DataError(
            f"mask {sample.mask} is {mask.shape[1]}x{mask.shape[0]} but photo {sample.image} is "
            f"{fitted.shown[1]}x{fitted.shown[0]}: a mask must have its photo's size"
        )
    return fitted.pixels, pad_edges(area_fraction(mask, fitted.content), size), mask, fitted.content


def cache_samples(
    samples: list[Sample], size: tuple[int, int], keep_full_masks: bool, workers: int, desc: str, progress: bool = True
) -> CachedSet:
    height, width = size
    images = np.empty((len(samples), height, width, 3), np.uint8)
    targets = np.empty((len(samples), height, width), np.uint8)
    full_masks = [] if keep_full_masks else None
    contents = []
    with ThreadPoolExecutor(max(1, workers)) as pool:
        pairs = pool.map(lambda s: load_pair(s, size), samples)
        for i, (image, target, mask, content) in enumerate(
            tqdm(pairs, total=len(samples), desc=desc, unit="img", disable=not progress)
        ):
            images[i], targets[i] = image, target
            contents.append(content)
            if full_masks is not None:
                full_masks.append((np.packbits(mask), mask.shape))
    return CachedSet([s.name for s in samples], images, targets, full_masks, contents)
