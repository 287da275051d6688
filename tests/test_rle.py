import numpy as np
import pytest

from batch.core.masks import read_mask, rle_decode, rle_encode


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


def test_rle_decode_rejects_runs_outside_the_mask():
    with pytest.raises(ValueError, match="outside"):
        rle_decode("10 5", (2, 3))
    with pytest.raises(ValueError, match="even"):
        rle_decode("1 2 3", (2, 3))


def test_known_kaggle_encoding(carvana_dir):
    mask = read_mask(carvana_dir / "train_masks" / "00087a6bd4dc_01_mask.gif")
    numbers = rle_encode(mask).split()
    assert mask.shape == (1280, 1918)
    assert numbers[:6] == ["879386", "40", "881253", "141", "883140", "205"]
    assert len(numbers) == 1390
