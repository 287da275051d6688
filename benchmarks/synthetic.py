"""Synthetic studio car photos for benchmarking when no real photos are given.

Decode speed depends on what a JPEG holds: a flat colour decodes far faster than a photo, because
its DCT blocks are nearly empty. These images imitate Carvana's photos closely enough for timing:
1918x1280, a lit studio backdrop with smooth gradients and texture, a car-like body with shading,
windows, wheels and a shadow, sensor noise, saved as 4:2:0 JPEG at a quality that gives files of the
real photos' size (about 100 KB). They are never used for accuracy.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm import tqdm

CARVANA_SIZE = (1280, 1918)  # (H, W) of every Carvana photo
JPEG_QUALITY = 80


def smooth_field(rng: np.random.Generator, size: tuple[int, int], cells: tuple[int, int]) -> np.ndarray:
    """Random smooth field in [-1, 1] of ``size`` (H, W): a ``cells`` grid of noise upsampled bicubically."""
    coarse = rng.uniform(-1, 1, cells).astype(np.float32)
    image = Image.fromarray(coarse, mode="F").resize((size[1], size[0]), Image.Resampling.BICUBIC)
    return np.asarray(image)  # (H, W) float32


def superellipse(
    yy: np.ndarray, xx: np.ndarray, center: tuple[float, float], radii: tuple[float, float], power: float = 4.0
) -> np.ndarray:
    """Bool mask of a rounded rectangle (``power`` 2 is an ellipse, higher is boxier)."""
    return np.abs((yy - center[0]) / radii[0]) ** power + np.abs((xx - center[1]) / radii[1]) ** power <= 1


def synthesize_photo(rng: np.random.Generator, size: tuple[int, int] = CARVANA_SIZE) -> np.ndarray:
    """One (H, W, 3) uint8 studio photo of a car-like shape.

    The scene is drawn at half resolution and upsampled (smooth, like a lens), then per-pixel sensor
    noise is added at full resolution; that keeps the high-frequency content JPEG has to code.
    """
    scene = draw_scene(rng, ((size[0] + 1) // 2, (size[1] + 1) // 2))
    full = Image.fromarray(scene).resize((size[1], size[0]), Image.Resampling.BILINEAR)
    noise = rng.standard_normal((*size, 3), dtype=np.float32) * 2.5
    return np.clip(np.asarray(full, dtype=np.float32) + noise, 0, 255).astype(np.uint8)


def draw_scene(rng: np.random.Generator, size: tuple[int, int]) -> np.ndarray:
    """The noiseless (H, W, 3) uint8 scene: backdrop, car body, cabin, windows, wheels and shadow."""
    height, width = size
    yy, xx = np.mgrid[:height, :width].astype(np.float32)
    horizon = rng.uniform(0.55, 0.65) * height

    # Backdrop: a bright wall fading into a darker floor, uneven lighting, fine texture.
    wall = 235 - 25 * (yy / horizon)
    floor = 205 - 40 * ((yy - horizon) / (height - horizon))
    backdrop = np.where(yy < horizon, wall, floor)
    backdrop += 12 * smooth_field(rng, size, (6, 9)) + 4 * smooth_field(rng, size, (80, 120))
    photo = np.repeat(backdrop[..., None], 3, axis=2) * rng.uniform(0.96, 1.04, 3).astype(np.float32)

    # The car: body, cabin, shadow and wheels, shaded top to bottom with a specular band.
    cy, cx = horizon + rng.uniform(-0.05, 0.05) * height, rng.uniform(0.45, 0.55) * width
    body_r = (rng.uniform(0.10, 0.14) * height, rng.uniform(0.30, 0.38) * width)
    body = superellipse(yy, xx, (cy, cx), body_r)
    cabin = superellipse(
        yy, xx, (cy - body_r[0] * 1.2, cx + rng.uniform(-0.05, 0.05) * width), (body_r[0] * 0.8, body_r[1] * 0.6), 3.0
    )
    windows = superellipse(yy, xx, (cy - body_r[0] * 1.25, cx), (body_r[0] * 0.55, body_r[1] * 0.52), 3.0) & cabin
    shadow = superellipse(yy, xx, (cy + body_r[0] * 1.0, cx), (body_r[0] * 0.35, body_r[1] * 1.05), 2.0)
    photo[shadow] *= 0.55

    paint = rng.uniform(10, 220, 3).astype(np.float32)
    shade = (1.25 - 0.6 * (yy - (cy - 2 * body_r[0])) / (3 * body_r[0]))[..., None]  # lighter on top
    band = np.exp(-(((yy - (cy - 0.4 * body_r[0])) / (0.08 * body_r[0])) ** 2))[..., None]  # specular band
    car_rgb = paint * shade + 120 * band + 6 * smooth_field(rng, size, (20, 30))[..., None]
    car = body | cabin
    photo[car] = car_rgb[car]
    photo[windows] = (35 + 25 * smooth_field(rng, size, (10, 15))[..., None] * np.ones(3, np.float32))[windows]
    for side in (-1, 1):
        wheel_c = (cy + body_r[0] * 0.75, cx + side * body_r[1] * 0.62)
        tyre = superellipse(yy, xx, wheel_c, (body_r[0] * 0.55, body_r[0] * 0.55), 2.0)
        rim = superellipse(yy, xx, wheel_c, (body_r[0] * 0.3, body_r[0] * 0.3), 2.0)
        photo[tyre] = 28
        photo[rim] = 150 + 40 * np.cos(np.arctan2(yy - wheel_c[0], xx - wheel_c[1]) * 10)[rim][:, None]

    return np.clip(photo, 0, 255).astype(np.uint8)


def write_synthetic_photos(
    folder: str | Path,
    count: int,
    *,
    distinct: int | None = None,
    size: tuple[int, int] = CARVANA_SIZE,
    seed: int = 0,
    progress: bool = False,
) -> list[Path]:
    """Write ``count`` JPEGs ``synthetic_NNNN.jpg`` into ``folder``; return their paths in name order.

    The first ``distinct`` (default: all) are drawn one by one; the rest are byte copies of them,
    which cost the same to read and decode and take no time to make.
    """
    if count < 1:
        raise ValueError(f"count must be >= 1, got {count}")
    distinct = count if distinct is None else min(distinct, count)
    if distinct < 1:
        raise ValueError(f"distinct must be >= 1, got {distinct}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths = [folder / f"synthetic_{i:04d}.jpg" for i in range(count)]
    for path in tqdm(paths[:distinct], desc="synthesizing photos", unit="img", disable=not progress):
        Image.fromarray(synthesize_photo(rng, size)).save(path, quality=JPEG_QUALITY, subsampling="4:2:0")
    for i, path in enumerate(paths[distinct:]):
        shutil.copyfile(paths[i % distinct], path)
    return paths
