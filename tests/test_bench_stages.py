"""unet-bench stages on tiny inputs: decode, models, inference sweep, end to end, naive baselines."""

from __future__ import annotations

import json
import sys
import textwrap
from pathlib import Path

import numpy as np
import onnx
import pytest
from PIL import Image

from batch.core.contract import ModelContract
from batch.core.devices import parse_device
from batch.core.images import load_resized_rgb
from benchmarks import end_to_end, inference, models
from benchmarks.config import SUITES, BenchError, SweepConfig
from benchmarks.decode import bench_decoders, load_resized_rgb_no_draft, source_megapixels
from benchmarks.end_to_end import EndToEndConfig, read_report, run_end_to_end, steady_rate
from benchmarks.flops import unet_gflops
from benchmarks.inference import CUDA, Backend, backends_for, fastest, model_input, provider_missing, sweep_batches
from benchmarks.machine import Hardware
from benchmarks.models import BenchModel, ModelError, random_model, read_model
from benchmarks.peers import run_baseline
from benchmarks.suite import list_photos, ratios
from benchmarks.timing import summarize

SIZE = (32, 48)
CPU = Hardware(parse_device("cpu"), threads=2)


def unet_contract(width: int, precision: str | None = "fp32") -> ModelContract:
    """The contract of an exported width-``width`` U-Net at SIZE: its model_config in the provenance."""
    config = json.dumps({"width": width, "depth": 4})
    return ModelContract(*SIZE, precision=precision, provenance={"model_config": config})


def photo_paths(folder: Path) -> list[Path]:
    return sorted(folder.glob("*.jpg"))


def decoded_photos(folder: Path) -> np.ndarray:
    return np.stack([load_resized_rgb(p, SIZE).pixels for p in photo_paths(folder)])  # (N, 32, 48, 3) uint8


# ---- decode -----------------------------------------------------------------------------------------


@pytest.mark.dali
def test_decoders_report_rates_and_skip_the_gpu_decoder_on_cpu(bench_photos):
    results, decoded = bench_decoders(photo_paths(bench_photos)[:4], SIZE, SUITES["smoke"]["cpu"], CPU)  # 2 repeats, DALI batch 2
    by_name = {r.decoder: r for r in results}
    assert decoded.shape == (4, 32, 48, 3) and decoded.dtype == np.uint8
    for name in ("pillow", "pillow-no-draft", "dali-cpu"):
        assert by_name[name].status == "ok", by_name[name].reason
        assert by_name[name].images == 4 and by_name[name].images_per_second.n == 2
        assert by_name[name].megapixels_per_second.median == pytest.approx(by_name[name].images_per_second.median * 96 * 64 / 1e6)
    assert by_name["dali-mixed"].status == "skipped" and "--device cuda" in by_name["dali-mixed"].reason


def test_full_decode_matches_draft_decode_where_draft_does_not_apply(tmp_path):
    png = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 96, 3), dtype=np.uint8)).save(png)
    np.testing.assert_array_equal(load_resized_rgb_no_draft(png, SIZE), load_resized_rgb(png, SIZE).pixels)


def test_source_megapixels_of_real_photos(carvana_dir):
    photos = list_photos(carvana_dir / "train", 3)
    assert len(photos) == 3 and photos == sorted(photos)
    assert source_megapixels(photos) == pytest.approx(1918 * 1280 / 1e6)


def test_list_photos_takes_the_first_in_name_order_and_rejects_an_empty_folder(tmp_path, bench_photos):
    assert list_photos(bench_photos, 2) == photo_paths(bench_photos)[:2]
    with pytest.raises(BenchError, match="holds no .jpg"):
        list_photos(tmp_path, 2)


# ---- models -----------------------------------------------------------------------------------------


def test_random_model_carries_the_contract_and_its_architecture(bench_model):
    assert bench_model.name == "unet-w4" and bench_model.width == 4 and bench_model.precision == "fp32"
    assert bench_model.contract.input_size == SIZE and bench_model.random_weights and bench_model.seed == 0
    assert bench_model.gflops(SIZE) == pytest.approx(unet_gflops({"width": 4, "depth": 4}, SIZE))


