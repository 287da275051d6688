"""INT8 export (``unet-export to-onnx --int8``): quantization, its record, verification, errors, and running it."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import onnx
import pytest
from click.testing import CliRunner
from PIL import Image

import batch.cli
import export.quantize
from batch.core.contract import ModelContract
from batch.core.devices import DeviceError
from batch.inference.bundled import DEFAULT_MODEL, default_model_path, models_folder
from batch.inference.model import load_model
from batch.inference.runtime import device_for_precision
from export.cli import main
from export.quantize import QuantizeError, find_float_nodes, load_calibration
from unet.checkpoint import load_checkpoint
from unet.data import car_id


def invoke(*args) -> object:
    return CliRunner().invoke(main, ["to-onnx", *map(str, args)])


def export_int8(checkpoint: Path, out: Path, calibrate: Path, *args) -> object:
    return invoke(checkpoint, "-o", out, "--int8", "--calibrate", calibrate, "--no-progress", *args)


def metadata(path: Path) -> dict[str, str]:
    return {p.key: p.value for p in onnx.load(str(path)).metadata_props}


def leftovers(folder: Path) -> list[str]:
    """Files an export may have left in ``folder`` (the model, or a temporary of it)."""
    return sorted(p.name for p in folder.iterdir() if ".onnx" in p.name or p.name.startswith("."))


def val_cars(checkpoint: Path) -> set[str]:
    return set(load_checkpoint(checkpoint)["val_cars"])


@pytest.fixture(scope="module")
def int8_export(sharp_checkpoint, parity_photos, tmp_path_factory) -> tuple[Path, str]:
    """sharp_checkpoint exported INT8, calibrated and verified on the parity photos: (path, the command's output)."""
    out = tmp_path_factory.mktemp("int8") / "m-int8.onnx"
    verify = ["--verify", parity_photos, "--verify-limit", 3, "--device", "cpu"]
    result = export_int8(sharp_checkpoint, out, parity_photos, "--calibration-images", 4, *verify)
    assert result.exit_code == 0, result.output
    return out, result.output


def test_int8_export_is_verified_against_pytorch(int8_export):
    out, output = int8_export
    assert "(int8, CPUExecutionProvider)" in output and "criterion: mask Dice >= 0.999" in output
    assert "3/3 photos pass" in output and "max rel. diff" in output and output.rstrip().endswith("opset 18")
    assert f"wrote {out}: int8" in output
    assert leftovers(out.parent) == [out.name]


def test_the_file_records_int8_and_its_calibration_set(int8_export, sharp_checkpoint, parity_photos):
    out, _ = int8_export
    meta = metadata(out)
    contract = ModelContract.from_metadata(meta, source=out.name)
    assert (contract.precision, contract.input_dtype, contract.input_size) == ("int8", "uint8", (64, 96))
    held_out = val_cars(sharp_checkpoint)
    used = [p for p in sorted(parity_photos.glob("*.jpg")) if car_id(p.stem) not in held_out]
    assert 0 < len(used) < 6 and meta["calibration_images"] == str(len(used))  # the validation car's photos left out
    listing = "".join(f"{hashlib.sha256(p.read_bytes()).hexdigest()}  {p.name}\n" for p in used)  # `sha256sum` output
    assert meta["calibration_sha256"] == hashlib.sha256(listing.encode()).hexdigest()
    assert meta["calibration_source"] == str(parity_photos.resolve())
    assert "QDQ" in meta["quantization"] and meta["source_checkpoint_sha256"]


def test_convolutions_are_int8_but_the_stem_and_head_stay_fp32(int8_export):
    graph = onnx.load(str(int8_export[0])).graph
    quantized_weights = {n.output[0] for n in graph.node if n.op_type == "DequantizeLinear" and "weight" in n.input[0]}
    convs = [n for n in graph.node if n.op_type in ("Conv", "ConvTranspose")]
    fp32 = [n.name for n in convs if n.input[1] not in quantized_weights]
    assert fp32 == find_float_nodes(graph) and len(fp32) == 3  # the stem's two convolutions and the head
    assert len(convs) - len(fp32) >= 8
    (image,), (logits,) = graph.input, graph.output
    assert image.type.tensor_type.elem_type == onnx.TensorProto.UINT8  # raw photos in, normalized in the graph
    assert logits.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    assert not any(n.op_type == "QuantizeLinear" and n.input[0] == image.name for n in graph.node)


def test_unet_batch_segments_with_the_int8_model(int8_export, parity_photos, tmp_path):
    out, _ = int8_export
    args = ["segment", parity_photos, tmp_path / "masks", "--model", out, "--device", "cpu", "--no-progress"]
    result = CliRunner().invoke(batch.cli.main, list(map(str, args)))
    assert result.exit_code == 0, result.output
    report = json.loads((tmp_path / "masks" / "report.json").read_text())
    assert report["processed"] == 6 and report["provider"] == "CPUExecutionProvider"
    truth = parity_photos.parent / "train_masks"
    for mask_file in sorted((tmp_path / "masks").glob("*.png")):
        mask = np.asarray(Image.open(mask_file)) > 0
        true = np.asarray(Image.open(truth / f"{mask_file.stem}_mask.gif")) > 0
        assert mask.shape == (128, 192) and 2 * (mask & true).sum() / (mask.sum() + true.sum()) > 0.9


def test_int8_runs_on_the_cpu_only(int8_export, caplog):
    """ONNX Runtime fuses QDQ graphs into integer kernels on its CPU provider only: cuda is refused, auto takes the CPU."""
    out, _ = int8_export
    with pytest.raises(DeviceError, match=r"--device cuda:0 cannot be used: .*m-int8.onnx is an INT8 model.*CPU only"):
        load_model(out, device="cuda")
    with caplog.at_level(logging.INFO, logger="batch.inference.runtime"):
        model = load_model(out, device="auto")
    assert (model.device, model.provider) == ("cpu", "CPUExecutionProvider")
    assert "device auto: " in caplog.text and "INT8 model" in caplog.text
    assert str(device_for_precision("cuda:1", "fp16", "m.onnx")) == "cuda:1"  # other precisions go where they are sent
    assert str(device_for_precision("auto", "fp32", "m.onnx")) == "auto"


def test_int8_verification_on_cuda_is_refused_before_the_export(sharp_checkpoint, parity_photos, tmp_path):
    result = export_int8(sharp_checkpoint, tmp_path / "m.onnx", parity_photos, "--verify", parity_photos, "--device", "cuda")
    assert result.exit_code == 2 and "INT8 model" in result.output and "CPU only" in result.output
    assert leftovers(tmp_path) == []


def test_calibration_unlike_the_photos_fails_verification_and_installs_nothing(sharp_checkpoint, parity_photos, tmp_path):
    """Ranges from blank white frames clip the real photos' activations: the parity check catches it, exit 1."""
    blank = tmp_path / "blank"
    blank.mkdir()
    for i in range(2):
        Image.fromarray(np.full((64, 96, 3), 255, np.uint8)).save(blank / f"frame{i}.png")
    out = tmp_path / "m.onnx"
    result = export_int8(sharp_checkpoint, out, blank, "--verify", parity_photos, "--verify-limit", 3, "--device", "cpu")
    assert result.exit_code == 1, result.output
    assert "-> FAIL" in result.output and f"{out} was not written" in result.output
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--int8"], "--int8 needs --calibrate DIR"),
        (["--calibrate", "{photos}"], "--calibrate is for --int8 exports"),
        (["--int8", "--calibrate", "{photos}", "--fp16"], "leave out --fp16/--fp32"),
        (["--int8", "--calibrate", "{missing}"], "'{missing}' does not exist"),
        (["--int8", "--calibrate", "{empty}"], "no photos (.jpg, .jpeg, .png) in {empty}: point --calibrate at"),
    ],
)
def test_bad_int8_options_exit_2_before_any_work(tiny_checkpoint, parity_photos, tmp_path, args, message):
    (tmp_path / "empty").mkdir()
    names = {"photos": parity_photos, "missing": tmp_path / "nope", "empty": tmp_path / "empty"}
    result = invoke(tiny_checkpoint, "-o", tmp_path / "m.onnx", *[a.format(**names) for a in args])
    assert result.exit_code == 2 and message.format(**names) in result.output, result.output
    assert leftovers(tmp_path) == []


