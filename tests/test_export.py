"""export.onnx_export: the graph, its contract, FP16, dynamic shapes, bad input, atomic writes."""

from __future__ import annotations

import hashlib
import json
import pickle
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import TensorProto

from batch.core.contract import ModelContract
from export.config import DEFAULT_OPSET, ExportError, ExportOptions
from export.onnx_export import TrainedModel, export_checkpoint, export_model, fold_batchnorm, write_atomic
from unet import __version__
from unet.checkpoint import CheckpointError, load_checkpoint, model_from_checkpoint, save_checkpoint
from unet.model import UNet, UNetConfig

CONTRACT_KEYS = {
    "contract_version",
    "input_height",
    "input_width",
    "input_layout",
    "input_dtype",
    "input_multiple",
    "pixel_mean",
    "pixel_std",
    "output_kind",
    "threshold",
    "precision",
}
PROVENANCE_KEYS = {
    "model_config",
    "train_images",
    "val_images",
    "val_dice",
    "val_cars",
    "epoch",
    "train_input_size",
    "source_checkpoint",
    "source_checkpoint_sha256",
    "checkpoint_version",
    "export_date",
    "package_version",
    "torch_version",
    "opset",
}


def run_onnx(path: Path, images: np.ndarray, layout: str = "NHWC") -> np.ndarray:
    """images: (N, H, W, 3) uint8 -> (N, 1, H, W) logits from the CPU provider."""
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = images if layout == "NHWC" else np.ascontiguousarray(images.transpose(0, 3, 1, 2))
    return session.run(None, {"image": feed})[0]


def torch_logits(checkpoint: Path, images: np.ndarray) -> np.ndarray:
    """The FP32 PyTorch reference, normalized the way training does."""
    state = load_checkpoint(checkpoint)
    model = model_from_checkpoint(state)
    mean, std = (torch.tensor(state[key]).view(1, 3, 1, 1) for key in ("pixel_mean", "pixel_std"))
    x = torch.from_numpy(images.copy()).permute(0, 3, 1, 2).float() / 255  # (N, 3, H, W)
    with torch.no_grad():
        return model((x - mean) / std).numpy()  # (N, 1, H, W)


def random_photos(batch: int, height: int, width: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)


def synthetic_photos(batch: int, height: int, width: int) -> np.ndarray:
    from conftest import synthetic_pair

    rng = np.random.default_rng(11)
    return np.stack([synthetic_pair(rng, height, width)[0] for _ in range(batch)])


def relative_diff(a: np.ndarray, reference: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - reference).max() / np.abs(reference).max())


def files_in(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


# ---- the graph and its contract -------------------------------------------------------------------


@pytest.mark.parametrize("precision", ["fp16", "fp32"])
def test_graph_passes_the_full_checker_and_has_the_contracted_io(exported_onnx, precision):
    model = onnx.load(str(exported_onnx[precision]))
    onnx.checker.check_model(model, full_check=True)
    (image,), (logits,) = model.graph.input, model.graph.output
    assert image.name == "image" and image.type.tensor_type.elem_type == TensorProto.UINT8
    assert [d.dim_param or d.dim_value for d in image.type.tensor_type.shape.dim] == ["batch", "height", "width", 3]
    assert logits.name == "logits" and logits.type.tensor_type.elem_type == TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in logits.type.tensor_type.shape.dim] == ["batch", 1, "height", "width"]
    assert model.opset_import[0].version == DEFAULT_OPSET