def test_random_model_is_taken_from_the_cache_without_exporting(bench_model, bench_cache, tmp_path, monkeypatch):
    def no_export(*args, **kwargs):
        raise AssertionError("exported although the cache holds this model")

    monkeypatch.setattr(models, "export_random", no_export)
    again = random_model(4, 4, SIZE, fp16=False, seed=0, folder=tmp_path, cache_dir=bench_cache)
    assert again.path.read_bytes() == bench_model.path.read_bytes()


def test_read_model_names_the_file_and_the_fix(tmp_path):
    junk = tmp_path / "junk.onnx"
    junk.write_bytes(b"not a model")
    with pytest.raises(ModelError, match="junk.onnx is not a readable ONNX model"):
        read_model(junk)
    bare = tmp_path / "bare.onnx"
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])],
    )
    onnx.save(onnx.helper.make_model(graph), bare)
    with pytest.raises(ModelError, match="bare.onnx has no 'input_height'.*unet-export"):
        read_model(bare)
    with pytest.raises(ModelError, match="does not exist"):
        read_model(tmp_path / "missing.onnx")


# ---- inference --------------------------------------------------------------------------------------


def test_cpu_sweep_measures_each_batch_with_flops(bench_model, bench_photos):
    backend = backends_for(CPU)[0]
    sweep = sweep_batches(bench_model, backend, decoded_photos(bench_photos), SweepConfig((1, 2), warmup=1, repeats=2))
    assert [(r.batch_size, r.status) for r in sweep] == [(1, "ok"), (2, "ok")]
    row = sweep[1]
    assert row.images_per_second.n == 2 and row.gflop_per_image == pytest.approx(bench_model.gflops(SIZE))
    assert row.achieved_tflops == pytest.approx(row.gflop_per_image * row.images_per_second.median / 1e3)
    assert row.peak_tflops is None and row.fraction_of_peak is None  # no datasheet peak for CPUs
    assert fastest(sweep) in sweep


def test_openvino_sweeps_beside_onnxruntime_on_the_cpu(bench_model, bench_photos):
    openvino = [backend for backend in backends_for(CPU) if backend.name == "openvino"]
    assert [(b.label, b.runtime, b.on_gpu) for b in openvino] == [
        ("OpenVINO CPU FP32", "openvino", False),
        ("OpenVINO CPU INT8", "openvino", False),
    ]
    sweep = sweep_batches(bench_model, openvino[0], decoded_photos(bench_photos), SweepConfig((1, 2), warmup=1, repeats=2))
    assert [(r.batch_size, r.status, r.backend) for r in sweep] == [(1, "ok", "openvino"), (2, "ok", "openvino")]


def test_host_cost_times_each_stage_of_a_photo_on_one_core(bench_photos):
    from benchmarks.host import GPU_HOST_CORES, car_scores, measure_host_cost

    result = measure_host_cost(photo_paths(bench_photos)[:3], SIZE)
    assert result.status == "ok" and result.photos == 3, result.reason
    assert set(result.ms_per_photo) == {"read", "decode", "upsample", "encode", "write", "encode png1"}
    stages = sum(result.ms_per_photo[s] for s in ("read", "decode", "upsample", "encode", "write"))
    assert result.total_ms == pytest.approx(stages, abs=0.01)  # each figure rounded to a microsecond
    assert result.gpu_host_photos_per_second == pytest.approx(GPU_HOST_CORES * 1000 / result.total_ms, rel=1e-3)
    assert 0.2 < (car_scores(SIZE) > 0).mean() < 0.6  # a car-sized blob
    failed = measure_host_cost([bench_photos / "missing.jpg"], SIZE)
    assert failed.status == "failed" and "missing.jpg" in failed.reason


def test_sweep_stops_before_a_batch_over_the_time_budget(bench_model, bench_photos):
    budget = SweepConfig((1, 2, 4), warmup=0, repeats=1, max_batch_seconds=1e-9)
    sweep = sweep_batches(bench_model, backends_for(CPU)[0], decoded_photos(bench_photos), budget)
    assert [(r.batch_size, r.status) for r in sweep] == [(1, "ok"), (2, "skipped")]
    assert "budget" in sweep[1].reason


