"""Reading photos with Pillow: the CPU decode path, shared by training and the batch runner.

Also the cheap checks the batch runner makes before decoding: file signature and header
(:func:`probe_image`), so that a file named ``.jpg`` holding something else, an empty or huge file,
or a JPEG the GPU decoder cannot take is recognised before it spoils a batch.
"""

from __future__ import annotations

import io
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import BinaryIO

import numpy as np
from PIL import Image

from batch.core.errors import CarvanaError

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png")
JPEG_SOI = b"\xff\xd8\xff"
JPEG_EOI = b"\xff\xd9"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I")  # one channel, 16 significant bits
# Content that is neither JPEG nor PNG, recognised to say what the file really is.
OTHER_SIGNATURES = {
    b"GIF87a": "GIF",
    b"GIF89a": "GIF",
    b"BM": "BMP",
    b"II*\x00": "TIFF",
    b"MM\x00*": "TIFF",
}
IN_MEMORY_FILE = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
EXIF_ORIENTATION = 0x0112
ORIENTATIONS = {  # EXIF orientation -> the transposition that shows the photo upright
    1: None,
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
SWAPPING_ORIENTATIONS = (5, 6, 7, 8)  # stored sideways: height and width swap
# Errors Pillow raises on a broken file (its parsers use SyntaxError and struct.error too).
DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, Image.DecompressionBombError)

Source = str | Path | BinaryIO
NEAR_SCALE = 0.98  # a DCT scale this close below the target is decoded at and padded (959 -> 960 px)


class ImageError(CarvanaError):
    """A file that cannot be segmented; the message says what is wrong with it and what to do."""


@dataclass(frozen=True)
class ImageInfo:
    format: str  # "JPEG" or "PNG"
    mode: str  # Pillow's mode: "RGB", "L", "CMYK", "RGBA", "P", "I;16", ...
    height: int  # as shown (the EXIF orientation applied)
    width: int
    orientation: int = 1  # EXIF orientation (1: stored upright)

    @property
    def size(self) -> tuple[int, int]:
        return self.height, self.width


def pillow_message(error: BaseException) -> str:
    """Pillow's message for a user, without the in-memory file object it names (``<_io.BytesIO object at 0x...>``)."""
    return IN_MEMORY_FILE.sub("", str(error)).strip() or type(error).__name__


def is_image_file(path: Path) -> bool:
    return path.suffix.lower() in IMAGE_SUFFIXES


@dataclass(frozen=True)
class Fitted:
    """A photo fitted to a model's input size: what the network sees, and what of it is the photo.

    The photo is kept at the size it was decoded at; the rows and columns it is short of the model's size are
    filled with its edge where the pixels are placed (:meth:`place`, into a batch) or asked for (:attr:`pixels`).
    """

    photo: np.ndarray  # (h, w, 3) uint8 RGB: the photo at the size it was decoded or resized to, at most the model's
    size: tuple[int, int]  # the model's input (H, W)
    shown: tuple[int, int]  # the photo's (H, W) as viewers show it

    @property
    def content(self) -> tuple[int, int]:
        """(h, w): the photo fills ``pixels[:h, :w]``; any rows and columns past it repeat its edge."""
        return self.photo.shape[0], self.photo.shape[1]

    @property
    def pixels(self) -> np.ndarray:
        """(H, W, 3) uint8 RGB at the model's size."""
        return pad_edges(self.photo, self.size)

    def place(self, out: np.ndarray) -> None:
        """Write :attr:`pixels` into ``out`` ((H, W, 3) uint8, a batch's row): one copy of the photo."""
        pad_edges(self.photo, self.size, out)