def test_every_metadata_key_is_written(exported_onnx, sharp_checkpoint):
    model = onnx.load(str(exported_onnx["fp16"]))
    meta = {prop.key: prop.value for prop in model.metadata_props}
    assert set(meta) == CONTRACT_KEYS | PROVENANCE_KEYS
    state = load_checkpoint(sharp_checkpoint)
    contract = ModelContract.from_metadata(meta, source="tiny-fp16.onnx")
    assert contract.input_size == tuple(state["input_size"]) == (64, 96)
    assert (contract.input_layout, contract.input_dtype, contract.input_multiple) == ("NHWC", "uint8", 4)
    assert contract.pixel_mean == pytest.approx(state["pixel_mean"]) and contract.pixel_std == pytest.approx(state["pixel_std"])
    assert (contract.output_kind, contract.threshold, contract.precision) == ("logits", 0.5, "fp16")
    assert json.loads(meta["model_config"]) == state["model_config"]
    assert int(meta["train_images"]) == state["train_images"] and int(meta["val_images"]) == state["val_images"]
    assert float(meta["val_dice"]) == pytest.approx(state["val_dice"])
    assert meta["val_cars"].split(",") == state["val_cars"]
    assert meta["train_input_size"] == "64x96" and int(meta["epoch"]) == state["epoch"]
    assert meta["source_checkpoint"] == str(sharp_checkpoint.resolve())
    assert meta["source_checkpoint_sha256"] == hashlib.sha256(sharp_checkpoint.read_bytes()).hexdigest()
    exported = datetime.fromisoformat(meta["export_date"])
    assert exported.tzinfo is not None and abs((datetime.now(UTC) - exported).total_seconds()) < 3600
    assert meta["package_version"] == __version__ and meta["opset"] == str(DEFAULT_OPSET)
    assert (
        ort.InferenceSession(str(exported_onnx["fp16"]), providers=["CPUExecutionProvider"]).get_modelmeta().custom_metadata_map
        == meta
    )


def test_no_debug_annotations_or_local_paths_leak_into_the_graph(exported_onnx):
    model = onnx.load(str(exported_onnx["fp32"]))
    assert not any(node.metadata_props for node in model.graph.node)
    assert not model.graph.metadata_props  # torch.export's signature, in an order that varies from run to run
    assert b"stack_trace" not in model.SerializeToString()


def test_batchnorm_is_folded_and_fp16_covers_weights_and_compute(exported_onnx):
    fp16, fp32 = (onnx.load(str(exported_onnx[p])) for p in ("fp16", "fp32"))
    for model in (fp16, fp32):
        assert "BatchNormalization" not in {node.op_type for node in model.graph.node}
    weights16 = {init.name: init.data_type for init in fp16.graph.initializer}
    weights32 = {init.name: init.data_type for init in fp32.graph.initializer}
    assert weights16.pop("offset") == weights16.pop("scale") == TensorProto.FLOAT  # the FP32 normalization
    assert set(weights16.values()) == {TensorProto.FLOAT16} and set(weights32.values()) == {TensorProto.FLOAT}
    assert len(weights16) == len(weights32) - 2 > 10  # every conv weight and bias
    casts = [node for node in fp16.graph.node if node.op_type == "Cast"]
    # uint8 -> float32 (normalize in FP32), float32 -> float16 (the net), float16 -> float32 (logits): nothing else
    assert [onnx.helper.get_attribute_value(c.attribute[0]) for c in casts] == [
        TensorProto.FLOAT,
        TensorProto.FLOAT16,
        TensorProto.FLOAT,
    ]
    weight_bytes = [sum(len(i.raw_data) for i in m.graph.initializer if i.name.startswith("net.")) for m in (fp16, fp32)]
    assert weight_bytes[0] * 2 == weight_bytes[1]


def test_fold_batchnorm_matches_the_model_and_leaves_it_untouched():
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=4, depth=2)).train()
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(4, 3, 32, 48) * 3 + 1)  # non-trivial running statistics
    model.eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    folded = fold_batchnorm(model)
    x = torch.randn(2, 3, 32, 48)
    with torch.no_grad():
        assert torch.allclose(folded(x), model(x), rtol=1e-4, atol=1e-5)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in folded.modules())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


# ---- running it ------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch, size", [(1, (32, 128)), (3, (96, 64))])
def test_fp32_runs_at_any_batch_and_size_and_matches_pytorch(exported_onnx, sharp_checkpoint, batch, size):
    images = random_photos(batch, *size)
    logits = run_onnx(exported_onnx["fp32"], images)
    assert logits.shape == (batch, 1, *size) and logits.dtype == np.float32
    assert relative_diff(logits, torch_logits(sharp_checkpoint, images)) < 1e-4


