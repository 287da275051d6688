"""``unet-batch segment`` end to end: nested folders, bad files, formats, resume, exit codes, report."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import synthetic_pair, write_photo
from PIL import Image

from batch.cli import main
from batch.core.masks import dice, read_mask, rle_decode
from batch.inference.decode import dali_available
from batch.runs.lock import LOCK_NAME, output_lock

GOOD = ["a.jpg", "b.JPEG", "c.png", "day1/d.jpg", "day1/deep/f.jpeg", "day1/e.jpg", "day2/g.png"]  # photo_tree, sorted
SEEDS = {"a.jpg": 1, "b.JPEG": 2, "c.png": 3, "day1/d.jpg": 4, "day1/e.jpg": 5, "day1/deep/f.jpeg": 6, "day2/g.png": 7}


def segment(*args, **kwargs):
    return CliRunner().invoke(main, ["segment", *map(str, args), "--no-progress"], catch_exceptions=False, **kwargs)


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def mask_path(out: Path, name: str, suffix: str = ".png") -> Path:
    return (out / name).with_suffix(suffix)


def truth_of(name: str, shape: tuple[int, int]) -> np.ndarray:
    return synthetic_pair(np.random.default_rng(SEEDS[name]), *shape)[1]


def add_bad_and_odd_files(root: Path) -> None:
    """Files that must fail (empty, truncated, not an image) and odd ones that must work."""
    (root / "bad").mkdir()
    (root / "bad" / "empty.jpg").write_bytes(b"")
    good = (root / "a.jpg").read_bytes()
    (root / "bad" / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (root / "bad" / "notes.jpg").write_text("shopping list")
    write_photo(root / "odd" / "cmyk.jpg", (96, 144), seed=11, mode="CMYK")
    write_photo(root / "odd" / "gray.jpg", (96, 144), seed=12, mode="L")
    write_photo(root / "odd" / "rgba.png", (96, 144), seed=13, mode="RGBA")
    photo, _ = synthetic_pair(np.random.default_rng(14), 96, 144)
    gray16 = np.asarray(Image.fromarray(photo).convert("L")).astype(np.uint16) * 257
    Image.fromarray(gray16).save(root / "odd" / "gray16.png")
    Image.fromarray(photo[:1, :1]).save(root / "odd" / "tiny.png")
    Image.fromarray(photo).resize((1440, 960)).save(root / "odd" / "large.jpg", quality=90)


def test_segments_a_nested_folder_with_bad_and_odd_files(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    add_bad_and_odd_files(photo_tree)
    out = tmp_path / "out"
    result = segment(photo_tree, out, "--model", tiny_onnx, "--batch-size", "3")
    assert result.exit_code == 1, result.output
    report = report_of(out)
    assert (report["processed"], report["skipped"]) == (13, 0)
    failed = {Path(f["path"]).name: f["reason"] for f in report["failed"]}
    assert sorted(failed) == ["empty.jpg", "notes.jpg", "truncated.jpg"]
    assert "empty file" in failed["empty.jpg"] and "truncated" in failed["truncated.jpg"]
    assert "neither JPEG nor PNG" in failed["notes.jpg"]
    assert all(f["path"].startswith(str(photo_tree)) for f in report["failed"])
    assert "3 photo(s) failed" in result.output and "truncated.jpg" in result.output
    for name in GOOD:  # the tree is mirrored and every mask has its photo's size
        with Image.open(photo_tree / name) as im:
            shape = (im.height, im.width)
        mask = read_mask(mask_path(out, name))
        assert mask.shape == shape
        assert dice(mask, truth_of(name, shape)) > 0.9
    for name, seed in [("cmyk", 11), ("gray", 12), ("rgba", 13), ("gray16", 14)]:
        truth = synthetic_pair(np.random.default_rng(seed), 96, 144)[1]
        assert dice(read_mask(out / "odd" / f"{name}.png"), truth) > 0.9, name
    assert read_mask(out / "odd" / "tiny.png").shape == (1, 1)
    assert read_mask(out / "odd" / "large.png").shape == (960, 1440)
    assert not (out / "bad").exists() or not any((out / "bad").iterdir())


def test_every_format_round_trips(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    out = tmp_path / "out"
    formats = ["--format", "png", "--format", "gif", "--format", "rle", "--format", "overlay", "--format", "cutout"]
    assert segment(photo_tree, out, "--model", tiny_onnx, *formats).exit_code == 0
    with open(out / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"]
    assert [row[0] for row in rows[1:]] == GOOD  # sorted, paths relative to the input folder
    rle = dict(rows[1:])
    for name in GOOD:
        png = mask_path(out, name)
        with Image.open(png) as im:
            assert (im.mode, set(np.unique(np.asarray(im)))) == ("L", {0, 255})
        mask = read_mask(png)
        np.testing.assert_array_equal(read_mask(mask_path(out, name, ".gif")), mask)
        np.testing.assert_array_equal(rle_decode(rle[name], mask.shape), mask)
        stem = png.with_suffix("")
        with Image.open(f"{stem}_overlay.jpg") as overlay, Image.open(f"{stem}_cutout.png") as cutout:
            assert overlay.format == "JPEG" and overlay.size == cutout.size == (mask.shape[1], mask.shape[0])
            assert cutout.mode == "RGBA"
            np.testing.assert_array_equal(np.asarray(cutout)[..., 3] == 255, mask)


def test_rerun_finishes_only_what_is_missing(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    out = tmp_path / "out"
    assert segment(photo_tree, out, "--model", tiny_onnx, "--limit", "3", "--format", "png", "--format", "rle").exit_code == 0
    first = {p: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.rglob("*.png")}
    assert len(first) == 3 and report_of(out)["processed"] == 3
    assert len((out / "submission.csv").read_text().splitlines()) == 4

    result = segment(photo_tree, out, "--model", tiny_onnx, "--format", "png", "--format", "rle")
    assert result.exit_code == 0
    report = report_of(out)
    assert (report["processed"], report["skipped"], report["failed"]) == (4, 3, [])
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == before for p, before in first.items())  # not rewritten
    assert len((out / "submission.csv").read_text().splitlines()) == 8

    assert segment(photo_tree, out, "--model", tiny_onnx, "--format", "png", "--format", "gif").exit_code == 0
    assert (report_of(out)["processed"], report_of(out)["skipped"]) == (7, 0)  # gifs were missing: only they are written
    assert all((p.stat().st_ino, p.stat().st_mtime_ns) == before for p, before in first.items())

    assert segment(photo_tree, out, "--model", tiny_onnx, "--overwrite").exit_code == 0
    assert report_of(out)["processed"] == 7
    assert any(p.stat().st_ino != before[0] for p, before in first.items())


def test_interrupted_run_resumes_consistently(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, failing_inference, monkeypatch):
    """Ctrl-C after the first batch; plus leftovers a hard kill would leave: a temporary, a stale CSV."""
    out = tmp_path / "out"
    failing_inference(KeyboardInterrupt(), when=lambda call: call == 2)
    one_stream = ("--batch-size", "2", "--threads", "1")  # whole batches, in turn
    result = segment(photo_tree, out, "--model", tiny_onnx, *one_stream, "--format", "png", "--format", "rle")
    assert result.exit_code == 130
    report = report_of(out)
    assert report["interrupted"] and report["processed"] == 2
    done = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.png"))
    assert len(done) == 2
    assert len((out / "submission.csv").read_text().splitlines()) == 3  # the CSV lists what is finished
    assert not (out / LOCK_NAME).exists()

    (out / "day1" / ".e.png.0badc0de.unet-batch-tmp").parent.mkdir(exist_ok=True)
    (out / "day1" / ".e.png.0badc0de.unet-batch-tmp").write_bytes(b"\x89PNG half")
    (out / "submission.csv").write_text("img,rle_mask\n")  # killed between an RLE file and the CSV
    monkeypatch.undo()
    result = segment(photo_tree, out, "--model", tiny_onnx, "--format", "png", "--format", "rle")
    assert result.exit_code == 0
    assert (report_of(out)["processed"], report_of(out)["skipped"]) == (5, 2)
    assert not list(out.rglob("*.unet-batch-tmp"))
    rows = (out / "submission.csv").read_text().splitlines()
    assert [row.split(",")[0] for row in rows[1:]] == GOOD


SLOW_SECOND_BATCH = """
import sys, time
from batch.inference.model import CpuPredictor
real_predict, calls = CpuPredictor.predict, []
def predict(engine, batch):
    calls.append(len(batch))
    if len(calls) == 2:
        time.sleep(120)  # SIGTERM arrives here, after the first batch is written
    return real_predict(engine, batch)
