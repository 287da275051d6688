"""Output formats, file naming and the submission CSV."""

from __future__ import annotations

import io
import zlib
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from batch.core.masks import FullMask, MaskRuns, changes, read_mask, rle_decode, true_at
from batch.runs.config import RunConfig
from batch.runs.formats import encode, encode_png1_mask, encode_png_mask, outline, output_paths
from batch.runs.mask_png import equal_runs, pack_bits, zlib_from_runs
from batch.runs.outputs import write_submission
from batch.runs.storage import LocalFolder


@pytest.fixture
def mask() -> np.ndarray:
    yy, xx = np.mgrid[:37, :53]
    return np.where((yy - 18) ** 2 / 100 + (xx - 25) ** 2 / 300 <= 1, 255, 0).astype(np.uint8)  # (37, 53)


@pytest.fixture
def photo() -> Image.Image:
    yy, xx = np.mgrid[:37, :53]
    rgb = np.stack([100 + 2 * xx, 80 + 3 * yy, np.full_like(xx, 120)], axis=-1)  # smooth: little JPEG noise
    return Image.fromarray(rgb.astype(np.uint8))


def test_output_names_mirror_the_input_tree(tmp_path: Path):
    paths = output_paths(tmp_path, PurePosixPath("day1/car.JPG"), ("png", "gif", "rle", "overlay", "cutout"))
    assert paths == {
        "png": tmp_path / "day1" / "car.png",
        "gif": tmp_path / "day1" / "car.gif",
        "rle": tmp_path / ".rle" / "day1" / "car.JPG.rle",
        "overlay": tmp_path / "day1" / "car_overlay.jpg",
        "cutout": tmp_path / "day1" / "car_cutout.png",
    }
    assert list(output_paths(tmp_path, PurePosixPath("x.png"), ("gif",))) == ["gif"]


def test_png_is_8bit_grayscale_0_255(mask):
    data = encode_png_mask(mask)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "L", (53, 37))
        np.testing.assert_array_equal(np.asarray(im), mask)


def test_png_of_an_empty_and_a_full_mask():
    for value in (0, 255):
        with Image.open(io.BytesIO(encode_png_mask(np.full((3, 1), value, np.uint8)))) as im:
            assert np.asarray(im).tolist() == [[value]] * 3


def scanlines(rows: np.ndarray) -> bytes:
    """What a PNG's zlib stream must inflate to: each row after a filter byte 0."""
    return np.concatenate([np.zeros((rows.shape[0], 1), np.uint8), rows], axis=1).tobytes()


def run_of(length: int, width: int, start: int = 2) -> np.ndarray:
    rows = np.zeros((3, width), np.uint8)
    rows[1, start : start + length] = 255
    return rows


@pytest.mark.parametrize(
    "rows",
    [
        np.zeros((5, 7), np.uint8),
        np.full((3, 300), 255, np.uint8),  # runs across rows, through the filter bytes
        np.full((1, 1), 255, np.uint8),
        np.zeros((1, 1), np.uint8),
        *(run_of(length, length + 5) for length in (1, 2, 3, 257, 258, 259, 260, 261, 516, 517, 518, 519)),
        run_of(40, 60, start=0),  # a row that starts with a non-zero byte
        np.random.default_rng(0).integers(0, 256, (20, 33), dtype=np.uint8),  # no runs: literals of every value
        (np.random.default_rng(1).random((50, 61)) > 0.5).astype(np.uint8) * 255,
        np.tile(np.array([[0, 255]], np.uint8), (400, 700)),  # every byte a run: a skewed, long block
    ],
    ids=lambda rows: f"{rows.shape[0]}x{rows.shape[1]}",
)
def test_the_deflate_stream_from_runs_inflates_to_the_scanlines(rows: np.ndarray):
    runs = MaskRuns.of(rows)
    np.testing.assert_array_equal(runs.pixels(), rows)
    assert zlib.decompress(zlib_from_runs(runs)) == scanlines(rows)  # zlib checks the Adler-32 from the runs too


def test_stretches_that_are_not_maximal_runs_make_the_same_stream():
    """A mask made from a model's scores comes as stretches that may continue the value before them."""
    rows = (np.random.default_rng(2).random((30, 41)) > 0.7).astype(np.uint8) * 255
    maximal = MaskRuns.of(rows)
    extra = np.union1d(maximal.starts, np.arange(0, rows.size, 5))  # every fifth pixel starts a stretch too
    split = MaskRuns(rows.shape, extra, rows.reshape(-1)[extra])
    np.testing.assert_array_equal(split.pixels(), rows)
    assert zlib_from_runs(split) == zlib_from_runs(maximal)
    assert encode_png_mask(FullMask(lambda: rows, lambda: split)) == encode_png_mask(rows)


@pytest.mark.parametrize("size", [0, 1, 2, 7, 8, 9, 15, 16, 17, 1000, 4097])
def test_changes_are_found_at_every_offset_of_their_64_bit_word(size: int):
    rng = np.random.default_rng(size)
    for flat in (rng.integers(0, 2, size).astype(np.uint8), np.zeros(size, np.uint8), np.arange(size, dtype=np.uint8)):
        np.testing.assert_array_equal(changes(flat), np.flatnonzero(flat[1:] != flat[:-1]))
        np.testing.assert_array_equal(true_at(flat.reshape(1, -1) == 1), np.flatnonzero(flat == 1))


