"""The CPU runtime: OpenVINO beside ONNX Runtime, ``--runtime auto|onnxruntime|openvino``, and auto's cached measurement."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from batch.cli import main
from batch.core.devices import DeviceError
from batch.core.extras import MissingExtra
from batch.core.masks import read_mask
from batch.inference import runtime_choice
from batch.inference.config import SegmenterConfig
from batch.inference.model import load_model
from batch.inference.runtime_choice import OPENVINO_BF16, CpuSignature, measure_rates, probe_input
from batch.inference.segmenter import Segmenter

pytest.importorskip("openvino")


class FakeMeasurement:
    """``measure_rates`` as a table: each runtime's images per CPU-second; counts the measurements made."""

    def __init__(self, rates: dict[str, float]):
        self.rates, self.calls = rates, 0

    def __call__(self, networks: dict, x: np.ndarray, rounds: int = 3) -> dict[str, float]:
        self.calls += 1
        return {label: self.rates[label] for label in networks}


@pytest.fixture
def measured(monkeypatch):
    """Install a fake measurement with the given rates (images per CPU-second by candidate label); returns it."""

    def install(**rates: float) -> FakeMeasurement:
        fake = FakeMeasurement({label.replace("_", " "): rate for label, rate in rates.items()})
        monkeypatch.setattr(runtime_choice, "measure_rates", fake)
        return fake

    return install