@pytest.mark.parametrize("batch, size", [(1, (32, 128)), (3, (96, 64))])
def test_fp16_runs_at_any_batch_and_size(exported_onnx, sharp_checkpoint, batch, size):
    images = random_photos(batch, *size, seed=1)
    logits = run_onnx(exported_onnx["fp16"], images)
    assert logits.shape == (batch, 1, *size) and logits.dtype == np.float32
    assert np.isfinite(logits).all()
    assert relative_diff(logits, torch_logits(sharp_checkpoint, images)) < 1e-2


def test_fp16_agrees_with_fp32(exported_onnx):
    images = synthetic_photos(4, 64, 96)
    fp16, fp32 = (run_onnx(exported_onnx[p], images) for p in ("fp16", "fp32"))
    assert relative_diff(fp16, fp32) < 1e-2
    masks16, masks32 = fp16 > 0, fp32 > 0
    assert masks32.mean() > 0.05  # a real boundary: the comparison below means something
    agreement = 2 * (masks16 & masks32).sum() / (masks16.sum() + masks32.sum())
    assert agreement > 0.999
    confident = np.abs(fp32) > 0.05 * np.abs(fp32).max()  # only pixels near the threshold may flip
    assert np.array_equal(masks16[confident], masks32[confident])


def test_batch_results_do_not_depend_on_batch_mates(exported_onnx):
    images = random_photos(3, 64, 96, seed=2)
    together = run_onnx(exported_onnx["fp16"], images)
    alone = np.concatenate([run_onnx(exported_onnx["fp16"], images[i : i + 1]) for i in range(3)])
    np.testing.assert_allclose(together, alone, rtol=1e-3, atol=1e-3)


def test_layout_input_size_and_opset_options(sharp_checkpoint, exported_onnx, tmp_path):
    path = tmp_path / "nchw.onnx"
    contract = export_checkpoint(sharp_checkpoint, path, ExportOptions(layout="NCHW", input_size=(128, 192), opset=17))
    model = onnx.load(str(path))
    written = ModelContract.from_metadata({p.key: p.value for p in model.metadata_props})
    assert contract.input_layout == written.input_layout == "NCHW"
    assert contract.input_size == written.input_size == (128, 192)
    assert written.provenance["train_input_size"] == "64x96"  # the training size stays on record
    assert written.provenance["opset"] == "17" and model.opset_import[0].version == 17
    assert [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim] == [
        "batch",
        3,
        "height",
        "width",
    ]
    images = random_photos(2, 128, 192, seed=3)
    # FP16 both: ONNX Runtime places its FP32<->FP16 casts differently for the two layouts (~1e-3); a wrong
    # layout would differ by O(1)
    assert relative_diff(run_onnx(path, images, "NCHW"), run_onnx(exported_onnx["fp16"], images)) < 1e-2


def test_export_model_takes_a_bare_bilinear_model_and_extra_provenance(tmp_path):
    torch.manual_seed(0)
    model = UNet(UNetConfig(width=2, depth=3, upsample="bilinear")).eval()
    trained = TrainedModel(model, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), provenance={"val_dice": 0.5, "note": "hand-made"})
    contract = export_model(trained, tmp_path / "bare.onnx", ExportOptions(fp16=False, input_size=(16, 24)))
    meta = {p.key: p.value for p in onnx.load(str(tmp_path / "bare.onnx")).metadata_props}
    assert contract.input_multiple == 8 and meta["input_multiple"] == "8"
    assert meta["note"] == "hand-made" and meta["val_dice"] == "0.5" and meta["pixel_std"] == "0.25,0.25,0.25"
    assert "BatchNorm2d" in {type(m).__name__ for m in model.modules()}  # the caller's model is left as it was
    images = random_photos(2, 40, 56, seed=4)  # 5x7 blocks of 8: bilinear upsampling at odd sizes
    with torch.no_grad():
        x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
        reference = model((x - 0.5) / 0.25).numpy()
    assert relative_diff(run_onnx(tmp_path / "bare.onnx", images), reference) < 1e-4


# ---- bad input -------------------------------------------------------------------------------------


def write_state_dict(path: Path) -> Path:
    torch.save(UNet(UNetConfig(width=2, depth=2)).state_dict(), path)
    return path