def test_no_usable_calibration_photo_exits_2_and_writes_nothing(tiny_checkpoint, tmp_path):
    photos = tmp_path / "photos"
    photos.mkdir()
    (photos / "a.jpg").write_bytes(b"not a jpeg")
    result = export_int8(tiny_checkpoint, tmp_path / "m.onnx", photos)
    assert result.exit_code == 2, result.output
    assert f"no usable calibration photos in {photos}: none of them can be read" in result.output
    assert "skipped" in result.output and "a.jpg" in result.output  # the log names the file
    assert leftovers(tmp_path) == []


def test_a_model_onnx_runtime_cannot_quantize_exits_2_and_writes_nothing(tiny_checkpoint, parity_photos, tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("Unsupported model: no quantizable operator\nstack trace")

    monkeypatch.setattr(export.quantize, "quantize_static", fail)
    result = export_int8(tiny_checkpoint, tmp_path / "m.onnx", parity_photos)
    assert result.exit_code == 2
    assert "ONNX Runtime cannot quantize this model (Unsupported model: no quantizable operator)" in result.output
    assert "Export it with --fp32 instead" in result.output and leftovers(tmp_path) == []


def test_calibration_leaves_out_validation_cars_and_unreadable_photos(parity_photos, tmp_path, caplog):
    photos = sorted(parity_photos.glob("*.jpg"))
    cars = sorted({car_id(p.stem) for p in photos})
    contract = ModelContract(64, 96, input_layout="NCHW", provenance={"val_cars": cars[0]})
    calibration = load_calibration(photos, contract, count=10)
    assert calibration.names == tuple(p.name for p in photos if car_id(p.stem) == cars[1])
    assert all(x.shape == (1, 3, 64, 96) and x.dtype == np.uint8 for x in calibration.inputs)  # prepared like the runner's
    assert len(load_calibration(photos, contract, count=2).names) == 2
    everyone = ModelContract(64, 96, provenance={"val_cars": ",".join(cars)})
    with pytest.raises(QuantizeError, match="all photos of the checkpoint's validation cars"):
        load_calibration(photos, everyone, count=10)
    broken = tmp_path / "z.jpg"
    broken.write_bytes(b"\xff\xd8\xff truncated")
    with caplog.at_level(logging.WARNING, logger="export.quantize"):
        kept = load_calibration([*photos, broken], contract, count=10)
    assert kept.names == calibration.names and "skipped" in caplog.text and "z.jpg" in caplog.text


def test_the_bundled_int8_model_is_the_fp32_one_quantized_and_the_cpu_default():
    folder = models_folder()
    int8, fp32 = folder / "default-int8.onnx", folder / DEFAULT_MODEL
    meta8, meta32 = metadata(int8), metadata(fp32)
    assert (meta8["precision"], meta32["precision"]) == ("int8", "fp32")
    assert meta8["source_checkpoint_sha256"] == meta32["source_checkpoint_sha256"]  # the same checkpoint
    assert meta8["val_cars"] == meta32["val_cars"] and int(meta8["calibration_images"]) >= 16
    assert sum(p.stat().st_size for p in folder.glob("*.onnx")) <= 20 * 1024 * 1024  # the package's budget
    assert default_model_path("cpu") == int8 and default_model_path("cuda") != int8
