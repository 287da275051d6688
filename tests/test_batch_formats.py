"""Output formats, file naming, atomic writes and the submission CSV."""

from __future__ import annotations

import io
from pathlib import Path, PurePosixPath

import numpy as np
import pytest
from PIL import Image

from batch.formats import (
    encode,
    encode_png_mask,
    output_paths,
    remove_stale_temporaries,
    write_atomic,
    write_submission,
)
from batch.masks import read_mask, rle_decode


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


def test_overlay_tints_only_the_car(mask, photo):
    with Image.open(io.BytesIO(encode("overlay", mask, photo))) as im:
        assert (im.format, im.size) == ("JPEG", photo.size)
        overlay = np.asarray(im).astype(int)
    original = np.asarray(photo).astype(int)
    change = np.abs(overlay - original).mean(axis=2)  # (H, W)
    car, background = mask == 255, mask == 0
    assert change[car].mean() > 3 * change[background].mean()  # tinted vs only JPEG noise


def test_cutout_is_transparent_outside_the_car(mask, photo):
    with Image.open(io.BytesIO(encode("cutout", mask, photo))) as im:
        assert (im.format, im.mode, im.size) == ("PNG", "RGBA", photo.size)
        rgba = np.asarray(im)
    np.testing.assert_array_equal(rgba[..., 3], mask)
    np.testing.assert_array_equal(rgba[..., :3][mask == 255], np.asarray(photo)[mask == 255])


def test_photo_formats_need_the_photo(mask):
    with pytest.raises(ValueError, match="needs the photo"):
        encode("cutout", mask)


def test_write_atomic_replaces_and_leaves_no_temporary(tmp_path: Path):
    target = tmp_path / "x.png"
    write_atomic(target, b"one")
    write_atomic(target, b"two")
    assert target.read_bytes() == b"two"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_write_atomic_failure_keeps_the_old_file(tmp_path: Path, monkeypatch):
    target = tmp_path / "x.png"
    target.write_bytes(b"finished")

    def broken_replace(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("batch.formats.os.replace", broken_replace)
    with pytest.raises(OSError):
        write_atomic(target, b"new")
    assert target.read_bytes() == b"finished"
    assert [p.name for p in tmp_path.iterdir()] == ["x.png"]


def test_stale_temporaries_are_removed(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    stale = tmp_path / "sub" / ".x.png.1a2b3c4d.unet-batch-tmp"
    stale.write_bytes(b"trunc")
    keep = [tmp_path / "sub" / "x.png", tmp_path / ".hidden", tmp_path / "y.unet-batch-tmp"]
    for path in keep:
        path.write_bytes(b"keep")
    assert remove_stale_temporaries(tmp_path) == 1
    assert not stale.exists() and all(path.exists() for path in keep)


def test_submission_lists_finished_masks_in_the_given_order(tmp_path: Path):
    (tmp_path / "a.rle").write_text("1 2")
    (tmp_path / "c.rle").write_text("")
    rows = write_submission(tmp_path, [("b.jpg", tmp_path / "b.rle"), ("a.jpg", tmp_path / "a.rle"), ("c.jpg", tmp_path / "c.rle")])
    assert rows == 2
    assert (tmp_path / "submission.csv").read_text() == "img,rle_mask\na.jpg,1 2\nc.jpg,\n"
