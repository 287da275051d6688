"""``unet-export to-onnx``: the command, its output, exit codes and what it leaves on disk."""

from __future__ import annotations

from pathlib import Path

import onnx
import pytest
import torch
from click.testing import CliRunner

import export.onnx_export
from batch.core.contract import ModelContract
from export.cli import main
from unet.model import UNet, UNetConfig


def invoke(*args: str):
    return CliRunner().invoke(main, ["to-onnx", *map(str, args)])


def contract_of(path: Path) -> ModelContract:
    return ModelContract.from_metadata({p.key: p.value for p in onnx.load(str(path)).metadata_props}, source=path.name)


def onnx_files(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if ".onnx" in p.name)


def test_export_and_verify_writes_a_verified_fp16_model(sharp_checkpoint, parity_photos, tmp_path):
    out = tmp_path / "m.onnx"
    result = invoke(
        sharp_checkpoint, "-o", out, "--verify", parity_photos, "--verify-limit", 3, "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 0, result.output
    assert "3/3 photos pass" in result.output and "-> PASS" in result.output
    assert f"wrote {out}: fp16" in result.output and "input uint8 NHWC 64x96 (any multiple of 4), opset 18" in result.output
    assert contract_of(out).precision == "fp16"
    assert onnx_files(tmp_path) == ["m.onnx"]


def test_fp32_at_another_input_size(sharp_checkpoint, tmp_path):
    out = tmp_path / "m32.onnx"
    result = invoke(sharp_checkpoint, "-o", out, "--fp32", "--input-size", "128x192", "--layout", "NCHW")
    assert result.exit_code == 0, result.output
    contract = contract_of(out)
    assert (contract.precision, contract.input_size, contract.input_layout) == ("fp32", (128, 192), "NCHW")
    assert f"wrote {out}: fp32" in result.output


def test_failed_verification_exits_1_and_installs_nothing(sharp_checkpoint, parity_photos, tmp_path, monkeypatch):
    """An exporter bug that blanks the masks (the FP16 failure of onnxruntime #23797): caught, nothing installed."""
    real_fold = export.onnx_export.fold_batchnorm

    def broken_fold(model: UNet) -> UNet:
        net = real_fold(model)
        with torch.no_grad():
            net.head.bias -= 100
        return net

    monkeypatch.setattr(export.onnx_export, "fold_batchnorm", broken_fold)
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the model in service")
    result = invoke(
        sharp_checkpoint, "-o", out, "--verify", parity_photos, "--verify-limit", 2, "--device", "cpu", "--no-progress"
    )
    assert result.exit_code == 1, result.output
    assert "blank mask where PyTorch finds a car" in result.output and "-> FAIL" in result.output
    assert f"2 of 2 photos out of tolerance: {out} was not written" in result.output
    assert out.read_bytes() == b"the model in service" and onnx_files(tmp_path) == ["m.onnx"]


def write_garbage(folder: Path) -> Path:
    (folder / "garbage.pt").write_bytes(b"definitely not a zip file" * 20)
    return folder / "garbage.pt"


def write_state_dict(folder: Path) -> Path:
    torch.save(UNet(UNetConfig(width=2, depth=2)).state_dict(), folder / "weights.pt")
    return folder / "weights.pt"


@pytest.mark.parametrize(
    "checkpoint, extra, message",
    [
        (lambda tmp, ckpt: tmp / "missing.pt", [], "missing.pt' does not exist"),
        (lambda tmp, ckpt: write_garbage(tmp), [], "garbage.pt is not a readable checkpoint"),
        (lambda tmp, ckpt: write_state_dict(tmp), [], "weights.pt is not a unet-train checkpoint"),
        (lambda tmp, ckpt: ckpt, ["--input-size", "66x96"], "input size 66x96 does not suit"),
        (lambda tmp, ckpt: ckpt, ["--input-size", "64by96"], "is not a size"),
        (lambda tmp, ckpt: ckpt, ["--opset", "12"], "12 is not in the range 17<=x<=21"),
        (lambda tmp, ckpt: ckpt, ["--verify", "{tmp}/empty"], "no photos (.jpg, .jpeg, .png) in"),
    ],
)
def test_bad_input_exits_2_with_a_clear_message_and_no_file(sharp_checkpoint, tmp_path, checkpoint, extra, message):
    (tmp_path / "empty").mkdir()
    args = [a.replace("{tmp}", str(tmp_path)) for a in extra]
    result = invoke(checkpoint(tmp_path, sharp_checkpoint), "-o", tmp_path / "m.onnx", *args, "--device", "cpu")
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert onnx_files(tmp_path) == []


@pytest.mark.parametrize(
    "out, message",
    [
        ("{tmp}/no/such/m.onnx", "folder {tmp}/no/such does not exist"),
        ("{tmp}/a-file/m.onnx", "{tmp}/a-file is a file, not a folder"),
    ],
)
@pytest.mark.parametrize("verify", [False, True])
def test_unwritable_output_exits_2(sharp_checkpoint, parity_photos, tmp_path, out, message, verify):
    (tmp_path / "a-file").write_text("x")
    extra = ["--verify", parity_photos, "--device", "cpu"] if verify else []
    result = invoke(sharp_checkpoint, "-o", out.format(tmp=tmp_path), *extra)
    assert result.exit_code == 2, result.output
    assert message.format(tmp=tmp_path) in result.output
    assert onnx_files(tmp_path) == []


def test_cuda_without_the_cuda_provider_exits_2_before_exporting(sharp_checkpoint, parity_photos, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this onnxruntime has the CUDA provider")
    result = invoke(sharp_checkpoint, "-o", tmp_path / "m.onnx", "--verify", parity_photos, "--device", "cuda")
    assert result.exit_code == 2 and "--device cuda:0 cannot be used: this onnxruntime" in result.output
    assert "has no CUDA provider" in result.output
    assert onnx_files(tmp_path) == []


def test_help_shows_the_options_and_defaults():
    result = CliRunner().invoke(main, ["to-onnx", "--help"])
    assert result.exit_code == 0
    for text in (
        "--fp16 / --fp32",
        "[default: fp16]",
        "--input-size HXW",
        "[default: 18; 17<=x<=21]",
        "--layout [NHWC|NCHW]",
        "--verify DIRECTORY",
        "--verify-limit",
        "--device auto|cpu|cuda[:N]",
    ):
        assert text in result.output
