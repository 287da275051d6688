"""Output formats of ``unet-batch segment``: where each file goes, how it is encoded, and atomic writes.

Every file is written to a hidden temporary name beside its destination and renamed over it
(``os.replace``), so a run killed at any moment leaves either the whole file or nothing. Leftover
temporaries of a killed run are removed by the next run (:func:`remove_stale_temporaries`).
"""

from __future__ import annotations

import csv
import io
import logging
import os
import secrets
import struct
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from batch.masks import rle_encode

log = logging.getLogger(__name__)

FORMATS = ("png", "gif", "rle", "overlay", "cutout")
PHOTO_FORMATS = ("overlay", "cutout")  # formats that need the full-size photo
SUBMISSION_NAME = "submission.csv"
RLE_DIR = ".rle"  # per-image run-length encodings, the source of truth for submission.csv
TEMP_SUFFIX = ".unet-batch-tmp"
OVERLAY_COLOR = (255, 0, 160)  # magenta tint: stands out on cars and on studio backgrounds alike
OVERLAY_ALPHA = 0.45
OVERLAY_QUALITY = 90


def output_paths(output_dir: Path, rel: PurePosixPath, formats: tuple[str, ...]) -> dict[str, Path]:
    """The files that ``formats`` write for the input ``rel`` (relative to the input folder)."""
    base = output_dir.joinpath(*rel.parts)
    names = {
        "png": base.with_suffix(".png"),
        "gif": base.with_suffix(".gif"),
        "rle": output_dir.joinpath(RLE_DIR, *rel.parts).with_name(rel.name + ".rle"),
        "overlay": base.with_name(f"{base.stem}_overlay.jpg"),
        "cutout": base.with_name(f"{base.stem}_cutout.png"),
    }
    return {fmt: names[fmt] for fmt in formats}


# ---------------------------------------------------------------------------------------------
# Encoders: uint8 masks (H, W) with 0 = background and 255 = car.


def encode_png_mask(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG of ``mask`` (H, W) uint8.

    Written directly rather than through Pillow: Pillow tries five PNG row filters per row, which
    for a two-valued mask costs more than everything else in the pipeline; unfiltered rows with
    zlib's run-length strategy are 3x faster and smaller.
    """
    height, width = mask.shape
    rows = np.empty((height, width + 1), dtype=np.uint8)  # each row: filter type 0, then the pixels
    rows[:, 0] = 0
    rows[:, 1:] = mask
    compressor = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)
    pixels = compressor.compress(rows.data) + compressor.flush()
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit, grayscale, no interlace
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", header) + png_chunk(b"IDAT", pixels) + png_chunk(b"IEND", b"")


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def encode_gif_mask(mask: np.ndarray) -> bytes:
    """Kaggle-style palette GIF: index 0 = background (black), 1 = car (white)."""
    image = Image.fromarray((mask != 0).astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


def encode_overlay(photo: Image.Image, mask: np.ndarray) -> bytes:
    """JPEG of the photo with the car tinted."""
    tint = Image.new("RGB", photo.size, OVERLAY_COLOR)
    tinted = Image.blend(photo, tint, OVERLAY_ALPHA)
    overlay = Image.composite(tinted, photo, Image.fromarray(mask, mode="L"))
    buffer = io.BytesIO()
    overlay.save(buffer, format="JPEG", quality=OVERLAY_QUALITY)
    return buffer.getvalue()


ERROR_COLORS = {"hit": (40, 200, 70), "missed": (255, 40, 40), "extra": (40, 120, 255)}  # RGB


def render_errors(photo: Image.Image, predicted: np.ndarray, truth: np.ndarray) -> Image.Image:
    """The photo, dimmed, with the car found tinted green, car missed in red and background taken for car in blue.

    ``predicted`` and ``truth`` are (H, W) bool at the photo's size; the errors are drawn opaque so
    that a one-pixel miss along a long edge stays visible when the picture is shrunk.
    """
    dimmed = Image.blend(photo, Image.new("RGB", photo.size, (0, 0, 0)), 0.35)
    hit = Image.blend(dimmed, Image.new("RGB", photo.size, ERROR_COLORS["hit"]), OVERLAY_ALPHA)
    picture = Image.composite(hit, dimmed, Image.fromarray((predicted & truth).astype(np.uint8) * 255, mode="L"))
    for kind, where in (("missed", truth & ~predicted), ("extra", predicted & ~truth)):
        picture.paste(ERROR_COLORS[kind], mask=Image.fromarray(where.astype(np.uint8) * 255, mode="L"))
    return picture


def encode_cutout(photo: Image.Image, mask: np.ndarray) -> bytes:
    """RGBA PNG: the photo where the car is, transparent elsewhere."""
    cutout = photo.copy()
    cutout.putalpha(Image.fromarray(mask, mode="L"))
    buffer = io.BytesIO()
    cutout.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def encode_rle(mask: np.ndarray) -> bytes:
    return rle_encode(mask != 0).encode("ascii")


def encode(fmt: str, mask: np.ndarray, photo: Image.Image | None = None) -> bytes:
    """The bytes of one output file; ``photo`` (8-bit RGB, the mask's size) for PHOTO_FORMATS."""
    if fmt in PHOTO_FORMATS:
        if photo is None:
            raise ValueError(f"format {fmt} needs the photo")
        return encode_overlay(photo, mask) if fmt == "overlay" else encode_cutout(photo, mask)
    encoders = {"png": encode_png_mask, "gif": encode_gif_mask, "rle": encode_rle}
    return encoders[fmt](mask)


# ---------------------------------------------------------------------------------------------
# Files.


def write_atomic(path: Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A process killed at any moment leaves the old file or the new one, never a partial one.
    ``durable`` also flushes the data to disk before the rename (survives a power cut; slower).
    """
    path = Path(path)
    temp = path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


def remove_stale_temporaries(output_dir: Path) -> int:
    """Delete temporaries left by a killed run; return how many."""
    removed = 0
    for folder, _, files in os.walk(output_dir):
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                Path(folder, name).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d unfinished temporary files of an earlier run in %s", removed, output_dir)
    return removed


def write_submission(output_dir: Path, entries: list[tuple[str, Path]]) -> int:
    """Rebuild ``submission.csv`` from the per-image RLE files that exist; return its row count.

    ``entries``: (img column value, RLE file) in the order the rows should have. The CSV is written
    atomically, so it is always the complete list of the masks finished so far.
    """
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["img", "rle_mask"])
    rows = 0
    for name, rle_file in entries:
        try:
            rle = rle_file.read_text(encoding="ascii")
        except FileNotFoundError:
            continue
        writer.writerow([name, rle])
        rows += 1
    write_atomic(output_dir / SUBMISSION_NAME, buffer.getvalue().encode("utf-8"))
    return rows
