import numpy as np
import pytest
from conftest import write_photo
from PIL import Image

from unet.data import DataError, cache_samples, car_id, pair_files, resolve_size, split_by_car


def test_car_id_is_the_name_before_the_view_number():
    assert car_id("00087a6bd4dc_01") == "00087a6bd4dc"
    assert car_id("my_car_photo_12") == "my_car_photo"
    assert car_id("front") == "front"


def test_kaggle_layout_pairs_and_reports_orphans(kaggle_dir):
    (kaggle_dir / "train" / "extra_01.jpg").write_bytes((kaggle_dir / "train" / "000000000000_01.jpg").read_bytes())
    (kaggle_dir / "train_masks" / "lonely_03_mask.gif").write_bytes(b"GIF89a")
    pairing = pair_files(kaggle_dir)
    assert len(pairing.samples) == 16
    assert pairing.images_without_mask == ["extra_01"]
    assert pairing.masks_without_image == ["lonely_03"]
    assert all(s.mask.name == f"{s.name}_mask.gif" for s in pairing.samples)


def test_generic_layout_pairs_by_stem(tmp_path):
    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    for stem in ("a", "b"):
        Image.new("RGB", (8, 8)).save(tmp_path / "images" / f"{stem}.PNG")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "a.png")
    Image.new("L", (8, 8)).save(tmp_path / "masks" / "b_mask.png")
    pairing = pair_files(tmp_path)
    assert [s.name for s in pairing.samples] == ["a", "b"]


def test_missing_or_empty_folders_are_explained(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        pair_files(tmp_path / "nope")
    with pytest.raises(DataError, match="train_masks"):
        pair_files(tmp_path)
    (tmp_path / "train").mkdir(), (tmp_path / "train_masks").mkdir()
    with pytest.raises(DataError, match="no photo"):
        pair_files(tmp_path)


def test_two_photos_with_one_name_are_refused(kaggle_dir):
    Image.new("RGB", (8, 8)).save(kaggle_dir / "train" / "000000000000_01.png")
    with pytest.raises(DataError, match=r"000000000000_01.jpg and .*000000000000_01.png both have the name '000000000000_01'"):
        pair_files(kaggle_dir)


def test_split_by_car_is_deterministic_and_never_leaks(kaggle_dir):
    samples = pair_files(kaggle_dir).samples
    train, val = split_by_car(samples, val_cars=1, seed=3)
    assert len(val) == 4 and len(train) == 12
    assert not {s.car_id for s in train} & {s.car_id for s in val}
    assert split_by_car(samples, val_cars=1, seed=3) == (train, val)
    seeds = {tuple(s.name for s in split_by_car(samples, 1, seed)[1]) for seed in range(10)}
    assert len(seeds) > 1  # the seed matters
    with pytest.raises(DataError, match="--val-cars"):
        split_by_car(samples, val_cars=4, seed=0)


def test_resolve_size_rounds_the_scale_to_multiples(kaggle_dir):
    first = pair_files(kaggle_dir).samples[0].image  # 64x96
    assert resolve_size(first, 16, 0.5, None) == (32, 48)
    assert resolve_size(first, 16, 0.3, None) == (16, 32)
    assert resolve_size(first, 8, None, (24, 40)) == (24, 40)
    with pytest.raises(DataError, match="multiples of 16"):
        resolve_size(first, 16, None, (24, 40))


def test_cache_holds_resized_photos_soft_targets_and_full_masks(kaggle_dir):
    samples = pair_files(kaggle_dir).samples[:3]
    cached = cache_samples(samples, (32, 48), keep_full_masks=True, workers=2, desc="test")
    assert cached.images.shape == (3, 32, 48, 3) and cached.targets.shape == (3, 32, 48)
    full = cached.full_mask(0)
    assert full.shape == (64, 96) and full.dtype == bool
    # the downsized target is the car fraction of each 2x2 block
    blocks = full.reshape(32, 2, 48, 2).mean(axis=(1, 3))
    assert np.abs(cached.targets[0] / 255 - blocks).max() < 0.01


def test_mismatched_mask_size_names_the_file(kaggle_dir):
    bad = kaggle_dir / "train_masks" / "000000000001_02_mask.gif"
    Image.new("P", (10, 10)).save(bad)
    samples = pair_files(kaggle_dir).samples
    with pytest.raises(DataError, match="000000000001_02_mask.gif.*10x10"):
        cache_samples(samples, (32, 48), keep_full_masks=False, workers=1, desc="test")


def test_unreadable_mask_names_the_file(kaggle_dir):
    bad = kaggle_dir / "train_masks" / "000000000002_03_mask.gif"
    bad.write_bytes(b"not a gif")
    with pytest.raises(DataError, match="000000000002_03_mask.gif"):
        cache_samples(pair_files(kaggle_dir).samples, (32, 48), keep_full_masks=False, workers=1, desc="test")


def test_a_photo_just_short_of_the_training_size_is_padded_and_so_is_its_target(tmp_path):
    """As the runner decodes it: 190x128 at DCT 1/2 is 95x64, padded to 96x64, not stretched; the target too."""
    (tmp_path / "images").mkdir(), (tmp_path / "masks").mkdir()
    truth = write_photo(tmp_path / "images" / "car_01.jpg", (128, 190), seed=2)
    Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "masks" / "car_01.png")
    cached = cache_samples(pair_files(tmp_path).samples, (64, 96), keep_full_masks=True, workers=1, desc="test")
    assert cached.contents == [(64, 95)] and cached.targets.shape == (1, 64, 96)
    np.testing.assert_array_equal(cached.targets[0, :, 95], cached.targets[0, :, 94])
    blocks = truth.reshape(64, 2, 95, 2).mean(axis=(1, 3))  # each target pixel: the car fraction of its 2x2 block
    assert np.abs(cached.targets[0, :, :95] / 255 - blocks).max() < 0.01