def test_out_of_memory_is_retried_at_half_the_batch(bench_model, monkeypatch):
    """The GPU path's OOM handling, driven by a stand-in session (no GPU needed)."""
    gpu = Backend("cuda", CUDA, "fp16", 0, "fp16", "NVIDIA H200")
    monkeypatch.setattr(inference, "provider_missing", lambda backend: None)
    monkeypatch.setattr(inference, "make_session", lambda *args, **kwargs: object())
    measured = []

    def fake_measure(session, trial, batch, sweep):
        if batch > 8:
            raise RuntimeError("CUDA failure 2: out of memory ; GPU=0")
        measured.append(batch)
        return trial.row(batch, "ok", seconds_per_batch=summarize([0.01 * batch]), images_per_second=summarize([100.0]))

    monkeypatch.setattr(inference, "measure_batch", fake_measure)
    sweep = sweep_batches(bench_model, gpu, np.zeros((1, *SIZE, 3), np.uint8), SweepConfig((4, 16, 32), warmup=0, repeats=1))
    assert [(r.batch_size, r.status) for r in sweep] == [(4, "ok"), (16, "oom"), (8, "ok")]
    assert measured == [4, 8] and "out of memory" in sweep[1].reason


@pytest.mark.skipif(CUDA in __import__("onnxruntime").get_available_providers(), reason="this onnxruntime has CUDA")
def test_gpu_backends_without_cuda_are_skipped_with_the_fix(bench_model, bench_photos):
    backend = backends_for(Hardware(parse_device("cuda:0")))[0]
    assert "onnxruntime-gpu" in provider_missing(backend)
    sweep = sweep_batches(bench_model, backend, decoded_photos(bench_photos), SweepConfig((1,), warmup=0, repeats=1))
    assert sweep[0].status == "skipped" and "onnxruntime-gpu" in sweep[0].reason


def test_model_input_follows_the_contract(bench_model):
    photos = np.arange(2 * 32 * 48 * 3, dtype=np.uint8).reshape(2, 32, 48, 3)
    nhwc = model_input(photos, bench_model, 3)  # repeats photos to fill the batch
    assert nhwc.shape == (3, 32, 48, 3) and nhwc.dtype == np.uint8
    np.testing.assert_array_equal(nhwc[2], photos[0])
    contract = ModelContract(32, 48, input_layout="NCHW", input_dtype="float32", pixel_mean=(0.5,) * 3, pixel_std=(0.5,) * 3)
    nchw = model_input(photos, BenchModel("m", Path("m.onnx"), contract, random_weights=True), 1)
    assert nchw.shape == (1, 3, 32, 48) and nchw.dtype == np.float32
    assert nchw[0, :, 0, 0] == pytest.approx((photos[0, 0, 0] / 255 - 0.5) / 0.5)


# ---- end to end -------------------------------------------------------------------------------------


FAKE_RUNNER = textwrap.dedent("""
    import json, sys
    args = sys.argv[1:]
    limit = int(args[args.index("--limit") + 1])
    report = {"processed": limit, "skipped": 0, "failed": [], "seconds": 3.0, "images_per_second": limit / 3.0,
              "stages": {"discover": 0.5, "setup": 0.5, "decode": 1.0, "infer": 1.5}, "device": "cpu", "decoder": "pillow"}
    open(args[args.index("--report") + 1], "w").write(json.dumps(report))
""")