def test_pack_bits_packs_fields_from_their_lowest_bit():
    rng = np.random.default_rng(5)
    counts = rng.integers(0, 26, 3000)
    values = rng.integers(0, 2**30, 3000)  # bits above a field's count are not its own: left out
    bits = [(int(v) >> b) & 1 for v, c in zip(values, counts) for b in range(c)]
    bits += [0] * (-len(bits) % 8)
    assert pack_bits(values, counts) == np.packbits(np.array(bits, np.uint8), bitorder="little").tobytes()
    assert pack_bits(np.array([5]), np.array([3])) == b"\x05"


def test_equal_runs_of_code_lengths():
    assert equal_runs([0, 0, 0, 8, 8, 1, 0]) == [(0, 3), (8, 2), (1, 1), (0, 1)]
    assert equal_runs([7]) == [(7, 1)]


def test_png_of_a_real_mask_is_as_small_as_zlibs_run_length_strategy(mask):
    big = np.kron(mask, np.ones((32, 32), np.uint8))  # (1184, 1696): a car-sized mask with long runs
    data = encode_png_mask(big)
    with Image.open(io.BytesIO(data)) as im:
        np.testing.assert_array_equal(np.asarray(im), big)
    rle = zlib.compressobj(6, zlib.DEFLATED, zlib.MAX_WBITS, 9, zlib.Z_RLE)  # what the encoder wrote before
    assert len(data) <= len(rle.compress(scanlines(big)) + rle.flush()) + 64  # the PNG's header and chunks


def test_png1_is_a_1_bit_mask_read_back_as_the_same_car(mask, tmp_path: Path):
    data = encode_png1_mask(mask)
    with Image.open(io.BytesIO(data)) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "1", (53, 37))
    (tmp_path / "m.png").write_bytes(data)
    np.testing.assert_array_equal(read_mask(tmp_path / "m.png"), mask == 255)
    big = np.kron(mask, np.ones((32, 32), np.uint8))  # at a photo's size, where the bytes are mostly runs
    assert len(encode_png1_mask(big)) < 0.9 * len(encode_png_mask(big))
    assert output_paths(tmp_path, PurePosixPath("car.jpg"), ("png1",)) == {"png1": tmp_path / "car.png"}
    with pytest.raises(ValueError, match="png and png1 are the same file"):
        RunConfig("in", "out", formats=("png", "png1"))


def test_gif_is_a_kaggle_palette_mask(mask, tmp_path: Path):
    path = tmp_path / "m.gif"
    path.write_bytes(encode("gif", mask))
    with Image.open(path) as im:
        assert im.mode == "P"
        assert set(np.unique(np.asarray(im))) == {0, 1}  # palette indices, like Kaggle's *_mask.gif
        assert im.getpalette()[:6] == [0, 0, 0, 255, 255, 255]
    np.testing.assert_array_equal(read_mask(path), mask == 255)


def test_rle_round_trips(mask):
    rle = encode("rle", mask).decode("ascii")
    np.testing.assert_array_equal(rle_decode(rle, mask.shape), mask == 255)


def test_overlay_keeps_the_car_dims_the_background_to_gray_and_outlines_the_mask(mask, photo):
    """Readable on a car of any colour: the car as it is, a gray background, a cyan outline."""
    with Image.open(io.BytesIO(encode("overlay", mask, photo))) as im:
        assert (im.format, im.size) == ("JPEG", photo.size)
        overlay = np.asarray(im).astype(int)
    original = np.asarray(photo).astype(int)
    edge, near = outline(mask == 255, 1), outline(mask == 255, 4)  # the line, and where JPEG smears its colour
    car, background = (mask == 255) & ~near, (mask == 0) & ~near
    assert np.abs(overlay - original)[car].mean() < 8  # the car untouched but for JPEG noise
    assert overlay[background].mean() < 0.7 * original[background].mean()  # dimmed
    assert np.abs(overlay[background] - overlay[background].mean(axis=1, keepdims=True)).mean() < 6  # gray
    assert np.abs(overlay[edge] - (0, 255, 255)).mean() < 60  # a cyan line


def test_outline_is_a_band_on_both_sides_of_the_edge():
    car = np.zeros((9, 9), bool)
    car[3:6, 3:6] = True
    band = outline(car, 1)
    assert band.sum() == 24 and not band[4, 4] and band[2, 2] and band[3, 3] and not band[1, 1]


def test_cutout_is_transparent_outside_the_car(mask, photo):
    with Image.open(io.BytesIO(encode("cutout", mask, photo))) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", photo.size)
        rgba = np.asarray(im)
    np.testing.assert_array_equal(rgba[..., 3], mask)
    np.testing.assert_array_equal(rgba[..., :3][mask == 255], np.asarray(photo)[mask == 255])


def test_photo_formats_need_the_photo(mask):
    with pytest.raises(ValueError, match="needs the photo"):
        encode("cutout", mask)


def test_submission_lists_finished_masks_in_the_given_order(tmp_path: Path):
    (tmp_path / "a.rle").write_text("1 2")
    (tmp_path / "c.rle").write_text("")
    entries = [(name, PurePosixPath(name).with_suffix(".rle")) for name in ("b.jpg", "a.jpg", "c.jpg")]
    rows = write_submission(LocalFolder(tmp_path), entries)
    assert rows == 2
    assert (tmp_path / "submission.csv").read_text() == "img,rle_mask\na.jpg,1 2\nc.jpg,\n"
