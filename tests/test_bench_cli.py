"""`unet-bench run` and `unet-bench compare` through click: the CI smoke test of the whole suite."""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from benchmarks import suite
from benchmarks.cli import main
from benchmarks.inference import CUDA
from benchmarks.report import compare_rows, draw_results, render_markdown

SMOKE = ["--suite", "smoke", "--device", "cpu", "--size", "32x48", "--width", "4", "--widths", "4", "--no-progress"]


@pytest.fixture(scope="module")
def smoke_run(bench_model, bench_cache, tmp_path_factory) -> tuple[Path, object]:
    """One smoke run on synthetic photos (no --images); the model comes from bench_cache."""
    out = tmp_path_factory.mktemp("bench-run") / "R"
    result = CliRunner().invoke(main, ["run", *SMOKE, "--out", str(out), "--cache-dir", str(bench_cache)])
    return out, result


def test_run_writes_three_well_formed_files(smoke_run):
    out, result = smoke_run
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert results["schema"] == "unet-bench/1" and results["suite"] == "smoke" and results["device"] == "cpu"
    assert results["settings"]["photos"]["kind"] == "synthetic" and results["settings"]["input_size"] == [32, 48]
    assert any("synthetic" in note for note in results["notes"])
    assert {r["decoder"] for r in results["decode"]} == {"pillow", "pillow-no-draft", "dali-cpu", "dali-mixed"}
    assert all(r["status"] == "ok" for r in results["inference"])
    assert {(r["model"], r["batch_size"]) for r in results["inference"]} == {("unet-w4", 1), ("unet-w4", 2)}
    e2e = results["end_to_end"]
    assert e2e["status"] == "ok", e2e["reason"]
    assert e2e["images"] == 2 and e2e["report"]["processed"] == 2 and e2e["peak_rss_mib"] > 0
    assert {r["baseline"]: r["status"] for r in results["baselines"]} == {"torch-eager": "ok", "onnxruntime": "ok"}
    assert set(results["ratios"]["end_to_end_over_baseline"]) == {"torch-eager", "onnxruntime"}
    assert results["ratios"]["end_to_end_over_inference"] > 0
    assert {r["precision"] for r in results["inference"]} == {"fp32", "int8"}  # INT8 beside FP32 on the CPU
    assert results["end_to_end_int8"]["status"] == "ok" and results["end_to_end_int8"]["precision"] == "int8"
    assert results["ratios_int8"]["end_to_end_over_fp32"] > 0 and results["ratios_int8"]["inference_over_fp32"] > 0
    assert {r["backend"] for r in results["inference"]} == {"cpu", "openvino"}  # both CPU runtimes, side by side
    assert (results["end_to_end"]["runtime"], results["end_to_end_openvino"]["runtime"]) == ("onnxruntime", "openvino")
    assert results["end_to_end_int8_openvino"]["status"] == "ok" and results["ratios_int8_openvino"]["end_to_end_over_fp32"] > 0
    assert (
        results["ratios_openvino"]["end_to_end_over_onnxruntime"] > 0
        and results["ratios_openvino"]["end_to_end_over_inference"] > 0
    )
    host = results["host_cost"]
    assert host["status"] == "ok" and host["total_ms"] > 0 and host["gpu_host_photos_per_second"] > 0
    assert set(host["ms_per_photo"]) == {"read", "decode", "upsample", "encode", "write", "encode png1"}
    assert results["memory"]["benchmark_peak_rss_mib"] > 0
    machine = results["machine"]
    assert isinstance(machine["cpu"]["flags"], list) and machine["packages"]["openvino"]
    assert machine["cpu"]["usable_cores"] >= 1 and machine["packages"]["onnxruntime"] and "commit" in machine["git"]

    markdown = (out / "results.md").read_text()
    for heading in (
        "## Summary",
        "## Inference sweep",
        "## End-to-end stages",
        "## Host cost per photo",
        "## Memory",
        "## Machine",
    ):
        assert heading in markdown
    assert "OpenVINO / ONNX Runtime, end to end" in markdown and "unet-batch segment, unet-w4 FP32, openvino" in markdown
    assert "CPU flags" in markdown and "photos/s" in markdown
    assert "end to end / naive torch eager" in markdown and "end to end / inference alone" in markdown
    assert "INT8 / FP32, end to end" in markdown and "unet-batch segment, unet-w4 INT8" in markdown
    with Image.open(out / "results.png") as png:
        assert png.format == "PNG" and png.width > 1000 and png.height > 400
    assert "end to end / naive" in result.output
    assert "smoke run" in result.output  # its figures mean nothing


