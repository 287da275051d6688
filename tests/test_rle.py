"""Masks (batch.core.masks): Kaggle run-length encoding, and reading mask files that may be anything."""

from __future__ import annotations

import contextlib
import io
import os
import re
import struct
import threading
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.core.masks import MaskError, read_mask, rle_decode, rle_encode


def test_rle_by_hand():
    mask = np.array([[0, 1, 1], [1, 0, 1]], bool)  # flattened: 0 1 1 1 0 1
    assert rle_encode(mask) == "2 3 6 1"
    assert (rle_decode("2 3 6 1", (2, 3)) == mask).all()


@pytest.mark.parametrize("seed", range(5))
def test_rle_round_trip(seed):
    rng = np.random.default_rng(seed)
    mask = rng.random((37, 53)) < rng.uniform(0.05, 0.95)
    mask[0, 0], mask[-1, -1] = seed % 2, seed % 3 == 0  # runs touching both ends
    assert (rle_decode(rle_encode(mask), mask.shape) == mask).all()


def test_rle_of_empty_and_full_masks():
    assert rle_encode(np.zeros((3, 4), bool)) == ""
    assert rle_encode(np.ones((3, 4), bool)) == "1 12"
    assert not rle_decode("", (3, 4)).any()
    assert (rle_decode(" 1  12\n", (3, 4))).all()  # any whitespace between numbers


@pytest.mark.parametrize(
    ("rle", "message"),
    [
        ("10 5", "outside"),
        ("0 1", "outside"),  # starts are 1-indexed
        ("1 2 3", "even"),
        ("3 -1", "decimal numbers"),  # a negative length once set nothing and passed
        ("+2 1", "decimal numbers"),
        ("2 1.0", "decimal numbers"),
        ("0x2 1", "decimal numbers"),
        ("\u0663 1", "decimal numbers"),  # an Arabic-Indic 3: a digit to Python, not to Kaggle
        ("1 99999999999999999999", "digits"),  # past int64: once an OverflowError
        ("9000000000000000000 9000000000000000000", "digits"),  # their sum wrapped around int64 and passed
        ("1 1 " * 7, "more runs than the mask has pixels"),
    ],
)
def test_rle_decode_refuses_what_is_not_a_run_length_encoding(rle, message):
    with pytest.raises(MaskError, match=message) as caught:
        rle_decode(rle, (2, 3))
    assert "encode the mask again" in str(caught.value)


def test_known_kaggle_encoding(carvana_dir):
    mask = read_mask(carvana_dir / "train_masks" / "00087a6bd4dc_01_mask.gif")
    numbers = rle_encode(mask).split()
    assert mask.shape == (1280, 1918)
    assert numbers[:6] == ["879386", "40", "881253", "141", "883140", "205"]
    assert len(numbers) == 1390


# -- reading mask files that may be anything -------------------------------------------------------------------


def png_bytes(mask: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(mask.astype(np.uint8) * 255).save(buffer, "PNG")
    return buffer.getvalue()


def png_claiming(width: int, height: int) -> bytes:
    """A 1x1 PNG whose header claims ``width`` x ``height``: a decompression bomb's header, without the bomb."""
    data = bytearray(png_bytes(np.zeros((1, 1), bool)))
    data[16:24] = struct.pack(">II", width, height)  # IHDR's data starts after the signature, length and type
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))
    return bytes(data)


def unblock_later(fifo: Path, seconds: float) -> threading.Thread:
    """Open ``fifo`` for writing after ``seconds`` (and close it): a reader blocked on it gets end-of-file, so a
    test of code that waits on FIFOs fails instead of hanging."""

    def unblock() -> None:
        time.sleep(seconds)
        with contextlib.suppress(OSError):  # no reader waiting: the code under test did not block
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))

    thread = threading.Thread(target=unblock, daemon=True)
    thread.start()
    return thread


def test_a_mask_is_read_whatever_its_format_and_mode(tmp_path: Path):
    mask = np.zeros((20, 30), bool)
    mask[5:15, 10:20] = True
    (tmp_path / "a.png").write_bytes(png_bytes(mask))
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(tmp_path / "b.gif")
    Image.fromarray(np.stack([mask * 255] * 3, axis=-1).astype(np.uint8)).save(tmp_path / "c.png")  # RGB
    for name in ("a.png", "b.gif", "c.png"):
        assert (read_mask(tmp_path / name) == mask).all(), name


def make_hostile(kind: str, path: Path) -> None:
    mask = np.random.default_rng(0).random((40, 60)) < 0.5
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "device":
        path.symlink_to("/dev/zero")
    elif kind == "dangling link":
        path.symlink_to(path.with_name("gone.png"))
    elif kind == "link loop":
        path.symlink_to(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(png_bytes(mask)[:300])
    elif kind == "broken chunk":  # an IDAT length that lands the parser inside the data: Pillow's SyntaxError
        data = bytearray(png_bytes(mask))
        data[33:37] = struct.pack(">I", int.from_bytes(data[33:37], "big") & 0xFFFF00FF)
        path.write_bytes(bytes(data))
    elif kind == "bomb":  # 10 gigapixels: Pillow's DecompressionBombError, raised when the file is opened
        path.write_bytes(png_claiming(100_000, 100_000))
    elif kind == "large":  # 90 MP, just past Pillow's limit (89 MP): it would warn, then decode it
        path.write_bytes(png_claiming(10_000, 9_000))
    elif kind == "tiff":
        Image.fromarray(mask.astype(np.uint8)).save(path, "TIFF")  # named .png: not a format masks come in


HOSTILE = {
    "fifo": "FIFO (named pipe), not a file",
    "device": "character device, not a file",
    "dangling link": "does not exist, or is a link to nothing",
    "link loop": "link in a loop",
    "folder": "is a folder, not a file",
    "empty": "not a PNG, GIF or JPEG image",
    "truncated": "truncated",
    "broken chunk": "broken PNG file",
    "bomb": "too large to decode safely",
    "large": "10000x9000 (90 megapixels): too large to decode safely, more than the 89 MP limit",
    "tiff": "not a PNG, GIF or JPEG image",
}


@pytest.mark.parametrize("kind", HOSTILE)
def test_read_mask_refuses_anything_but_a_mask_file_quickly_and_says_what_to_do(tmp_path: Path, kind: str):
    path = tmp_path / "x.png"
    make_hostile(kind, path)
    if kind == "fifo":
        unblock_later(path, 5)
    started = time.monotonic()
    with pytest.raises(MaskError, match=re.escape(HOSTILE[kind])) as caught:
        read_mask(path)
    assert time.monotonic() - started < 4, "it waited on the file"
    message = str(caught.value)
    assert str(path) in message and "<_io.BytesIO" not in message and "\\x" not in message  # never the file's bytes
    assert any(fix in message for fix in ("re-export", "replace", "restore", "remove")), message


def test_a_mask_that_cannot_be_opened_says_to_check_its_permissions(tmp_path: Path, monkeypatch):
    path = tmp_path / "locked.png"
    path.write_bytes(png_bytes(np.ones((2, 2), bool)))
    real_open = os.open

    def denied(name, flags, *args, **kwargs):  # as root, chmod 000 does not stop reading: refuse the way the kernel would
        if Path(name) == path:
            raise PermissionError(13, "Permission denied", str(name))
        return real_open(name, flags, *args, **kwargs)

    monkeypatch.setattr(os, "open", denied)
    with pytest.raises(MaskError, match="Permission denied; check its permissions"):
        read_mask(path)