def test_end_to_end_reads_the_runner_report_and_leaves_set_up_out(bench_model, bench_photos, tmp_path, monkeypatch):
    runner = tmp_path / "fake_unet_batch.py"
    runner.write_text(FAKE_RUNNER)
    monkeypatch.setattr(end_to_end, "batch_command", lambda: [sys.executable, str(runner)])
    result = run_end_to_end(bench_photos, bench_model, CPU, EndToEndConfig(batch_size=2, images=4, repeats=2))
    assert result.status == "ok", result.reason
    assert result.images_per_second.median == pytest.approx(4 / 2.0)  # 4 photos in 3 s less 1 s of set-up
    assert result.runner_images_per_second.median == pytest.approx(4 / 3.0)
    assert result.setup_seconds.median == pytest.approx(1.0)
    assert result.stage_ms_per_image["infer"] == pytest.approx(1.5e3 / 4)
    assert result.peak_rss_mib > 0 and result.repeats == 2
    assert result.command[2:4] == ["segment", str(bench_photos)] and "--limit" in result.command
    assert "--runtime" not in result.command  # the runner's default
    openvino = run_end_to_end(
        bench_photos, bench_model, CPU, EndToEndConfig(batch_size=2, images=4, repeats=1, runtime="openvino")
    )
    assert openvino.command[openvino.command.index("--runtime") + 1] == "openvino"


def test_end_to_end_failure_keeps_the_runner_message(bench_model, bench_photos, tmp_path, monkeypatch):
    runner = tmp_path / "failing.py"
    runner.write_text("import sys; sys.stderr.write('model.onnx: no CUDA here\\n'); sys.exit(2)")
    monkeypatch.setattr(end_to_end, "batch_command", lambda: [sys.executable, str(runner)])
    result = run_end_to_end(bench_photos, bench_model, CPU, EndToEndConfig(batch_size=2, images=2, repeats=1))
    assert result.status == "failed" and "exited with 2" in result.reason and "no CUDA here" in result.reason


def test_read_report_rejects_an_incomplete_report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text(json.dumps({"processed": 3}))
    with pytest.raises(BenchError, match="lacks seconds, images_per_second, stages"):
        read_report(path)
    path.write_text("{")
    with pytest.raises(BenchError, match="no readable report"):
        read_report(path)


def test_steady_rate_refuses_a_report_that_is_all_set_up():
    with pytest.raises(BenchError):
        steady_rate({"processed": 2, "seconds": 1.0, "stages": {"setup": 1.0}})


def test_real_unet_batch_runs_end_to_end(bench_model, bench_photos):
    result = run_end_to_end(bench_photos, bench_model, CPU, EndToEndConfig(batch_size=2, images=3, repeats=1))
    assert result.status == "ok", result.reason
    assert result.images == 3 and result.report["processed"] == 3 and result.device == "cpu"
    assert "infer" in result.stage_ms_per_image and "setup" in result.report["stages"]


# ---- baselines and ratios ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["torch-eager", "onnxruntime"])
def test_naive_baselines_time_every_photo_but_the_warm_up(name, bench_model, bench_photos):
    result = run_baseline(name, photo_paths(bench_photos)[:3], bench_model, CPU)
    assert result.status == "ok", result.reason
    assert result.images == 2 and result.images_per_second.n == 2 and result.device == "cpu"


def test_a_baseline_needs_two_photos(bench_model, bench_photos):
    result = run_baseline("onnxruntime", photo_paths(bench_photos)[:1], bench_model, CPU)
    assert result.status == "skipped"


def test_ratios_divide_end_to_end_by_baselines_and_inference():
    from benchmarks.end_to_end import EndToEndResult
    from benchmarks.inference import InferenceResult
    from benchmarks.peers import BaselineResult

    e2e = EndToEndResult(status="ok", images_per_second=summarize([30.0]))
    baselines = [
        BaselineResult("torch-eager", "t", "ok", images_per_second=summarize([3.0])),
        BaselineResult("onnxruntime", "o", "skipped", reason="no"),
    ]
    reference = InferenceResult("cpu", "ORT CPU FP32", "fp32", "unet-w16", 16, 4, SIZE, "ok", images_per_second=summarize([40.0]))
    out = ratios(e2e, baselines, reference)
    assert out["end_to_end_over_baseline"] == {"torch-eager": pytest.approx(10.0)}
    assert out["end_to_end_over_inference"] == pytest.approx(0.75)
    assert out["inference_reference"]["batch_size"] == 4
    assert ratios(EndToEndResult(status="failed"), baselines, reference)["end_to_end_over_inference"] is None


# ---- the sweep's plan, and a user's checkpoint ------------------------------------------------------


