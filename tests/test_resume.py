"""Resume knows what made the outputs (issue 22): another model, threshold or TTA is refused unless --overwrite;
an interrupted --overwrite is not resumed as done; a rerun with nothing to do keeps the last report."""

from __future__ import annotations

import json
from pathlib import Path

from click.testing import CliRunner
from conftest import make_tiny_onnx, write_photo

from batch.cli import main
from batch.runs import run as runs


def segment(photos: Path, out: Path, model: Path, *options: str):
    result = CliRunner().invoke(main, ["segment", str(photos), str(out), "--model", str(model), "--no-progress", *options])
    assert "Traceback" not in result.output
    return result


def photos_in(folder: Path, count: int = 3) -> Path:
    for i in range(count):
        write_photo(folder / f"p{i}.jpg", (48, 64), seed=i)
    return folder


def test_a_rerun_with_another_model_threshold_or_tta_is_refused_and_names_the_change(tmp_path: Path, tiny_onnx: Path):
    photos, out = photos_in(tmp_path / "in"), tmp_path / "out"
    other = make_tiny_onnx(tmp_path / "other.onnx", size=(32, 48))
    assert segment(photos, out, tiny_onnx).exit_code == 0
    masks = {p.name: p.read_bytes() for p in out.glob("*.png")}
    for model, options, change in ((other, (), "model"), (tiny_onnx, ("--threshold", "0.3"), "threshold"),
                                   (tiny_onnx, ("--tta",), "--tta")):  # fmt: skip
        refused = segment(photos, out, model, *options)
        assert refused.exit_code == 2 and change in refused.output and "--overwrite" in refused.output, refused.output
    assert {p.name: p.read_bytes() for p in out.glob("*.png")} == masks  # nothing mixed in
    assert segment(photos, out, other, "--overwrite").exit_code == 0
    assert json.loads((out / ".unet-batch" / "made-by.json").read_text())["model"] == str(other)
    assert segment(photos, out, other).exit_code == 0  # the new settings resume


def test_a_rerun_may_add_formats_from_the_same_model(tmp_path: Path, tiny_onnx: Path):
    photos, out = photos_in(tmp_path / "in"), tmp_path / "out"
    assert segment(photos, out, tiny_onnx).exit_code == 0
    assert segment(photos, out, tiny_onnx, "--format", "png", "--format", "rle").exit_code == 0
    assert (out / "submission.csv").is_file()
    assert json.loads((out / ".unet-batch" / "made-by.json").read_text())["formats"] == ["png", "rle"]


def test_an_interrupted_overwrite_is_not_resumed_as_done(tmp_path: Path, tiny_onnx: Path, monkeypatch):
    photos, out = photos_in(tmp_path / "in"), tmp_path / "out"
    other = make_tiny_onnx(tmp_path / "other.onnx", size=(32, 48))
    assert segment(photos, out, tiny_onnx).exit_code == 0

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(runs, "_process", interrupted)
        assert segment(photos, out, other, "--overwrite").exit_code != 0
    refused = segment(photos, out, other)
    assert refused.exit_code == 2 and "did not finish" in refused.output and "--overwrite" in refused.output


def test_a_rerun_with_nothing_to_do_keeps_the_report_of_the_run_that_did_the_work(tmp_path: Path, tiny_onnx: Path):
    photos, out = photos_in(tmp_path / "in"), tmp_path / "out"
    assert segment(photos, out, tiny_onnx).exit_code == 0
    first = (out / "report.json").read_text()
    assert segment(photos, out, tiny_onnx).exit_code == 0
    assert (out / "report.json").read_text() == first and json.loads(first)["processed"] == 3
    history = [json.loads(line) for line in (out / ".unet-batch" / "history.jsonl").read_text().splitlines()]
    assert [run["processed"] for run in history] == [3, 0] and "report_error" not in history[0]
