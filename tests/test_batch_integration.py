"""A real exported U-Net through the batch runner: unet-export -> unet-batch segment -> evaluate."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from batch.cli import main

pytest.importorskip("torch", reason="the integration test exports a checkpoint with torch ([train] extra)")
onnx_export = pytest.importorskip("export.onnx_export", reason="export/ is not available")
ExportOptions = onnx_export.ExportOptions


@pytest.mark.slow
@pytest.mark.parametrize("fp16, layout", [(True, "NHWC"), (False, "NCHW")])
def test_exported_checkpoint_segments_a_kaggle_folder(tiny_checkpoint: Path, kaggle_dir: Path, tmp_path: Path, fp16, layout):
    model = tmp_path / "tiny.onnx"
    onnx_export.export_checkpoint(tiny_checkpoint, model, ExportOptions(fp16=fp16, layout=layout))
    out = tmp_path / "masks"
    runner = CliRunner()
    result = runner.invoke(main, ["segment", str(kaggle_dir / "train"), str(out), "--model", str(model), "--no-progress"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["processed"] == 16 and report["model"]["precision"] == ("fp16" if fp16 else "fp32")
    assert report["model"]["input_layout"] == layout
    result = runner.invoke(main, ["evaluate", str(out), str(kaggle_dir / "train_masks")])
    assert result.exit_code == 0, result.output
    assert "over 16 images" in result.output