def test_run_output_has_no_developer_hint(smoke_run, tmp_path, monkeypatch):
    """Issue 22: the bench ended with "cp R/results.json benchmarks/results/...", a note for the project's developers."""
    out, _ = smoke_run
    quick = json.loads((out / "results.json").read_text()) | {"suite": "quick"}  # a run worth keeping, as it was told
    monkeypatch.setattr(suite, "run_suite", lambda config, **kwargs: quick)
    monkeypatch.setattr(
        suite, "write_outputs", lambda results, out_dir: {k: out_dir / f"results.{k}" for k in ("json", "md", "png")}
    )
    result = CliRunner().invoke(main, ["run", "--device", "cpu", "--out", str(tmp_path / "R")])
    assert result.exit_code == 0, result.output
    assert "wrote" in result.output and "cp " not in result.output and "benchmarks/results" not in result.output


def test_run_help_explains_every_suite():
    """Issue 22: `--suite classic` was unexplained in `unet-bench run --help`."""
    help_text = " ".join(CliRunner().invoke(main, ["run", "--help"]).output.split())
    for suite_name in ("quick:", "full:", "smoke:"):
        assert suite_name in help_text
    assert "classic: the classic width-64 U-Net alone at large input sizes (use with --size 640x960 --width 64)" in help_text


@pytest.mark.parametrize(("module", "extra"), [("matplotlib", "bench"), ("torch", "train")])
def test_run_without_an_extra_names_it_before_measuring(tmp_path, monkeypatch, module, extra):
    monkeypatch.setitem(sys.modules, module, None)  # importing it now fails, as without its extra
    result = CliRunner().invoke(main, ["run", *SMOKE, "--out", str(tmp_path / "R")])
    assert result.exit_code == 2, result.output
    assert f"needs the '{extra}' extra" in result.output and f"pip install '.[{extra}]'" in result.output
    assert not (tmp_path / "R").exists()


def test_run_refuses_to_overwrite_results(smoke_run):
    out, _ = smoke_run
    result = CliRunner().invoke(main, ["run", *SMOKE, "--out", str(out)])
    assert result.exit_code == 2 and "results.json exists" in result.output and "--overwrite" in result.output


def test_compare_prints_both_runs_with_ratios(smoke_run, tmp_path):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    faster = copy.deepcopy(results)
    faster["end_to_end"]["images_per_second"]["median"] *= 2
    faster["machine"]["gpus"] = [{"index": 0, "name": "NVIDIA H200", "driver": "x", "cuda_driver_api": "y", "memory_mib": 1}]
    faster["device"] = "cuda:0"
    b = tmp_path / "b.json"
    b.write_text(json.dumps(faster))
    result = CliRunner().invoke(main, ["compare", str(out / "results.json"), str(b)])
    assert result.exit_code == 0, result.output
    assert "NVIDIA H200" in result.output and "| B / A |" in result.output
    e2e_row = next(line for line in result.output.splitlines() if line.startswith("| end to end (unet-w4)"))
    assert e2e_row.rstrip(" |").endswith("2.00x")


def test_compare_takes_run_folders(smoke_run, tmp_path):
    out, _ = smoke_run
    result = CliRunner().invoke(main, ["compare", str(out), str(out / "results.json")])
    assert result.exit_code == 0, result.output
    assert "| B / A |" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    result = CliRunner().invoke(main, ["compare", str(out), str(empty)])
    assert result.exit_code == 2 and "empty holds no results.json" in result.output


def test_compare_rows_keep_metrics_only_one_side_has(smoke_run):
    out, _ = smoke_run
    a = json.loads((out / "results.json").read_text())
    b = copy.deepcopy(a)
    b["decode"] = [r for r in b["decode"] if r["decoder"] != "pillow"]
    rows = {row[0]: row for row in compare_rows(a, b)}
    assert rows["decode Pillow + draft mode"][3] == "—" and rows["decode Pillow + draft mode"][4] == "—"


