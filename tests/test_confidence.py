"""A confidence score for every mask (issue 22): from the model's own scores, in [0, 1], in confidence.csv (kept
across resumed runs), in the Python API beside the mask, and summarised in the report and the final line."""

from __future__ import annotations

import csv
import json
import math
from pathlib import Path

import numpy as np
from click.testing import CliRunner
from conftest import write_photo

import batch
from batch.cli import main
from batch.inference.postprocess import mask_confidence, unsure_band


def test_confidence_is_the_share_of_the_car_the_model_is_sure_of():
    band = unsure_band(0.5, "logits")
    assert band == (-math.log(3), math.log(3))
    sharp = np.where(np.arange(100).reshape(10, 10) < 50, -8.0, 8.0)  # 50 car pixels, all sure
    assert mask_confidence(sharp, 0.0, band) == 1.0
    blurred = sharp.copy()
    blurred[4:6] = 0.5  # 20 pixels at probability 0.62, unsure: the car is now 60 pixels, 20 of them unsure
    assert mask_confidence(blurred, 0.0, band) == 1 - 20 / 60
    assert mask_confidence(np.full((4, 4), -8.0), 0.0, band) == 0.0  # no car: nothing to be sure of
    assert mask_confidence(np.full((4, 4), np.nan), 0.0, band) == 0.0
    low, high = unsure_band(0.5, "probabilities")
    assert math.isclose(low, 0.25) and math.isclose(high, 0.75)


def test_every_mask_gets_a_confidence_kept_across_resumed_runs(tmp_path: Path, tiny_onnx: Path):
    photos, out = tmp_path / "in", tmp_path / "out"
    for i in range(4):
        write_photo(photos / f"p{i}.jpg", (48, 64), seed=i)
    run = ["segment", str(photos), str(out), "--model", str(tiny_onnx), "--no-progress"]
    first = CliRunner().invoke(main, [*run, "--limit", "2"])
    assert first.exit_code == 0 and "least confident masks" in first.output, first.output
    second = CliRunner().invoke(main, run)
    assert second.exit_code == 0
    rows = list(csv.reader((out / "confidence.csv").open()))
    assert rows[0] == ["photo", "confidence"] and [row[0] for row in rows[1:]] == [f"p{i}.jpg" for i in range(4)]
    scores = {photo: float(value) for photo, value in rows[1:]}
    assert all(0 <= value <= 1 for value in scores.values())
    report = json.loads((out / "report.json").read_text())
    assert report["confidence"]["photos"] == 4
    least = report["confidence"]["least"]
    assert [entry["confidence"] for entry in least] == sorted(entry["confidence"] for entry in least)
    assert least[0]["photo"] == min(scores, key=scores.get)


def test_the_python_api_returns_the_confidence_beside_the_mask(tmp_path: Path, tiny_onnx: Path):
    write_photo(tmp_path / "a.jpg", (48, 64), seed=1)
    with batch.Segmenter(tiny_onnx, device="cpu") as segmenter:
        mask, confidence = segmenter(tmp_path / "a.jpg", confidence=True)
        assert mask.shape == (48, 64) and 0 < confidence <= 1
        assert np.array_equal(mask, segmenter(tmp_path / "a.jpg"))
