"""The bundled default model: shipped as package data with its contract, and good on held-out cars."""

from __future__ import annotations

import os
from pathlib import Path

import onnx
import pytest
from conftest import REPO

from batch.core.contract import ModelContract
from batch.evaluation import evaluate
from batch.inference.bundled import DEFAULT_MODEL, models_folder
from batch.runs.config import RunConfig
from batch.runs.run import run

MAX_BYTES = 20 * 1024 * 1024  # what the repository may carry


@pytest.fixture(scope="module")
def bundled() -> tuple[Path, dict[str, str]]:
    path = models_folder() / DEFAULT_MODEL
    if not path.is_file():
        pytest.fail(f"no bundled model at {path}: export one with `unet-export to-onnx` (docs/model.md)")
    proto = onnx.load(str(path), load_external_data=False)
    return path, {p.key: p.value for p in proto.metadata_props}


def test_bundled_model_is_small_and_carries_its_contract(bundled):
    path, meta = bundled
    assert sum(file.stat().st_size for file in path.parent.glob("*.onnx")) <= MAX_BYTES  # every device's file
    contract = ModelContract.from_metadata(meta, source=str(path))
    assert contract.input_size[0] % contract.input_multiple == 0 and contract.input_dtype == "uint8"
    assert len(meta["val_cars"].split(",")) >= 5  # the held-out cars it was scored on are recorded
    assert float(meta["val_dice"]) >= 0.99  # the checkpoint's full-resolution validation Dice


def test_bundled_model_masks_its_held_out_cars(bundled, carvana_dir, tmp_path):
    """Two views of every validation car (never trained on) through the runner, scored at full resolution."""
    _, meta = bundled
    photos = tmp_path / "photos"
    photos.mkdir()
    for car in meta["val_cars"].split(","):
        for view in ("03", "11"):  # a side and a three-quarter view
            name = f"{car}_{view}.jpg"
            os.symlink((carvana_dir / "train" / name).resolve(), photos / name)
    report = run(RunConfig(photos, tmp_path / "masks", device="cpu"))
    assert report.processed == len(list(photos.iterdir())) and not report.failed
    assert evaluate(tmp_path / "masks", carvana_dir / "train_masks").mean_dice >= 0.985


def test_the_checkpoint_of_the_bundled_model_is_in_the_repository(bundled, tmp_path):
    """benchmarks.models.bundled_source finds the weights default.onnx was exported from (the GPU run benchmarks them)."""
    from benchmarks.models import ModelError, bundled_source

    path, meta = bundled
    checkpoint, size = bundled_source()
    assert checkpoint.is_file() and checkpoint.is_relative_to(REPO / "checkpoints")
    assert size == ModelContract.from_metadata(meta, source=str(path)).input_size
    with pytest.raises(ModelError, match="commit the checkpoint"):
        bundled_source(tmp_path)