def load_resized_rgb(path: Source, size: tuple[int, int]) -> Fitted:
    """Decode ``path`` as RGB at ``size`` = (H, W), upright as viewers show it.

    JPEGs are decoded at the smallest DCT scale (Pillow's draft mode: 1/2, 1/4 or 1/8) no smaller
    than ``size``, or at most 2% smaller (:func:`draft_request`), so a 1918x1280 photo bound for
    480x320 is decoded at 480x320 directly, and one bound for 960x640 at 959x640. What lands that close
    is padded, not resampled (:func:`fit_rgb`); anything else is resized with Pillow's antialiased
    bilinear filter. Grayscale, CMYK, palette, 16-bit and RGBA inputs become 8-bit RGB (alpha dropped;
    16-bit values keep their top 8 bits). The EXIF orientation (a phone photo stored sideways) is
    applied to the small image: the model sees the car upright, and the mask lines up with the photo as
    shown.
    """
    with Image.open(path) as im:
        orientation = exif_orientation(im)
        stored = (im.height, im.width)
        grid = size[::-1] if orientation in SWAPPING_ORIENTATIONS else size  # the target in the stored grid
        im.draft("RGB", draft_request(stored, grid))
        rgb = to_rgb(im)
        if not fits_by_padding((rgb.height, rgb.width), grid):
            rgb = resized_rgb_image(rgb, grid)  # before orienting: the transposition then moves the small image
        return replace(fit_rgb(orient(rgb, orientation), size), shown=shown_size(stored, orientation))


def fit_rgb(image: Image.Image, size: tuple[int, int]) -> Fitted:
    """Any Pillow image as 8-bit RGB at ``size`` = (H, W): padded when it is at most 2% short of it on each side
    (:data:`NEAR_SCALE`; its last row and column repeated), else resized (antialiased bilinear)."""
    rgb = to_rgb(image)
    shown = (rgb.height, rgb.width)
    if not fits_by_padding(shown, size):
        rgb = resized_rgb_image(rgb, size)
    return Fitted(np.asarray(rgb), tuple(size), shown)


def fits_by_padding(content: tuple[int, int], size: tuple[int, int]) -> bool:
    """Whether an image of ``content`` (H, W) goes into ``size`` by repeating its edges: no side longer, none
    more than 2% shorter. Padding keeps every pixel where the mask's upsample puts it; a resize of a 959-px
    side to 960 px would move them by up to one pixel at twice the cost of the decode."""
    return all(size_side * NEAR_SCALE <= side <= size_side for side, size_side in zip(content, size))


def pad_edges(pixels: np.ndarray, size: tuple[int, int], out: np.ndarray | None = None) -> np.ndarray:
    """``pixels`` (h, w, ...) in the top-left corner of a (H, W, ...) array (``out``, or a new one; ``pixels`` itself
    when it is that size already and no ``out`` is given), its last column and row repeated."""
    (height, width), (h, w) = size, pixels.shape[:2]
    if out is None:
        if (h, w) == (height, width):
            return pixels
        out = np.empty((height, width, *pixels.shape[2:]), pixels.dtype)
    out[:h, :w] = pixels
    out[:h, w:] = pixels[:, -1:]
    out[h:] = out[h - 1 : h]
    return out