def write_foreign_dict(path: Path) -> Path:
    torch.save({"epoch": 3, "weights": torch.zeros(3)}, path)
    return path


def write_garbage(path: Path) -> Path:
    path.write_bytes(b"\x89PNG not a checkpoint at all" * 10)
    return path


def write_truncated(path: Path, source: Path) -> Path:
    path.write_bytes(source.read_bytes()[:2000])
    return path


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda folder, ckpt: folder / "missing.pt", "does not exist"),
        (lambda folder, ckpt: write_garbage(folder / "garbage.pt"), "not a readable checkpoint"),
        (lambda folder, ckpt: write_truncated(folder / "truncated.pt", ckpt), "not a readable checkpoint"),
        (lambda folder, ckpt: write_state_dict(folder / "state_dict.pt"), "not a unet-train checkpoint"),
        (lambda folder, ckpt: write_foreign_dict(folder / "other.pt"), "not a unet-train checkpoint"),
    ],
)
def test_bad_checkpoints_are_refused_by_name_and_nothing_is_written(tmp_path, sharp_checkpoint, make, message):
    checkpoint = make(tmp_path, sharp_checkpoint)
    out = tmp_path / "out"
    out.mkdir()
    with pytest.raises(CheckpointError, match=message) as error:
        export_checkpoint(checkpoint, out / "m.onnx")
    assert checkpoint.name in str(error.value)
    assert files_in(out) == []


def test_weights_that_do_not_fit_the_config_are_refused(tmp_path, sharp_checkpoint):
    state = load_checkpoint(sharp_checkpoint)
    fields = {k: v for k, v in state.items() if k not in ("kind", "format")}
    save_checkpoint({**fields, "model_config": {**state["model_config"], "width": 8}}, tmp_path / "edited.pt")
    with pytest.raises(ExportError, match="edited.pt: the weights do not fit its model_config"):
        export_checkpoint(tmp_path / "edited.pt", tmp_path / "m.onnx")
    assert files_in(tmp_path) == ["edited.pt"]


def test_checkpoint_without_normalization_is_refused(tmp_path, sharp_checkpoint):
    state = load_checkpoint(sharp_checkpoint)
    fields = {k: v for k, v in state.items() if k not in ("kind", "format", "pixel_std")}
    save_checkpoint(fields, tmp_path / "old.pt")
    with pytest.raises(ExportError, match="old.pt has no 'pixel_std'"):
        export_checkpoint(tmp_path / "old.pt", tmp_path / "m.onnx")
    assert files_in(tmp_path) == ["old.pt"]


@pytest.mark.parametrize("size, hint", [((66, 96), "64x96 or 68x96"), ((64, 90), "64x88 or 64x92"), ((2, 96), "4x96")])
def test_input_size_must_be_a_multiple_of_two_to_the_depth(sharp_checkpoint, tmp_path, size, hint):
    with pytest.raises(ExportError, match=f"multiples of 4. Try --input-size .*{hint}"):
        export_checkpoint(sharp_checkpoint, tmp_path / "m.onnx", ExportOptions(input_size=size))
    assert files_in(tmp_path) == []


@pytest.mark.parametrize(
    "option, value, message",
    [
        ("opset", 12, "opset 12 is not supported"),
        ("layout", "NWHC", "layout must be"),
        ("input_size", (64,), "input size must be \\(height, width\\)"),
        ("input_size", (0, 96), "input size must be positive, got 0x96"),
    ],
)
def test_unsupported_options_are_refused_when_made(option, value, message):
    with pytest.raises(ExportError, match=message):
        ExportOptions(**{option: value})


def test_options_keep_a_size_as_a_tuple_of_ints():
    assert ExportOptions(input_size=[64.0, 96]).input_size == (64, 96)


@pytest.mark.parametrize(
    "out, message",
    [
        (lambda tmp: tmp / "no" / "such" / "m.onnx", "folder .*such does not exist"),
        (lambda tmp: tmp, "is a folder"),
        (lambda tmp: tmp / "file.txt" / "m.onnx", "file.txt is a file, not a folder"),
    ],
)
def test_unwritable_output_is_refused_before_exporting(sharp_checkpoint, tmp_path, out, message):
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ExportError, match=message):
        export_checkpoint(sharp_checkpoint, out(tmp_path))
    assert files_in(tmp_path) == ["file.txt"]


