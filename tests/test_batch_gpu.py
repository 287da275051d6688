"""The CUDA path: DALI "mixed" decoding, IOBinding, the CUDA provider in a process without torch.

Skipped without a usable GPU; on a GPU host (or with --gpu-host) a skip is a failure (tests/conftest.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO

from batch.cli import main
from batch.core.masks import dice, read_mask
from batch.inference.decode import Batch, Item, dali_available
from batch.inference.model import BoundPredictor, CpuPredictor, load_model

pytestmark = pytest.mark.gpu


def segment(*args: object) -> dict:
    result = CliRunner().invoke(main, ["segment", *map(str, args), "--no-progress"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((Path(str(args[1])) / "report.json").read_text())


# In a fresh process: pytest's own process has imported torch, whose import loads the CUDA and cuDNN
# libraries and so hides an onnxruntime-gpu that cannot find them itself.
FRESH_PROCESS_CHECK = """
import json, sys
sys.modules["torch"] = None  # an import of torch fails
import numpy as np
from batch.inference.decode import Batch, Item
from batch.inference.model import BoundPredictor, load_model
model = load_model(sys.argv[1], "cuda")
pixels = np.random.default_rng(0).integers(0, 256, (3, 64, 96, 3), dtype=np.uint8)
batch = Batch([Item(str(i), image=p) for i, p in enumerate(pixels)], [0, 1, 2], [(96, 144)] * 3, "pillow", pixels=pixels)
masks = [p.mask() for p in BoundPredictor(model, 0.5, tta=False, batch_size=4).predict(batch)]
print(json.dumps({"providers": model.session.get_providers(), "masks": [m.shape for m in masks],
                  "torch": [name for name in sys.modules if name.startswith("torch") and sys.modules[name] is not None]}))
"""


@pytest.mark.usefixtures("cuda_model")  # this process has a usable GPU
def test_cuda_starts_in_a_fresh_process_without_torch(tiny_onnx: Path):
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_CHECK, str(tiny_onnx)], capture_output=True, text=True, env=env, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["providers"][0] == "CUDAExecutionProvider"
    assert report["masks"] == [[96, 144]] * 3 and report["torch"] == []


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