def resized_rgb_image(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    height, width = size
    rgb = to_rgb(image)
    return rgb.resize((width, height), Image.Resampling.BILINEAR) if rgb.size != (width, height) else rgb


def exif_orientation(image: Image.Image) -> int:
    """The EXIF orientation tag (1-8; 1, upright, when absent or invalid) from the header, without decoding pixels."""
    try:
        value = image.getexif().get(EXIF_ORIENTATION, 1)
    except Exception:  # a damaged EXIF block: Pillow's parsers raise many types; the photo is taken as stored
        return 1
    return value if value in ORIENTATIONS else 1


def orient(image: Image.Image, orientation: int) -> Image.Image:
    """The image as viewers show it: the transposition EXIF ``orientation`` asks for (``ImageOps.exif_transpose``'s)."""
    method = ORIENTATIONS[orientation]
    return image.transpose(method) if method is not None else image


def shown_size(stored: tuple[int, int], orientation: int) -> tuple[int, int]:
    """(H, W) as shown, from (H, W) as stored."""
    return stored[::-1] if orientation in SWAPPING_ORIENTATIONS else stored


def draft_request(original: tuple[int, int], size: tuple[int, int]) -> tuple[int, int]:
    """The (W, H) to pass to ``Image.draft`` so that libjpeg decodes at the smallest DCT scale covering ``size``.

    libjpeg scales by 1/2, 1/4 or 1/8 with rounding up (1918 px / 4 = 480 px), but Pillow picks the
    scale by floor division of the size it is given (1918 // 480 = 3, so only 1/2): asking for
    exactly the target would decode a 1918x1280 photo at 959x640 on its way to 480x320, three
    times the work. Ask instead for the floor-divided size of the scale we want.

    A scale that lands just short of ``size`` (:data:`NEAR_SCALE`: 1918 px / 2 = 959 px for 960) is taken too:
    the decode is padded to ``size`` (:func:`fit_rgb`) and the mask's upsample reads only the scores of the
    photo's own columns (``Fitted.content``), so every mask pixel stays where a stretch would have moved it
    by up to one pixel, for no resampling pass at all (where the full-size decode and a resize over
    2.5 megapixels would cost four times the decode). Padding without that crop would leave the photo's
    right edge up to 2 photo pixels off: a perfect model's Dice on 40 real masks would fall from 0.9998 to
    0.9980.
    """
    (full_h, full_w), (h, w) = original, size
    for scale in (8, 4, 2):
        if (
            full_w // scale
            and full_h // scale
            and -(-full_w // scale) >= w * NEAR_SCALE
            and -(-full_h // scale) >= h * NEAR_SCALE
        ):
            return full_w // scale, full_h // scale
    return full_w, full_h


def load_rgb(path: Source) -> Image.Image:
    """The full-size photo as an 8-bit RGB Pillow image, upright as viewers show it (for overlays and cutouts)."""
    with Image.open(path) as im:
        im.load()
        return orient(to_rgb(im), exif_orientation(im))


def to_rgb(im: Image.Image) -> Image.Image:
    """Any Pillow image as 8-bit RGB; one-channel 16-bit images are scaled down, not clipped."""
    if im.mode in SIXTEEN_BIT_MODES:
        values = np.asarray(im).astype(np.uint32) >> 8  # (H, W), 0..255
        im = Image.fromarray(values.astype(np.uint8), mode="L")
    return im.convert("RGB") if im.mode != "RGB" else im


def probe_image(data: bytes, path: Path | str, max_pixels: int | None = None) -> ImageInfo:
    """Check an image file's bytes without decoding its pixels; raise :class:`ImageError` naming ``path``.

    Accepts JPEG and PNG content whatever the file's extension. ``max_pixels`` defaults to Pillow's
    decompression-bomb limit.
    """
    kind = content_type(data, path)
    try:
        with Image.open(io.BytesIO(data), formats=[kind]) as im:
            orientation = exif_orientation(im)
            height, width = shown_size((im.height, im.width), orientation)
            info = ImageInfo(format=kind, mode=im.mode, height=height, width=width, orientation=orientation)
    except Image.DecompressionBombError as e:
        raise ImageError(f"{path}: too large to decode safely ({pillow_message(e)}); downscale it") from e
    except Exception as e:  # Pillow's parsers raise many types (OSError, SyntaxError, struct.error, ...)
        raise ImageError(f"{path}: unreadable {kind} header ({pillow_message(e)}); re-save the file as JPEG or PNG") from e
    limit = max_pixels or Image.MAX_IMAGE_PIXELS
    if info.height < 1 or info.width < 1:
        raise ImageError(f"{path}: {kind} header gives an empty {info.width}x{info.height} image")
    if limit and info.height * info.width > limit:
        raise ImageError(
            f"{path}: {info.width}x{info.height} is {info.height * info.width / 1e6:.0f} megapixels, more than the "
            f"{limit / 1e6:.0f} MP limit; downscale it"
        )
    return info


def content_type(data: bytes, path: Path | str) -> str:
    """'JPEG' or 'PNG' from the file's first bytes; an :class:`ImageError` for anything else."""
    if not data:
        raise ImageError(f"{path}: empty file (0 bytes); copy it again from its source")
    if data.startswith(JPEG_SOI):
        return "JPEG"
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    other = next((name for sig, name in OTHER_SIGNATURES.items() if data.startswith(sig)), None)
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        other = "WebP"
    elif data[4:8] == b"ftyp":
        other = "HEIF/AVIF"
    what = f"a {other} file" if other else "neither JPEG nor PNG"  # never its bytes: it may be a secret
    raise ImageError(f"{path}: is {what}; convert it to JPEG or PNG")


def has_jpeg_end(data: bytes, window: int = 4096) -> bool:
    """Whether a JPEG's end-of-image marker is in its last ``window`` bytes (not truncated, no big trailer)."""
    return data.rfind(JPEG_EOI, max(0, len(data) - window)) >= 0