def small_model_proto() -> onnx.ModelProto:
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [onnx.helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [onnx.helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    return onnx.helper.make_model(graph)


def test_failed_write_leaves_no_partial_file_and_keeps_the_old_one(tmp_path, monkeypatch):
    out = tmp_path / "m.onnx"
    out.write_bytes(b"the previous model")

    def disk_full(src, dst):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("batch.core.files.os.replace", disk_full)
    with pytest.raises(ExportError, match="cannot write .*m.onnx: No space left on device"):
        write_atomic(small_model_proto(), out)
    assert files_in(tmp_path) == ["m.onnx"] and out.read_bytes() == b"the previous model"


def test_interrupted_write_leaves_no_temp_file(tmp_path, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("batch.core.files.os.fsync", interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_atomic(small_model_proto(), tmp_path / "m.onnx")
    assert files_in(tmp_path) == []


def test_written_file_is_complete_and_readable_by_others(tmp_path):
    write_atomic(small_model_proto(), tmp_path / "m.onnx")
    assert files_in(tmp_path) == ["m.onnx"]
    assert onnx.load(str(tmp_path / "m.onnx")) == small_model_proto()
    assert (tmp_path / "m.onnx").stat().st_mode & 0o044 == 0o044  # not mkstemp's 0600


def test_fp16_overflowing_weights_are_refused(tmp_path):
    model = UNet(UNetConfig(width=2, depth=2)).eval()
    with torch.no_grad():
        model.stem[1].running_var.fill_(0.0)  # folding scales the conv by gamma / sqrt(var + eps) = 1e4 / 3e-3
        model.stem[1].weight.fill_(1e4)
    with pytest.raises(ExportError, match="beyond FP16's range .*--fp32"):
        export_model(TrainedModel(model, (0, 0, 0), (1, 1, 1)), tmp_path / "m.onnx", ExportOptions(input_size=(16, 16)))
    assert files_in(tmp_path) == []


@pytest.mark.parametrize("fp16", [True, False])
def test_nan_weights_are_refused(tmp_path, fp16):
    model = UNet(UNetConfig(width=2, depth=2)).eval()
    with torch.no_grad():
        model.ups[0].conv[0].weight[0, 0, 0, 0] = float("nan")
    with pytest.raises(ExportError, match=r"ups.0.conv.0.weight holds NaN or Inf: the checkpoint is broken"):
        export_model(
            TrainedModel(model, (0, 0, 0), (1, 1, 1)), tmp_path / "m.onnx", ExportOptions(fp16=fp16, input_size=(16, 16))
        )
    assert files_in(tmp_path) == []


# ---- weights_only ----------------------------------------------------------------------------------


def test_checkpoint_is_read_with_weights_only(sharp_checkpoint, tmp_path, monkeypatch):
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    with pytest.raises(ExportError, match="input size 66x96"):  # fails after loading, before the (slow) trace
        export_checkpoint(sharp_checkpoint, tmp_path / "m.onnx", ExportOptions(input_size=(66, 96)))
    assert calls and all(call.get("weights_only") is True for call in calls)


class Payload:
    """Unpickling this calls open(marker, "w"): a stand-in for arbitrary code execution."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def test_a_malicious_pickle_is_refused_without_running_its_code(tmp_path):
    marker = tmp_path / "pwned"
    torch.save({"kind": "carvana-unet-checkpoint", "format": 1, "model": Payload(marker)}, tmp_path / "evil.pt")
    with pytest.raises(pickle.UnpicklingError):  # what weights_only=False would not raise: proof the check bites
        torch.load(tmp_path / "evil.pt", weights_only=True)
    with pytest.raises(CheckpointError, match="evil.pt is not a readable checkpoint"):
        export_checkpoint(tmp_path / "evil.pt", tmp_path / "m.onnx")
    assert not marker.exists() and not (tmp_path / "m.onnx").exists()


# ---- the keyword forms from before ExportOptions (kept for callers outside export/ until they move) --------
