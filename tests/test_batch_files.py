"""Atomic writes, stale temporaries, files indexed by stem, evenly spread picks (batch.core.files)."""

from __future__ import annotations

from pathlib import Path

import pytest

from batch.core.files import DuplicateNameError, index_by_stem, remove_stale_temporaries, spread_evenly, write_atomic


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

    monkeypatch.setattr("batch.core.files.os.replace", broken_replace)
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


def test_index_by_stem_strips_a_suffix_and_names_both_files_of_a_clash(tmp_path: Path):
    paths = [tmp_path / "car_01_mask.gif", tmp_path / "car_02_mask.png"]
    assert index_by_stem(paths, strip_suffix="_mask") == {"car_01": paths[0], "car_02": paths[1]}
    assert index_by_stem(paths) == {"car_01_mask": paths[0], "car_02_mask": paths[1]}
    with pytest.raises(DuplicateNameError, match=r"car_01_mask.gif and .*car_01.png both have the name 'car_01'"):
        index_by_stem([*paths, tmp_path / "car_01.png"], strip_suffix="_mask")


def test_spread_evenly_spans_first_to_last():
    items = list(range(100))
    assert spread_evenly(items, 5) == [0, 25, 50, 74, 99]  # round(i * 99 / 4): 24.75 -> 25, 74.25 -> 74
    assert spread_evenly(items, 1) == [0]
    assert spread_evenly(items[:3], 8) == [0, 1, 2]
    picks = spread_evenly(items, 16)
    assert len(set(picks)) == 16 and picks == sorted(picks) and picks[0] == 0 and picks[-1] == 99
    with pytest.raises(ValueError, match="at least 1"):
        spread_evenly(items, 0)
