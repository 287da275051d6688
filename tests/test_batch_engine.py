"""The inference stage: model loading and checks, devices, input contracts, and the IOBinding path."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import synthetic_pair

from batch.core.contract import prepare_input
from batch.core.devices import DeviceError
from batch.core.images import load_resized_rgb
from batch.core.masks import dice
from batch.inference.decode import Batch, Item
from batch.inference.model import BoundPredictor, CpuPredictor, load_model
from batch.inference.runtime import ModelError

SIZES = [(96, 144), (96, 144), (120, 180), (70, 100), (70, 100)]


@pytest.fixture
def host_batch(tmp_path: Path) -> tuple[Batch, list[np.ndarray]]:
    """Five synthetic photos of three sizes, decoded to 64x96, and their true masks."""
    from PIL import Image

    pixels, truths = [], []
    for i, size in enumerate(SIZES):
        photo, mask = synthetic_pair(np.random.default_rng(i), *size)
        Image.fromarray(photo).save(tmp_path / f"{i}.png")
        pixels.append(load_resized_rgb(tmp_path / f"{i}.png", (64, 96)).pixels)
        truths.append(mask)
    items = [Item(f"{i}.png", path=tmp_path / f"{i}.png") for i in range(len(SIZES))]
    return Batch(items, list(range(len(SIZES))), SIZES, decoder="pillow", pixels=np.stack(pixels)), truths


def masks_of(engine, batch: Batch) -> list[np.ndarray]:
    return [prediction.mask() for prediction in engine.predict(batch)]


# ---- loading ---------------------------------------------------------------------------------


def test_load_model_reads_the_contract(tiny_onnx: Path):
    model = load_model(tiny_onnx, "cpu")
    assert (model.device, model.provider) == ("cpu", "CPUExecutionProvider")
    assert model.contract.input_size == (64, 96) and model.contract.input_layout == "NHWC"
    assert model.describe()["input_size"] == [64, 96] and model.describe()["path"] == str(tiny_onnx)


def test_missing_and_garbage_model_files(tmp_path: Path):
    with pytest.raises(ModelError, match="does not exist"):
        load_model(tmp_path / "none.onnx", "cpu")
    (tmp_path / "junk.onnx").write_bytes(b"\x00\x01 certainly not protobuf \xff" * 50)
    with pytest.raises(ModelError, match="junk.onnx is not a readable ONNX model"):
        load_model(tmp_path / "junk.onnx", "cpu")


def test_model_without_metadata_names_the_missing_key(tmp_path: Path, tiny_onnx: Path):
    proto = onnx.load(str(tiny_onnx))
    del proto.metadata_props[:]
    onnx.save(proto, str(tmp_path / "bare.onnx"))
    with pytest.raises(ModelError, match="bare.onnx has no 'input_height' in its metadata"):
        load_model(tmp_path / "bare.onnx", "cpu")


def test_metadata_that_contradicts_the_graph(tmp_path: Path, tiny_onnx: Path):
    proto = onnx.load(str(tiny_onnx))
    for prop in proto.metadata_props:
        if prop.key == "input_dtype":
            prop.value = "float32"
    onnx.save(proto, str(tmp_path / "liar.onnx"))
    with pytest.raises(ModelError, match="input 'image' is UINT8 but the metadata says input_dtype=float32"):
        load_model(tmp_path / "liar.onnx", "cpu")
    for prop in proto.metadata_props:
        if prop.key in ("input_dtype", "input_layout"):
            prop.value = {"input_dtype": "uint8", "input_layout": "NCHW"}[prop.key]
    onnx.save(proto, str(tmp_path / "layout.onnx"))
    with pytest.raises(ModelError, match="not NCHW with 3 channels"):
        load_model(tmp_path / "layout.onnx", "cpu")


@pytest.mark.skipif("CUDAExecutionProvider" in ort.get_available_providers(), reason="this onnxruntime has CUDA")
def test_cuda_without_the_cuda_provider_is_an_error_not_a_cpu_run(tiny_onnx: Path, caplog):
    with pytest.raises(DeviceError, match=r"--device cuda:0 cannot be used: .*onnxruntime-gpu.*--device cpu"):
        load_model(tiny_onnx, "cuda")
    with pytest.raises(DeviceError, match="cuda:1"):
        load_model(tiny_onnx, "cuda:1")
    caplog.set_level("INFO")
    assert load_model(tiny_onnx, "auto").device == "cpu"
    assert "running on the CPU" in caplog.text  # auto says what it chose


# ---- input contracts ------------------------------------------------------------------------------


def test_prepare_input_normalizes_and_transposes():
    from batch.core.contract import ModelContract

    pixels = np.random.default_rng(0).integers(0, 256, (2, 4, 6, 3), dtype=np.uint8)
    contract = ModelContract(
        16, 16, input_layout="NCHW", input_dtype="float32", pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.5)
    )
    x = prepare_input(pixels, contract)
    assert x.shape == (2, 3, 4, 6) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (pixels[0, 1, 2] / 255 - np.array([0.5, 0.4, 0.3])) / np.array([0.2, 0.25, 0.5])
    np.testing.assert_allclose(x[0, :, 1, 2], expected, rtol=1e-5)
    assert (
        prepare_input(pixels, ModelContract(16, 16)) is not None
        and prepare_input(pixels, ModelContract(16, 16)).dtype == np.uint8
    )


@pytest.mark.parametrize(
    "options",
    [
        {"layout": "NCHW", "dtype": "float32"},
        {"layout": "NHWC", "dtype": "float16"},
        {"layout": "NCHW", "dtype": "uint8"},
        {"output_kind": "probabilities"},
        {"output_dtype": "float16"},
    ],
)
def test_every_input_contract_gives_the_same_masks(make_onnx, tiny_onnx: Path, host_batch, options):
    batch, _ = host_batch
    reference = masks_of(CpuPredictor(load_model(tiny_onnx, "cpu"), 0.5, tta=False), batch)
    other = masks_of(CpuPredictor(load_model(make_onnx(**options), "cpu"), 0.5, tta=False), batch)
    for a, b in zip(reference, other):
        assert a.shape == b.shape
        if options.get("output_kind") == "probabilities":  # interpolating probabilities, not logits: a hair different
            assert dice(a == 255, b == 255) > 0.99
        else:
            assert (a != b).mean() < 1e-3


def test_masks_have_each_photos_size_and_find_the_car(tiny_onnx: Path, host_batch):
    batch, truths = host_batch
    masks = masks_of(CpuPredictor(load_model(tiny_onnx, "cpu"), 0.5, tta=True), batch)
    for mask, truth in zip(masks, truths):
        assert mask.shape == truth.shape and mask.dtype == np.uint8
        assert dice(mask == 255, truth) > 0.9


def test_a_higher_threshold_marks_fewer_pixels(tiny_onnx: Path, host_batch):
    batch, _ = host_batch
    model = load_model(tiny_onnx, "cpu")
    low, high = (sum(int((m == 255).sum()) for m in masks_of(CpuPredictor(model, t, tta=False), batch)) for t in (0.2, 0.8))
    assert low > high


# ---- the IOBinding engine (the CUDA path), run here with CPU buffers --------------------------------


@pytest.mark.parametrize("tta", [False, True])
@pytest.mark.parametrize("options", [{}, {"layout": "NCHW", "dtype": "float32", "output_dtype": "float16"}])
def test_bound_engine_matches_the_cpu_engine(make_onnx, host_batch, tta, options):
    batch, _ = host_batch
    model = load_model(make_onnx(**options), "cpu")
    expected = masks_of(CpuPredictor(model, 0.6, tta=tta), batch)
    bound = masks_of(BoundPredictor(model, 0.6, tta=tta, batch_size=8, device_type="cpu"), batch)
    assert [m.shape for m in bound] == SIZES
    for a, b in zip(expected, bound):
        assert (a != b).mean() < 1e-3


def test_bound_engine_takes_prepared_device_buffers(tiny_onnx: Path, host_batch):
    """DALI's GPU batches arrive as OrtValues already in the model's layout."""
    batch, _ = host_batch
    model = load_model(tiny_onnx, "cpu")
    engine = BoundPredictor(model, 0.5, tta=True, batch_size=8, device_type="cpu")
    x = engine.allocate(batch.pixels.shape, np.uint8)
    x.update_inplace(batch.pixels)
    flipped = ort.OrtValue.ortvalue_from_numpy(np.ascontiguousarray(batch.pixels[:, :, ::-1]), "cpu", 0)
    device_batch = Batch(batch.items, batch.positions, batch.sizes, "dali-mixed", model_input=x, model_input_flipped=flipped)
    for a, b in zip(masks_of(engine, device_batch), masks_of(engine, batch)):
        np.testing.assert_array_equal(a, b)
