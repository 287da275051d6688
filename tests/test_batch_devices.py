"""Device names (batch.core.devices), the --device option, and ONNX Runtime sessions on them (batch.inference.runtime)."""

from __future__ import annotations

from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from batch.cli.options import DEVICE
from batch.core.devices import Device, DeviceError, parse_device


@pytest.mark.parametrize(
    ("name", "kind", "index", "canonical"),
    [
        ("auto", "auto", 0, "auto"),
        ("cpu", "cpu", 0, "cpu"),
        ("cuda", "cuda", 0, "cuda:0"),
        ("cuda:3", "cuda", 3, "cuda:3"),
        ("CUDA:1", "cuda", 1, "cuda:1"),
        (" Cpu ", "cpu", 0, "cpu"),
        ("AUTO", "auto", 0, "auto"),
    ],
)
def test_device_names_in_any_case(name, kind, index, canonical):
    device = parse_device(name)
    assert (device.kind, device.index, str(device)) == (kind, index, canonical)
    assert parse_device(device) is device and parse_device(str(device)) == device


@pytest.mark.parametrize("bad", ["gpu", "cpu:1", "auto:0", "cuda:x", "cuda:-1", "", "cuda 1"])
def test_bad_device_names(bad):
    with pytest.raises(DeviceError, match="is not one of auto, cpu, cuda, cuda:N"):
        parse_device(bad)


def test_device_checks_its_fields():
    with pytest.raises(DeviceError):
        Device("gpu")
    with pytest.raises(DeviceError):
        Device("cpu", 1)


def device_command():
    @click.command()
    @click.option("--device", type=DEVICE, default="auto")
    def command(device):
        click.echo(device)

    return command


def test_device_option_accepts_upper_case_and_shows_lower_case():
    runner = CliRunner()
    assert runner.invoke(device_command(), ["--device", "CUDA:1"]).output == "cuda:1\n"
    assert runner.invoke(device_command(), ["--device", "Cpu"]).output == "cpu\n"
    help_text = runner.invoke(device_command(), ["--help"]).output
    assert "--device auto|cpu|cuda[:N]" in help_text
    bad = runner.invoke(device_command(), ["--device", "gpu"])
    assert bad.exit_code == 2 and "'gpu' is not a device: use auto, cpu, cuda or cuda:N" in bad.output


# ---- ONNX Runtime sessions ------------------------------------------------------------------------

ort = pytest.importorskip("onnxruntime")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()


def test_providers_for_each_device():
    from batch.inference.runtime import providers_for

    assert providers_for(parse_device("cpu")) == ["CPUExecutionProvider"]
    assert providers_for(parse_device("cuda:2")) == [("CUDAExecutionProvider", {"device_id": 2}), "CPUExecutionProvider"]
    tuned = providers_for(parse_device("auto"), cuda_options={"use_tf32": 1})
    assert tuned[0] == ("CUDAExecutionProvider", {"device_id": 0, "use_tf32": 1})
    with_trt = providers_for(parse_device("cuda:1"), tensorrt_options={"trt_fp16_enable": 1})
    assert [p[0] if isinstance(p, tuple) else p for p in with_trt] == [
        "TensorrtExecutionProvider",
        "CUDAExecutionProvider",
        "CPUExecutionProvider",
    ]
    assert with_trt[0][1] == {"device_id": 1, "trt_fp16_enable": 1}


def test_cpu_session_from_a_file_or_bytes(tiny_onnx: Path):
    from batch.inference.runtime import open_session, session_options

    session = open_session(tiny_onnx, "CPU", session_options(threads=1))
    assert session.get_providers() == ["CPUExecutionProvider"]
    assert open_session(tiny_onnx.read_bytes(), "cpu").get_providers() == ["CPUExecutionProvider"]


def test_unloadable_model_is_a_model_error(tmp_path: Path):
    from batch.inference.runtime import ModelError, open_session

    (tmp_path / "junk.onnx").write_bytes(b"not a model" * 10)
    with pytest.raises(ModelError, match=r"junk.onnx: ONNX Runtime cannot load this model .* `unet-export to-onnx`"):
        open_session(tmp_path / "junk.onnx", "cpu")


@pytest.mark.skipif(HAS_CUDA_EP, reason="this onnxruntime has CUDA")
def test_explicit_cuda_without_the_provider_is_an_error_and_auto_says_what_it_chose(tiny_onnx: Path, caplog):
    from batch.inference.runtime import open_session

    with pytest.raises(DeviceError, match=r"--device cuda:1 cannot be used: .*no CUDA provider.*'\.\[gpu\]'.*--device cpu"):
        open_session(tiny_onnx, "cuda:1")
    with pytest.raises(DeviceError, match=r"--device cuda:0 cannot be used: .*no TensorRT provider"):
        open_session(tiny_onnx, "cuda", tensorrt_options={})
    caplog.set_level("INFO", logger="batch.inference.runtime")
    assert open_session(tiny_onnx, "auto").get_providers() == ["CPUExecutionProvider"]
    assert "device auto: running on the CPU (this onnxruntime" in caplog.text
