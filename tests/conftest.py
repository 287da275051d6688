"""Shared fixtures: tiny synthetic car photos and masks made on the fly, tiny models and checkpoints."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
CARVANA = REPO.parent / "shared" / "data" / "carvana"


def synthetic_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo with one bright-ish ellipse 'car' on a textured studio background, and its bool mask."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.2, 0.35) * width
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    background = 200 + 20 * np.sin(xx / 7.0)[..., None] + rng.normal(0, 6, (height, width, 3))
    car = rng.uniform(20, 120, 3) + rng.normal(0, 6, (height, width, 3))
    photo = np.where(mask[..., None], car, background)
    return np.clip(photo, 0, 255).astype(np.uint8), mask


def write_kaggle_folder(root: Path, cars: int, views: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``root/train/<car>_NN.jpg`` and ``root/train_masks/<car>_NN_mask.gif`` (palette 0/1), like Kaggle's."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    for c in range(cars):
        car = f"{c:012x}"
        for v in range(1, views + 1):
            photo, mask = synthetic_pair(rng, *size)
            Image.fromarray(photo).save(root / "train" / f"{car}_{v:02d}.jpg", quality=95)
            gif = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
            gif.putpalette([0, 0, 0, 255, 255, 255])
            gif.save(root / "train_masks" / f"{car}_{v:02d}_mask.gif")
    return root


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """4 cars x 4 views of 64x96 synthetic photos in the Kaggle layout."""
    return write_kaggle_folder(tmp_path / "carvana", cars=4, views=4, size=(64, 96))


@pytest.fixture
def carvana_dir() -> Path:
    """The real shared Carvana photos; skips the test when the folder is absent."""
    if not (CARVANA / "train").is_dir():
        pytest.skip(f"real Carvana data not found at {CARVANA} (see DEVELOPERS.md: ../shared/data/carvana)")
    return CARVANA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a width-4, depth-2 U-Net trained for one epoch on synthetic photos (64x96)."""
    from unet.model import UNetConfig
    from unet.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    data = write_kaggle_folder(root / "data", cars=3, views=4, size=(64, 96))
    cfg = TrainConfig(data_dir=str(data), out_dir=str(root / "run"), epochs=1, batch_size=4, scale=1.0, device="cpu", val_cars=1)
    train(cfg, UNetConfig(width=4, depth=2), progress=False)
    return root / "run" / "best.pt"
