"""The CUDA path: DALI "mixed" decoding, IOBinding, masks made on the GPU. Skipped without a usable GPU."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from batch.cli import main
from batch.core.devices import DeviceError
from batch.core.masks import dice, read_mask
from batch.inference.decode import Batch, Item, dali_available
from batch.inference.model import BoundPredictor, CpuPredictor, load_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cuda_model(tiny_onnx: Path):
    try:
        return load_model(tiny_onnx, "cuda")
    except DeviceError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")


def segment(*args: object) -> dict:
    result = CliRunner().invoke(main, ["segment", *map(str, args), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((Path(str(args[1])) / "report.json").read_text())


def test_bound_engine_on_the_gpu_matches_the_cpu(cuda_model, tiny_onnx: Path):
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
    items = [Item(f"random {i}", image=image) for i, image in enumerate(pixels)]
    batch = Batch(items, [0, 1, 2], sizes=[(96, 144), (96, 144), (50, 70)], decoder="pillow", pixels=pixels)
    gpu = [p.mask() for p in BoundPredictor(cuda_model, 0.5, tta=True, batch_size=4).predict(batch)]
    cpu = [p.mask() for p in CpuPredictor(load_model(tiny_onnx, "cpu"), 0.5, tta=True).predict(batch)]
    for a, b in zip(gpu, cpu):
        assert a.shape == b.shape and (a != b).mean() < 1e-3


@pytest.mark.dali
@pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed")
@pytest.mark.parametrize("tta", [False, True])
def test_dali_mixed_end_to_end_agrees_with_the_cpu(cuda_model, tiny_onnx: Path, photo_tree: Path, tmp_path: Path, tta: bool):
    extra = ["--tta"] if tta else []
    gpu = segment(photo_tree, tmp_path / "gpu", "--model", tiny_onnx, "--device", "cuda", "--decoder", "dali", *extra)
    cpu = segment(photo_tree, tmp_path / "cpu", "--model", tiny_onnx, "--device", "cpu", *extra)
    assert (gpu["device"], gpu["provider"], gpu["decoder"]) == ("cuda:0", "CUDAExecutionProvider", "dali-mixed")
    assert gpu["processed"] == cpu["processed"] == 7
    assert gpu["pillow_fallbacks"] == 2  # the two PNGs
    for png in (tmp_path / "cpu").rglob("*.png"):
        assert dice(read_mask(png), read_mask(tmp_path / "gpu" / png.relative_to(tmp_path / "cpu"))) > 0.99, png


def test_auto_picks_the_gpu(cuda_model, tiny_onnx: Path, photo_tree: Path, tmp_path: Path):
    report = segment(photo_tree, tmp_path / "out", "--model", tiny_onnx, "--decoder", "pillow")
    assert report["device"] == "cuda:0" and report["batch_size"] == 32