CpuPredictor.predict = predict
from batch.cli import main
main(sys.argv[1:])
"""


def test_sigterm_stops_like_ctrl_c_and_exits_143(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    out = tmp_path / "out"
    options = ["--model", str(tiny_onnx), "--batch-size", "2", "--threads", "1", "--no-progress"]  # one stream: in turn
    command = [sys.executable, "-c", SLOW_SECOND_BATCH, "segment", str(photo_tree), str(out), *options]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while len(list(out.rglob("*.png"))) < 2 and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert process.poll() is None, process.communicate()
        process.send_signal(signal.SIGTERM)
        _, stderr = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == 143, stderr
    assert "interrupted: finished masks are kept" in stderr
    report = report_of(out)
    assert report["interrupted"] and report["processed"] == 2
    assert len(list(out.rglob("*.png"))) == 2 and not (out / LOCK_NAME).exists()


def test_an_inference_error_fails_its_batch_and_the_run_goes_on(
    photo_tree: Path, tmp_path: Path, tiny_onnx: Path, failing_inference, monkeypatch
):
    out_of_memory = RuntimeError("[ONNXRuntimeError] : 6 : RUNTIME_EXCEPTION : Failed to allocate memory for requested buffer")
    failing_inference(out_of_memory, when=lambda call: call == 2)
    out = tmp_path / "out"
    result = segment(photo_tree, out, "--model", tiny_onnx, "--batch-size", "3", "--threads", "1")  # one stream: whole batches
    assert result.exit_code == 1, result.output
    report = report_of(out)
    assert (report["processed"], report["stopped"], report["interrupted"]) == (4, "", False)
    assert sorted(Path(f["path"]).name for f in report["failed"]) == ["d.jpg", "e.jpg", "f.jpeg"]  # the second batch
    assert all(
        "inference failed on its batch of 3 (" in f["reason"] and "Failed to allocate" in f["reason"] for f in report["failed"]
    )
    assert "3 photo(s) failed" in result.output

    monkeypatch.undo()
    assert segment(photo_tree, out, "--model", tiny_onnx).exit_code == 0  # the rerun does the rest
    assert (report_of(out)["processed"], report_of(out)["skipped"]) == (3, 4)


def test_an_engine_that_keeps_failing_stops_the_run_with_a_report(
    photo_tree: Path, tmp_path: Path, tiny_onnx: Path, failing_inference
):
    broken = RuntimeError("CUDA failure 700: an illegal memory access was encountered")
    calls = failing_inference(broken, when=lambda call: call > 1)
    out = tmp_path / "out"
    result = segment(photo_tree, out, "--model", tiny_onnx, "--batch-size", "1", "--threads", "1")  # one stream: in turn
    assert result.exit_code == 1, result.output
    report = report_of(out)
    assert report["processed"] == 1 and len(calls) == 4  # one good batch, then three failed ones in a row
    assert "3 batches in a row" in report["stopped"] and "illegal memory access" in report["stopped"]
    assert len(report["failed"]) == 2  # the first two failed batches; the third stopped the run
    assert "stopped: inference failed on 3 batches in a row" in result.output
    assert not (out / LOCK_NAME).exists()


def test_failures_are_listed_once(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    (photo_tree / "broken.jpg").write_bytes(b"")
    result = segment(photo_tree, tmp_path / "out", "--model", tiny_onnx)
    assert result.exit_code == 1
    assert result.output.count("broken.jpg") == 1, result.output


def test_help_says_that_only_the_formats_named_are_written():
    result = CliRunner().invoke(main, ["segment", "--help"])
    assert result.exit_code == 0
    assert "--format overlay` alone writes no mask" in " ".join(result.output.split())


@pytest.mark.slow
def test_killed_process_leaves_only_whole_files(tmp_path: Path, tiny_onnx: Path):
    photos, out = tmp_path / "photos", tmp_path / "out"
    for i in range(40):
        write_photo(photos / f"{i:02d}.jpg", (480, 720), seed=i)
    options = [
        "--model",
        str(tiny_onnx),
        "--batch-size",
        "2",
        "--workers",
        "1",
        "--no-progress",
        "--format",
        "png",
        "--format",
        "rle",
    ]
    command = [sys.executable, "-m", "batch.cli", "segment", str(photos), str(out), *options]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and process.poll() is None and len(list(out.glob("*.png"))) < 3:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    finished = {p: p.stat().st_mtime_ns for p in out.glob("*.png")}
    for path in finished:  # every mask there is whole
        with Image.open(path) as im:
            im.load()
    assert subprocess.run(command, capture_output=True).returncode == 0
    report = report_of(out)
    assert report["processed"] + report["skipped"] == 40
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in finished.items())  # only missing files were written
    assert not list(out.rglob("*.unet-batch-tmp"))
    assert len((out / "submission.csv").read_text().splitlines()) == 41


def test_conflicting_inputs_are_both_reported(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    write_photo(photo_tree / "day1" / "d.png", (64, 96), seed=20)  # day1/d.jpg writes day1/d.png too
    out = tmp_path / "out"
    result = segment(photo_tree, out, "--model", tiny_onnx)
    assert result.exit_code == 1
    report = report_of(out)
    assert sorted(Path(f["path"]).name for f in report["failed"]) == ["d.jpg", "d.png"]
    assert all("conflict" in f["reason"] for f in report["failed"])
    assert report["processed"] == 6 and not (out / "day1" / "d.png").exists()


def test_output_folder_inside_the_input_is_not_read_back(photo_tree: Path, tiny_onnx: Path):
    out = photo_tree / "masks"
    assert segment(photo_tree, out, "--model", tiny_onnx).exit_code == 0
    assert segment(photo_tree, out, "--model", tiny_onnx).exit_code == 0
    rerun = json.loads((out / ".unet-batch" / "history.jsonl").read_text().splitlines()[-1])
    assert (rerun["inputs"], rerun["processed"], rerun["skipped"]) == (7, 0, 7)


def test_report_has_what_the_benchmarks_read(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    custom = tmp_path / "reports" / "run1.json"
    args = ["--model", tiny_onnx, "--device", "cpu", "--report", custom, "--batch-size", "4", "--tta", "--threshold", "0.7"]
    args += ["--format", "gif"]
    assert segment(photo_tree, tmp_path / "out", *args).exit_code == 0
    report = json.loads(custom.read_text())
    assert not (tmp_path / "out" / "report.json").exists()
    assert (report["processed"], report["skipped"], report["failed"]) == (7, 0, [])
    assert report["seconds"] > 0 and report["images_per_second"] == pytest.approx(7 / report["seconds"], rel=0.01)
    assert set(report["stages"]) == {"discover", "setup", "decode", "infer", "postprocess", "write"}
    assert all(report["stages"][s] > 0 for s in ("decode", "infer", "postprocess", "write"))
    assert (report["device"], report["provider"], report["decoder"]) == ("cpu", "CPUExecutionProvider", "pillow")
    assert report["model"] == {
        "path": str(tiny_onnx),
        "precision": "fp32",
        "input_size": [64, 96],
        "input_layout": "NHWC",
        "input_dtype": "uint8",
        "output_kind": "logits",
        "threshold": 0.5,
    }
    assert (report["batch_size"], report["formats"], report["threshold"], report["tta"]) == (4, ["gif"], 0.7, True)


def test_default_model_when_bundled_and_a_clear_error_when_not(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    monkeypatch.setattr("batch.inference.bundled.models_folder", lambda: tmp_path / "models")
    result = segment(photo_tree, tmp_path / "out")
    assert result.exit_code == 2 and "no bundled model" in result.output and "--model PATH" in result.output
    (tmp_path / "models").mkdir()
    (tmp_path / "models" / "default.onnx").write_bytes(tiny_onnx.read_bytes())
    assert segment(photo_tree, tmp_path / "out").exit_code == 0
    assert report_of(tmp_path / "out")["model"]["path"] == str(tmp_path / "models" / "default.onnx")


@pytest.mark.parametrize(
    "case, message",
    [
        ("missing input", "does not exist"),
        ("empty input", "no .jpg, .jpeg or .png files"),
        ("garbage model", "is not a readable ONNX model"),
        ("model without metadata", "has no 'input_height' in its metadata"),
        ("output is a file", "cannot create output folder"),
        ("output is input", "is the input folder"),
        ("input inside output", "lies inside OUTPUT_DIR"),
        ("bad batch size", "Invalid value for '--batch-size'"),
        ("bad threshold", "Invalid value for '--threshold'"),
        ("bad device", "is not a device"),
        ("busy output", "another unet-batch run is writing"),
    ],
)
def test_usage_errors_exit_2(case: str, message: str, photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    import onnx

    inp, out, model, extra = photo_tree, tmp_path / "out", tiny_onnx, []
    if case == "missing input":
        inp = tmp_path / "nowhere"
    elif case == "empty input":
        inp = tmp_path / "empty"
        inp.mkdir()
    elif case == "garbage model":
        model = tmp_path / "junk.onnx"
        model.write_bytes(os.urandom(2000))
    elif case == "model without metadata":
        proto = onnx.load(str(tiny_onnx))
        del proto.metadata_props[:]
        model = tmp_path / "bare.onnx"
        onnx.save(proto, str(model))
    elif case == "output is a file":
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "masks"
    elif case == "output is input":
        out = photo_tree
    elif case == "input inside output":
        out = photo_tree.parent
    elif case == "bad batch size":
        extra = ["--batch-size", "0"]
    elif case == "bad threshold":
        extra = ["--threshold", "1.5"]
    elif case == "bad device":
        extra = ["--device", "tpu"]
    existed = out.exists()
    if case == "busy output":
        out.mkdir()
        with output_lock(out):
            result = segment(inp, out, "--model", model, *extra)
            assert (out / LOCK_NAME).exists()  # the other run's lock is left alone
    else:
        result = segment(inp, out, "--model", model, *extra)
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert not (out / LOCK_NAME).exists()  # a run that cannot start leaves nothing behind
    assert out.exists() == (existed or case == "busy output")


def test_a_run_that_cannot_start_removes_the_folders_it_made(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    monkeypatch.setattr("batch.runs.run.make_plan", lambda *args: (_ for _ in ()).throw(OSError("disk on fire")))
    with pytest.raises(OSError, match="disk on fire"):
        segment(photo_tree, tmp_path / "new" / "deeper" / "out", "--model", tiny_onnx)
    assert not (tmp_path / "new").exists()


@pytest.mark.skipif(dali_available(), reason="DALI is installed")
def test_dali_requested_but_missing_is_an_error(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    result = segment(photo_tree, tmp_path / "out", "--model", tiny_onnx, "--decoder", "dali")
    assert result.exit_code == 2 and "DALI is not installed" in result.output


def test_dali_requested_but_missing_is_an_error_simulated(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    monkeypatch.setattr("batch.inference.segmenter.dali_available", lambda: False)
    result = segment(photo_tree, tmp_path / "out", "--model", tiny_onnx, "--decoder", "dali")
    assert result.exit_code == 2 and "DALI is not installed" in result.output


def test_cuda_that_cannot_be_had_exits_2(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    monkeypatch.setattr("onnxruntime.get_available_providers", lambda: ["CPUExecutionProvider"])  # a CPU-only build, anywhere
    result = segment(photo_tree, tmp_path / "out", "--model", tiny_onnx, "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda:0 cannot be used" in result.output
    assert not (tmp_path / "out" / "report.json").exists()


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
def test_dali_cpu_decoder_end_to_end_agrees_with_pillow(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    add_bad_and_odd_files(photo_tree)
    assert segment(photo_tree, tmp_path / "pillow", "--model", tiny_onnx, "--device", "cpu").exit_code == 1
    assert segment(photo_tree, tmp_path / "dali", "--model", tiny_onnx, "--device", "cpu", "--decoder", "dali").exit_code == 1
    pillow, dali = report_of(tmp_path / "pillow"), report_of(tmp_path / "dali")
    assert dali["decoder"] == "dali-cpu" and dali["pillow_fallbacks"] >= 6  # PNGs and the CMYK JPEG
    assert [f["path"] for f in dali["failed"]] == [f["path"] for f in pillow["failed"]]
    for png in (tmp_path / "pillow").rglob("*.png"):
        other = tmp_path / "dali" / png.relative_to(tmp_path / "pillow")
        assert dice(read_mask(png), read_mask(other)) > 0.99, png


def test_help_works_and_segment_names_the_extra_without_onnxruntime(photo_tree: Path, tmp_path: Path):
    """As after `pip install .` (no extra): the modules are blocked, so importing them fails."""
    blocked = "import sys; sys.modules.update(onnxruntime=None, onnx=None); from batch.cli import main; main()"

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-c", blocked, *args], capture_output=True, text=True, timeout=60, check=False)

    for args in (["--help"], ["segment", "--help"], ["evaluate", "--help"]):
        result = run(*args)
        assert result.returncode == 0 and "Usage:" in result.stdout, result.stderr
    result = run("segment", str(photo_tree), str(tmp_path / "out"))
    assert result.returncode == 2 and "unet-batch segment needs the 'cpu' extra" in result.stderr
    assert "pip install '.[cpu]'" in result.stderr and "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
