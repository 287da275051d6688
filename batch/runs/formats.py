"""Output formats of ``unet-batch segment``: where each file goes and how it is encoded.

Every file is written atomically (:func:`batch.core.files.write_atomic`); leftover temporaries of a killed
run are removed by the next run (:func:`batch.core.files.remove_stale_temporaries`).
"""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import Image

from batch.core.masks import FullMask, MaskRuns, rle_encode
from batch.runs.mask_png import encode_png

FORMATS = ("png", "png1", "gif", "rle", "overlay", "cutout")
SAME_FILE = ("png", "png1")  # two encodings of one file: a run writes one of them
PHOTO_FORMATS = ("overlay", "cutout")  # formats that need the full-size photo
SUBMISSION_NAME = "submission.csv"
CONFIDENCE_NAME = "confidence.csv"  # photo,confidence: which masks a person should look at first
RLE_DIR = ".rle"  # per-image run-length encodings, the source of truth for submission.csv
OVERLAY_OUTLINE = (0, 255, 255)  # cyan: an outline that stands out on car paints and on gray
OVERLAY_DIM = 0.45  # how much darker the (gray) background is drawn than the photo
OVERLAY_ALPHA = 0.45  # of the tints in evaluate's error pictures
JPEG_QUALITY = 90  # of the pictures the project writes as JPEG: overlays, error pictures


def output_paths(output_dir: Path, rel: PurePosixPath, formats: tuple[str, ...]) -> dict[str, Path]:
    """The files that ``formats`` write for the input ``rel`` (relative to the input folder)."""
    base = output_dir.joinpath(*rel.parts)
    names = {
        "png": base.with_suffix(".png"),
        "png1": base.with_suffix(".png"),
        "gif": base.with_suffix(".gif"),
        "rle": output_dir.joinpath(RLE_DIR, *rel.parts).with_name(rel.name + ".rle"),
        "overlay": base.with_name(f"{base.stem}_overlay.jpg"),
        "cutout": base.with_name(f"{base.stem}_cutout.png"),
    }
    return {fmt: names[fmt] for fmt in formats}


# ---------------------------------------------------------------------------------------------
# Encoders: uint8 masks (H, W) with 0 = background and 255 = car.


def encode_png_mask(mask: np.ndarray | FullMask) -> bytes:
    """8-bit grayscale PNG of ``mask`` ((H, W) uint8), deflated from its runs (batch.runs.mask_png: about a millisecond
    at 1918x1280 from the runs of a model's mask, where zlib takes 5 ms and Pillow, trying five row filters, several
    times that)."""
    runs = as_full_mask(mask).runs
    return encode_png(runs, runs.size[1], 8)


def encode_png1_mask(mask: np.ndarray | FullMask) -> bytes:
    """1-bit grayscale PNG of ``mask`` (H, W) uint8: black background, white car (any non-zero value).

    A quarter smaller than the 8-bit file (3.5 kB instead of 4.8 kB at 1918x1280); image tools read it, but
    code that expects 0/255 pixel values reads 0/1 (Pillow: mode "1", a bool array).
    """
    pixels = as_full_mask(mask).pixels
    return encode_png(MaskRuns.of(np.packbits(pixels != 0, axis=1)), pixels.shape[1], 1)


def as_full_mask(mask: np.ndarray | FullMask) -> FullMask:
    return mask if isinstance(mask, FullMask) else FullMask.of(mask)


def conflicting_formats(formats: tuple[str, ...]) -> str | None:
    """Why ``formats`` cannot be written together (png and png1 are the same file), or None."""
    if all(fmt in formats for fmt in SAME_FILE):
        return "formats png and png1 are the same file (NAME.png, 8-bit or 1-bit): choose one"
    return None


def encode_gif_mask(mask: np.ndarray) -> bytes:
    """Kaggle-style palette GIF: index 0 = background (black), 1 = car (white)."""
    image = Image.fromarray((mask != 0).astype(np.uint8), mode="P")
    image.putpalette([0, 0, 0, 255, 255, 255])
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


def encode_overlay(photo: Image.Image, mask: np.ndarray) -> bytes:
    """JPEG of the photo with the car in its own colours, the background dimmed to gray, and the mask's outline drawn
    in a colour no car paint has (a tint would vanish on a car of its own colour: magenta on a red car)."""
    car = Image.fromarray(mask, mode="L")
    background = Image.blend(photo.convert("L").convert("RGB"), Image.new("RGB", photo.size), OVERLAY_DIM)
    picture = Image.composite(photo, background, car)
    radius = max(1, round(max(photo.size) / 640))  # a line of about 4 px on a 1918x1280 photo: visible when shrunk
    picture.paste(OVERLAY_OUTLINE, mask=Image.fromarray(outline(mask > 0, radius).astype(np.uint8) * 255, mode="L"))
    return encode_jpeg(picture)


def outline(car: np.ndarray, radius: int) -> np.ndarray:
    """The pixels within ``radius`` (a square) of the edge of the (H, W) bool ``car``, on both sides of it."""
    return grow(car, radius) & grow(~car, radius)


def grow(region: np.ndarray, radius: int) -> np.ndarray:
    """``region`` dilated by a (2 radius + 1)-square, one axis at a time."""
    grown = region.copy()
    for axis in (0, 1):
        source = grown.copy()
        for shift in range(1, radius + 1):
            ahead = [slice(None)] * 2
            behind = [slice(None)] * 2
            ahead[axis], behind[axis] = slice(shift, None), slice(None, -shift)
            grown[tuple(ahead)] |= source[tuple(behind)]
            grown[tuple(behind)] |= source[tuple(ahead)]
    return grown


def encode_jpeg(picture: Image.Image) -> bytes:
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=JPEG_QUALITY)
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


def encode(fmt: str, mask: np.ndarray | FullMask, photo: Image.Image | None = None) -> bytes:
    """The bytes of one output file; ``photo`` (8-bit RGB, the mask's size) for PHOTO_FORMATS. The 8-bit PNG is made
    from the mask's runs, every other format from its pixels."""
    mask = as_full_mask(mask)
    if fmt in PHOTO_FORMATS:
        if photo is None:
            raise ValueError(f"format {fmt} needs the photo")
        return encode_overlay(photo, mask.pixels) if fmt == "overlay" else encode_cutout(photo, mask.pixels)
    if fmt in FULL_MASK_ENCODERS:
        return FULL_MASK_ENCODERS[fmt](mask)
    return PIXEL_ENCODERS[fmt](mask.pixels)


FULL_MASK_ENCODERS = {"png": encode_png_mask, "png1": encode_png1_mask}  # encoders of a FullMask
PIXEL_ENCODERS = {"gif": encode_gif_mask, "rle": encode_rle}  # encoders of the (H, W) uint8 pixels