@pytest.fixture
def own_cache(tmp_path: Path, monkeypatch) -> Path:
    """A cache folder of this test's own (the session's is shared by every test)."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    return tmp_path / "xdg" / "carvana-unet" / "runtimes.json"


# ---- options ---------------------------------------------------------------------------------------


def test_runtime_option_is_checked_and_openvino_on_a_gpu_is_an_error():
    assert SegmenterConfig(runtime=" OpenVINO ").runtime == "openvino"
    with pytest.raises(ValueError, match="runtime must be one of auto, onnxruntime, openvino, not 'tensorrt'"):
        SegmenterConfig(runtime="tensorrt")
    with pytest.raises(ValueError, match="runtime openvino runs on the CPU only, not on cuda:1.*--device cpu"):
        SegmenterConfig(runtime="openvino", device="cuda:1")
    assert SegmenterConfig(runtime="openvino", device="auto").device == "auto"  # auto takes the CPU


def test_load_model_refuses_openvino_on_cuda(tiny_onnx: Path):
    with pytest.raises(DeviceError, match="runtime openvino runs on the CPU only"):
        load_model(tiny_onnx, "cuda", runtime="openvino")


def test_cli_openvino_on_cuda_exits_2(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    args = ["segment", photo_tree, tmp_path / "out", "--model", tiny_onnx, "--device", "cuda", "--runtime", "openvino"]
    result = CliRunner().invoke(main, list(map(str, args)))
    assert result.exit_code == 2 and "runtime openvino runs on the CPU only" in result.output
    assert not (tmp_path / "out").exists()


# ---- OpenVINO runs the model as ONNX Runtime does -------------------------------------------------------


@pytest.mark.parametrize("layout, dtype", [("NHWC", "uint8"), ("NCHW", "float32")])
def test_openvino_scores_match_onnxruntime(make_onnx, layout: str, dtype: str, measured):
    path = make_onnx(layout=layout, dtype=dtype)
    openvino = load_model(path, "cpu", threads=1, runtime="openvino")
    onnx = load_model(path, "cpu", threads=1, runtime="onnxruntime")
    assert (openvino.provider, openvino.runtime.chosen_by) == ("OpenVINO CPU", "flag")
    assert (onnx.provider, onnx.runtime.runtime) == ("CPUExecutionProvider", "onnxruntime")
    x = probe_input(openvino.contract, batch=3)
    scores = openvino.network.run(x)
    assert scores.shape == (3, 1, 64, 96) and scores.dtype == np.float32
    np.testing.assert_allclose(scores, onnx.network.run(x), atol=1e-4)
    with pytest.raises(Exception, match="runs under openvino, which has no ONNX Runtime session"):
        openvino.session  # noqa: B018  (the IOBinding path is ONNX Runtime's)


def test_segmenter_and_report_with_openvino(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, caplog):
    with Segmenter(tiny_onnx, device="cpu", runtime="openvino") as segmenter:
        described = segmenter.describe()
        masks = segmenter([photo_tree / "a.jpg", photo_tree / "c.png"])
    with Segmenter(tiny_onnx, device="cpu", runtime="onnxruntime") as segmenter:
        reference = segmenter([photo_tree / "a.jpg", photo_tree / "c.png"])
    assert described["provider"] == "OpenVINO CPU"
    assert {key: described["runtime"][key] for key in ("name", "precision", "chosen_by")} == {
        "name": "openvino",
        "precision": "f32",
        "chosen_by": "flag",
    }
    for mask, expected in zip(masks, reference):
        assert (mask != expected).mean() < 1e-4  # f32: the same masks, a rounding at the cut aside
    args = ["segment", photo_tree, tmp_path / "out", "--model", tiny_onnx, "--device", "cpu", "--runtime", "openvino"]
    with caplog.at_level("INFO", logger="batch"):
        result = CliRunner().invoke(main, [*map(str, args), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert (report["runtime"]["name"], report["runtime"]["chosen_by"], report["provider"]) == ("openvino", "flag", "OpenVINO CPU")
    assert report["runtime"]["streams"] == described["runtime"]["streams"] >= 1  # batches at once, as OpenVINO chose
    assert "with openvino" in result.output
    assert "runtime openvino" in caplog.records[0].getMessage() and "chosen by flag" in caplog.records[0].getMessage()
    assert read_mask(tmp_path / "out" / "a.png").shape == reference[0].shape


# ---- auto: measured once per machine and model, then cached ----------------------------------------------


def test_auto_follows_the_measurement_and_caches_it(tiny_onnx: Path, own_cache: Path, measured, caplog):
    fake = measured(onnxruntime=10.0, openvino_f32=20.0)
    with caplog.at_level("INFO", logger="batch"):
        first = load_model(tiny_onnx, "cpu")
    assert (first.runtime.runtime, first.runtime.chosen_by, first.provider) == ("openvino", "measurement", "OpenVINO CPU")
    assert first.runtime.rates == {"onnxruntime": 10.0, "openvino f32": 20.0}
    assert "20.0 images per CPU-second on this CPU against onnxruntime 10.0" in first.runtime.reason
    assert any("chosen by measurement" in r.getMessage() for r in caplog.records)
    entries = json.loads(own_cache.read_text())["choices"]
    assert [(e["runtime"], e["precision"], e["model"]) for e in entries.values()] == [("openvino", "f32", "tiny.onnx")]
    second = load_model(tiny_onnx, "cpu")
    assert (second.runtime.runtime, second.runtime.chosen_by, fake.calls) == ("openvino", "cached measurement", 1)
    assert str(own_cache) in second.runtime.reason
    assert load_model(tiny_onnx, "cpu", runtime="onnxruntime").runtime.chosen_by == "flag" and fake.calls == 1


def test_auto_keeps_onnxruntime_unless_openvino_is_clearly_faster(make_onnx, own_cache: Path, measured):
    measured(onnxruntime=10.0, openvino_f32=10.3)  # 3% faster: under the margin
    model = load_model(make_onnx(), "cpu")
    assert (model.runtime.runtime, model.provider) == ("onnxruntime", "CPUExecutionProvider")
    assert "OpenVINO is taken when 5% faster" in model.runtime.reason


def test_the_cache_is_keyed_by_cpu_threads_and_model(tiny_onnx: Path, make_onnx, own_cache: Path, measured, monkeypatch):
    fake = measured(onnxruntime=10.0, openvino_f32=20.0)
    load_model(tiny_onnx, "cpu")
    load_model(tiny_onnx, "cpu", threads=1)  # another thread count
    load_model(make_onnx(size=(32, 48)), "cpu")  # another model file
    assert fake.calls == 3
    monkeypatch.setattr(runtime_choice, "cpu_signature", lambda: CpuSignature("Some CPU", ("avx2", "fma")))
    load_model(tiny_onnx, "cpu")  # another CPU
    assert fake.calls == 4
    load_model(tiny_onnx, "cpu")
    assert fake.calls == 4 and len(json.loads(own_cache.read_text())["choices"]) == 4


def test_a_broken_or_unwritable_cache_costs_a_measurement_not_the_run(
    tiny_onnx: Path, tmp_path: Path, monkeypatch, measured, caplog
):
    fake = measured(onnxruntime=20.0, openvino_f32=10.0)
    cache = tmp_path / "xdg" / "carvana-unet" / "runtimes.json"
    cache.parent.mkdir(parents=True)
    cache.write_text("{not json")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert load_model(tiny_onnx, "cpu").runtime.runtime == "onnxruntime"
    assert "ignoring the runtime cache" in caplog.text and fake.calls == 1
    assert list(json.loads(cache.read_text())["choices"].values())[0]["runtime"] == "onnxruntime"  # rewritten whole
    (tmp_path / "file").write_text("")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "file"))  # its cache folder cannot be made
    assert load_model(tiny_onnx, "cpu").runtime.chosen_by == "measurement" and fake.calls == 2
    assert "cannot use the runtime cache" in caplog.text


def test_auto_without_openvino_takes_onnxruntime_and_says_why(tiny_onnx: Path, monkeypatch, measured):
    fake = measured(onnxruntime=1.0, openvino_f32=100.0)
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino fails
    model = load_model(tiny_onnx, "cpu")
    assert (model.runtime.runtime, model.runtime.chosen_by, fake.calls) == ("onnxruntime", "installation", 0)
    assert "OpenVINO is not installed" in model.runtime.reason
    with pytest.raises(MissingExtra, match=r"--runtime openvino needs the 'cpu' extra"):
        load_model(tiny_onnx, "cpu", runtime="openvino")


def test_auto_leaves_out_a_runtime_that_cannot_compile_the_model(tiny_onnx: Path, own_cache: Path, measured, monkeypatch, caplog):
    from batch.inference.runtime import ModelError

    def refuse(*args, **kwargs):
        raise ModelError("tiny.onnx: OpenVINO cannot compile this model (no such op)")

    measured(onnxruntime=1.0, openvino_f32=100.0)
    monkeypatch.setattr(runtime_choice.openvino_runtime, "OpenVinoNetwork", refuse)
    model = load_model(tiny_onnx, "cpu")
    assert (model.runtime.runtime, model.runtime.rates) == ("onnxruntime", {"onnxruntime": 1.0})
    assert "leaving openvino f32 out: tiny.onnx: OpenVINO cannot compile" in caplog.text
    with pytest.raises(ModelError, match="cannot compile"):
        load_model(tiny_onnx, "cpu", runtime="openvino")  # asked for: an error, not a fallback


def test_bf16_is_a_candidate_only_once_verified_on_a_cpu_that_has_it(tiny_onnx: Path, own_cache: Path, measured, monkeypatch):
    fake = measured(onnxruntime=10.0, openvino_f32=20.0, openvino_bf16=40.0)
    monkeypatch.setattr(runtime_choice.openvino_runtime, "cpu_capabilities", lambda: ("FP32", "INT8", "BF16"))
    assert load_model(tiny_onnx, "cpu").runtime.precision == "f32"  # not verified: not measured
    assert not runtime_choice.record_verification(tiny_onnx, "bf16", min_dice=0.998, photos=8)
    assert load_model(tiny_onnx, "cpu").runtime.precision == "f32" and fake.calls == 1
    assert runtime_choice.record_verification(tiny_onnx, "bf16", min_dice=0.9995, photos=8)
    model = load_model(tiny_onnx, "cpu")  # measured anew: bf16 is a candidate now
    assert (model.runtime.precision, model.network.precision, fake.calls) == ("bf16", "bf16", 2)
    monkeypatch.setattr(runtime_choice.openvino_runtime, "cpu_capabilities", lambda: ("FP32", "INT8"))
    assert runtime_choice.openvino_candidates("any") == [runtime_choice.OPENVINO_F32]
    assert OPENVINO_BF16.label == "openvino bf16"


def test_the_real_measurement_times_both_runtimes(tiny_onnx: Path):
    onnx = load_model(tiny_onnx, "cpu", threads=1, runtime="onnxruntime")
    openvino = load_model(tiny_onnx, "cpu", threads=1, runtime="openvino")
    rates = measure_rates({"onnxruntime": onnx.network, "openvino f32": openvino.network}, probe_input(onnx.contract), rounds=2)
    assert set(rates) == {"onnxruntime", "openvino f32"} and all(rate > 0 for rate in rates.values())


def test_the_runtime_travels_to_the_ray_actors():
    from batch.runs.config import RunConfig
    from batch.runs.ray_engine import ActorPlan, _actor_config

    config = RunConfig("in", "out", runtime="openvino", device="cpu")
    assert _actor_config(config, ActorPlan(count=2, num_gpus=0, num_cpus=4, threads=4)).runtime == "openvino"
