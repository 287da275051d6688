"""Naive baselines: the per-photo loop a first script would write, with torch and with ONNX Runtime.

For each photo: Pillow open and full decode, resize to the model's input, batch of one through the
network, logits upsampled to the photo's full size, sigmoid, threshold, PNG save; one photo after
another on one thread of control. What ``unet-batch`` gains over these is what batching, decoding
at reduced size, overlapping stages and thresholding before upsampling buy.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from batch.core.devices import Device
from batch.inference import runtime
from benchmarks.errors import describe_error
from benchmarks.inference import model_input
from benchmarks.models import BenchModel
from benchmarks.timing import Stats, rates, summarize

log = logging.getLogger(__name__)

BASELINES = {
    "torch-eager": "torch eager FP32, batch 1 loop",
    "onnxruntime": "ONNX Runtime, batch 1 loop",
}  # the GPU run adds the strong PyTorch peer (benchmarks/torch_peer.py) beside these


@dataclass(frozen=True)
class BaselineResult:
    baseline: str  # a key of BASELINES
    label: str
    status: str  # "ok", "skipped", "failed"
    reason: str | None = None
    device: str | None = None
    model: str | None = None
    images: int = 0  # timed photos (after the warm-up)
    batch_size: int = 1  # photos per network call (the naive loops: one)
    images_per_second: Stats | None = None  # per photo
    seconds_per_image: Stats | None = None


def time_loop(step: Callable[[Path, Path], None], paths: Sequence[Path], out_dir: Path) -> list[float]:
    """Seconds per photo of ``step(photo, mask_path)``; the first photo is an untimed warm-up."""
    step(paths[0], out_dir / "warmup.png")
    seconds = []
    for path in paths[1:]:
        start = time.perf_counter()
        step(path, out_dir / f"{path.stem}.png")
        seconds.append(time.perf_counter() - start)
    return seconds


def torch_step(model: BenchModel, checkpoint: Path | None, device: str, seed: int) -> Callable[[Path, Path], None]:
    import torch
    import torch.nn.functional as F

    net = torch_network(model, checkpoint, seed).to(device).eval()
    height, width = model.contract.input_size
    mean = torch.tensor(model.contract.pixel_mean).view(3, 1, 1)
    std = torch.tensor(model.contract.pixel_std).view(3, 1, 1)

    def step(photo: Path, mask_path: Path) -> None:
        image = Image.open(photo).convert("RGB")
        pixels = np.array(image.resize((width, height), Image.Resampling.BILINEAR))  # (H, W, 3) uint8
        x = ((torch.from_numpy(pixels).permute(2, 0, 1).float() / 255 - mean) / std)[None].to(device)  # (1, 3, H, W)
        with torch.no_grad():
            logits = net(x)  # (1, 1, H, W)
            full = F.interpolate(logits, size=(image.height, image.width), mode="bilinear", align_corners=False)
            mask = (torch.sigmoid(full)[0, 0] > 0.5).cpu().numpy()  # (H0, W0) bool
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)

    return step


def torch_network(model: BenchModel, checkpoint: Path | None, seed: int):
    """The trained network when ``checkpoint`` is given; else the same architecture, seeded random weights."""
    import torch

    from unet.checkpoint import load_checkpoint, model_from_checkpoint
    from unet.model import UNet, UNetConfig

    if checkpoint is not None:
        return model_from_checkpoint(load_checkpoint(checkpoint))
    torch.manual_seed(seed)
    return UNet(UNetConfig.from_dict(model.model_config))


def ort_step(model: BenchModel, device: str, device_id: int | None) -> Callable[[Path, Path], None]:
    naive = runtime.onnxruntime().SessionOptions()  # ONNX Runtime's defaults, as a first script has them
    session = runtime.open_session(model.path, "cpu" if device == "cpu" else Device("cuda", device_id), naive)
    height, width = model.contract.input_size

    def step(photo: Path, mask_path: Path) -> None:
        image = Image.open(photo).convert("RGB")
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))[None]  # (1, H, W, 3) uint8
        logits = session.run(None, {model.input_name: model_input(pixels, model, 1)})[0][0, 0]  # (H, W) float32
        full = np.asarray(Image.fromarray(logits, mode="F").resize(image.size, Image.Resampling.BILINEAR))  # (H0, W0)
        mask = 1 / (1 + np.exp(-full)) > 0.5
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)

    return step


def run_baseline(
    name: str, paths: Sequence[Path], model: BenchModel, *, device: str, device_id: int | None, checkpoint: Path | None, seed: int
) -> BaselineResult:
    """Time one naive loop over ``paths`` (the first is a warm-up); a missing dependency is a recorded skip."""
    torch_device = "cpu" if device == "cpu" else f"cuda:{device_id}"
    base = dict(baseline=name, label=BASELINES[name], model=model.name, device=torch_device if name == "torch-eager" else device)
    if len(paths) < 2:
        return BaselineResult(status="skipped", reason="needs at least 2 photos (one is a warm-up)", **base)
    if name == "torch-eager":
        reason = torch_unavailable(model, device)
        if reason:
            return BaselineResult(status="skipped", reason=reason, **base)
    try:
        step = torch_step(model, checkpoint, torch_device, seed) if name == "torch-eager" else ort_step(model, device, device_id)
        with tempfile.TemporaryDirectory(prefix="unet-bench-naive-") as out_dir:
            seconds = time_loop(step, paths, Path(out_dir))
    except Exception as e:  # noqa: BLE001 - record any failure of a baseline; the suite goes on
        log.error("baseline %s failed: %s", BASELINES[name], describe_error(e))
        return BaselineResult(status="failed", reason=describe_error(e), **base)
    rate = rates([1] * len(seconds), seconds)
    log.info("baseline %s: %.2f images/s", BASELINES[name], rate.median)
    return BaselineResult(status="ok", images=len(seconds), images_per_second=rate, seconds_per_image=summarize(seconds), **base)


def torch_unavailable(model: BenchModel, device: str) -> str | None:
    try:
        import torch
    except ImportError:
        return "torch is not installed (pip install -e '.[train]')"
    if model.model_config is None:
        return f"{model.path.name} does not record its model_config, so the torch network cannot be rebuilt"
    if device != "cpu" and not torch.cuda.is_available():
        return "this torch build has no CUDA: a CPU torch loop is no baseline for a GPU run"
    return None
