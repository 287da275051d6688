"""`unet-bench tradeoff`: the resolution ceiling, run folders and the joined table."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from benchmarks.cli import main
from benchmarks.config import BenchError
from benchmarks.tradeoff import read_run, resolution_ceiling


def disc(shape: tuple[int, int], radius: float) -> np.ndarray:
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    return (yy - shape[0] / 2) ** 2 + (xx - shape[1] / 2) ** 2 < radius**2


def test_ceiling_is_exact_for_straight_edges_on_the_coarse_grid():
    truth = np.zeros((64, 96), bool)
    truth[:, 24:72] = True  # edges on multiples of 8: every 8x8 cell is all car or all background
    assert resolution_ceiling(truth, (8, 12)) == 1.0
    truth[:16] = False  # corners: bilinear upsampling rounds them off, even from a perfect coarse mask
    assert 0.98 < resolution_ceiling(truth, (8, 12)) < 1.0


def test_ceiling_loses_thin_parts_and_rises_with_size():
    truth = disc((256, 384), 90)
    truth[20:128, 190:192] = True  # a 2-pixel antenna that an 8x smaller model cannot represent
    coarse, fine = resolution_ceiling(truth, (32, 48)), resolution_ceiling(truth, (128, 192))
    assert coarse < fine < 1.0
    assert fine > 0.99


def write_run(folder: Path, dice: list[float]) -> Path:
    folder.mkdir()
    config = {"model_config": {"width": 8, "depth": 3, "in_channels": 3, "out_channels": 1}, "input_size": [64, 96]}
    (folder / "config.json").write_text(json.dumps(config))
    lines = [json.dumps({"epoch": i + 1, "val_dice": d, "val_dice_min": d - 0.1}) for i, d in enumerate(dice)]
    (folder / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_read_run_takes_the_best_epoch(tmp_path):
    run = read_run(write_run(tmp_path / "r", [0.9, 0.95, 0.94]))
    assert (run.width, run.depth, run.size, run.epochs, run.best_epoch) == (8, 3, (64, 96), 3, 2)
    assert run.val_dice == pytest.approx(0.95) and run.val_dice_min == pytest.approx(0.85)


def test_read_run_rejects_a_folder_that_is_not_a_run(tmp_path):
    with pytest.raises(BenchError, match="not a unet-train run folder"):
        read_run(tmp_path)


def test_tradeoff_command_joins_ceiling_speed_and_runs(kaggle_dir, bench_model, bench_cache, tmp_path):
    run = write_run(tmp_path / "run", [0.97])
    run_config = json.loads((run / "config.json").read_text())
    run_config["model_config"].update(width=4, depth=4)
    run_config["input_size"] = [32, 48]
    (run / "config.json").write_text(json.dumps(run_config))
    out = tmp_path / "T"
    result = CliRunner().invoke(
        main,
        [
            "tradeoff",
            "--masks",
            str(kaggle_dir / "train_masks"),
            "--limit",
            "4",
            "--sizes",
            "32x48",
            "--widths",
            "4",
            "--depths",
            "4",
            "--run",
            str(run),
            "--out",
            str(out),
            "--cache-dir",
            str(bench_cache),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "tradeoff.json").read_text())
    assert results["settings"]["masks"] == 4
    assert results["device"] == "cpu"  # --device auto, on a machine without a GPU
    [ceiling] = results["ceilings"]
    assert 0.9 < ceiling["min_dice"] <= ceiling["mean_dice"] <= 1.0
    [speed] = results["speeds"]
    assert speed["status"] == "ok" and speed["images_per_second"]["median"] > 0 and speed["best_batch"] in (1, 2, 4, 8)
    row = next(line for line in (out / "tradeoff.md").read_text().splitlines() if line.startswith("| 32x48"))
    assert "0.9700 (1 of 1)" in row and f"{ceiling['mean_dice']:.5f}" in row


def test_tradeoff_device_defaults_to_auto_like_every_command():
    """Issue 22: `unet-bench tradeoff --device` defaulted to cpu where the other commands default to auto."""
    devices = {name: [p for p in command.params if p.name == "device"] for name, command in main.commands.items()}
    assert {name: params[0].default for name, params in devices.items() if params} == {
        "run": "auto",
        "tradeoff": "auto",
        "scaling": "auto",
    }


def test_tradeoff_command_names_sizes_the_depth_cannot_take(kaggle_dir, tmp_path):
    result = CliRunner().invoke(
        main,
        [
            "tradeoff",
            "--masks",
            str(kaggle_dir / "train_masks"),
            "--sizes",
            "30x48",
            "--depths",
            "4",
            "--out",
            str(tmp_path / "T"),
        ],
    )
    assert result.exit_code == 2
    assert "30x48" in result.output and "multiples of 2**depth = 16" in result.output