class PlannedModels:
    """Stands in for suite.Models: names what would be exported, exports nothing."""

    def __init__(self, user_precision: str | None = None):
        self.user_precision = user_precision

    def random(self, width, precision):
        return BenchModel(f"unet-w{width}", Path(f"w{width}-{precision}.onnx"), unet_contract(width, precision), True)

    def user(self, precision):
        return BenchModel("mine", Path("mine.onnx"), unet_contract(8, self.user_precision), False)


def planned(config, kind, models):
    from benchmarks.suite import sweep_plan

    hardware = Hardware(parse_device("cpu" if kind == "cpu" else "cuda:0"))
    return [(m.name, b.name, b.precision, m.precision) for m, b in sweep_plan(config, config.preset(kind), hardware, models)]


def test_sweep_plan_runs_every_width_and_the_end_to_end_model():
    from benchmarks.config import RunConfig

    cpu = planned(RunConfig(suite="quick", width=8), "cpu", PlannedModels())
    assert cpu == [
        (f"unet-w{w}", runtime, precision, precision)
        for runtime in ("cpu", "openvino")  # ONNX Runtime and OpenVINO side by side
        for precision in ("fp32", "int8")
        for w in (8, 16, 32, 64)
    ]
    gpu = planned(RunConfig(suite="quick"), "cuda", PlannedModels())
    assert [row for row in gpu if row[1] == "cuda"] == [
        *[(f"unet-w{w}", "cuda", "fp16", "fp16") for w in (16, 32, 64)],
        *[(f"unet-w{w}", "cuda", "fp32", "fp32") for w in (16, 32, 64)],
    ]
    assert [row for row in gpu if row[1] == "tensorrt"] == [("unet-w16", "tensorrt", "fp16", "fp32")]  # quick: e2e model only
    full = planned(RunConfig(suite="full"), "cuda", PlannedModels())
    assert len([row for row in full if row[1] == "tensorrt"]) == 3


def test_sweep_plan_runs_a_users_fp16_model_on_the_cpu_labelled_fp16(tmp_path):
    from benchmarks.config import RunConfig

    plan = planned(RunConfig(suite="quick", model=tmp_path / "mine.onnx"), "cpu", PlannedModels("fp16"))
    assert [row for row in plan if row[0] == "mine"] == [("mine", "cpu", "fp16", "fp16"), ("mine", "openvino", "fp16", "fp16")]
    for runtime in ("cpu", "openvino"):
        ran = [row for row in plan if row[1] == runtime]
        assert [row[0] for row in ran if row[2] == "fp32"] == ["unet-w16", "unet-w32", "unet-w64"]
        assert [row[0] for row in ran if row[2] == "int8"] == ["unet-w16", "unet-w32", "unet-w64"]  # FP16 is not quantized


@pytest.mark.slow
def test_a_unet_train_checkpoint_is_exported_for_the_benchmark(tiny_checkpoint, tmp_path):
    from benchmarks.models import user_model

    model = user_model(tiny_checkpoint, fp16=False, input_size=(64, 96), folder=tmp_path)
    assert model.precision == "fp32" and model.contract.input_size == (64, 96)
    assert model.model_config["width"] == 4 and not model.random_weights
    assert "source_checkpoint_sha256" in model.contract.provenance


def test_bound_runner_feeds_the_same_batch_as_a_plain_run(bench_model):
    """The GPU path's I/O binding, exercised with CPU buffers (the same code, device_type "cpu")."""
    import onnxruntime as ort

    from benchmarks.inference import bound_runner

    session = ort.InferenceSession(str(bench_model.path), providers=["CPUExecutionProvider"])
    batch = model_input(np.random.default_rng(0).integers(0, 255, (2, 32, 48, 3), dtype=np.uint8), bench_model, 2)
    run = bound_runner(session, batch, "cpu", 0)
    run()
    (bound,) = run.binding.copy_outputs_to_cpu()
    (plain,) = session.run(None, {"image": batch})
    assert bound.shape == (2, 1, 32, 48)
    np.testing.assert_allclose(bound, plain, rtol=1e-5, atol=1e-5)