def test_compare_names_a_file_that_is_not_results(tmp_path, smoke_run):
    out, _ = smoke_run
    bad = tmp_path / "notes.json"
    bad.write_text(json.dumps({"hello": 1}))
    result = CliRunner().invoke(main, ["compare", str(out / "results.json"), str(bad)])
    assert result.exit_code == 2 and "notes.json is not a unet-bench results file" in result.output
    bad.write_text("{oops")
    result = CliRunner().invoke(main, ["compare", str(bad), str(out / "results.json")])
    assert result.exit_code == 2 and "notes.json is not JSON" in result.output


def test_report_and_plot_survive_a_failed_end_to_end(smoke_run, tmp_path):
    out, _ = smoke_run
    results = json.loads((out / "results.json").read_text())
    results["end_to_end"] = {"status": "failed", "reason": "unet-batch exited with 2: boom", "model": "unet-w4"}
    results["ratios"] = {"end_to_end_over_baseline": {}, "end_to_end_over_inference": None, "inference_reference": None}
    markdown = render_markdown(results)
    assert "failed: unet-batch exited with 2: boom" in markdown and "no ratios" in markdown
    figure = draw_results(results)
    assert figure.get_size_inches()[0] * figure.dpi > 1000
    figure.savefig(tmp_path / "failed.png")
    with Image.open(tmp_path / "failed.png") as png:
        assert png.format == "PNG"


@pytest.mark.parametrize(
    "args, message",
    [
        (["--widths", "16,x"], "comma-separated"),
        (["--suite", "huge"], "huge"),
        (["--device", "gpu"], "not a device"),
    ],
)
def test_run_rejects_bad_options(args, message, tmp_path):
    result = CliRunner().invoke(main, ["run", "--out", str(tmp_path / "R"), *args])
    assert result.exit_code == 2 and message in result.output


def test_run_rejects_a_model_without_the_contract(tmp_path):
    model = tmp_path / "other.onnx"
    model.write_bytes(b"\x08\x07")
    result = CliRunner().invoke(
        main, ["run", "--suite", "smoke", "--device", "cpu", "--model", str(model), "--out", str(tmp_path / "R")]
    )
    assert result.exit_code == 2 and "other.onnx has no 'input_height'" in result.output


@pytest.mark.skipif(CUDA in __import__("onnxruntime").get_available_providers(), reason="this onnxruntime has CUDA")
def test_run_on_cuda_without_a_gpu_build_is_an_error(tmp_path):
    result = CliRunner().invoke(main, ["run", "--suite", "smoke", "--device", "cuda", "--out", str(tmp_path / "R")])
    assert result.exit_code == 2 and "onnxruntime-gpu" in result.output
    assert not (tmp_path / "R" / "results.json").exists()


@pytest.mark.gpu
@pytest.mark.dali  # it measures DALI's mixed decoder: not in the acceptance run's phase A, which has no DALI
def test_smoke_run_on_the_gpu_measures_every_gpu_stage(bench_cache, bench_photos, tmp_path):
    """On a CUDA machine: CUDA FP16/FP32 inference, DALI mixed decode and a GPU end-to-end run all succeed."""
    if CUDA not in __import__("onnxruntime").get_available_providers():
        pytest.skip("needs onnxruntime-gpu and a CUDA GPU")
    out = tmp_path / "R"
    result = CliRunner().invoke(
        main,
        [
            "run",
            "--suite",
            "smoke",
            "--device",
            "cuda",
            "--size",
            "32x48",
            "--width",
            "4",
            "--widths",
            "4",
            "--images",
            str(bench_photos),
            "--out",
            str(out),
            "--cache-dir",
            str(bench_cache),
            "--no-progress",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    statuses = {(r["backend"], r["precision"]): r["status"] for r in results["inference"]}
    assert statuses[("cuda", "fp16")] == "ok" and statuses[("cuda", "fp32")] == "ok"
    assert next(r for r in results["decode"] if r["decoder"] == "dali-mixed")["status"] == "ok"
    assert results["end_to_end"]["status"] == "ok" and results["end_to_end"]["device"].startswith("cuda")
    assert results["memory"]["inference_gpu_peak_mib"] > 0
