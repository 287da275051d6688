"""What ``unet-batch`` is measured against: the naive per-photo loops, and on a GPU the strong PyTorch peer.

The naive loops are what a first script would do, with torch or ONNX Runtime: per photo, a full
Pillow decode, resize, batch of one, logits upsampled to full size, sigmoid, threshold, PNG save.
What ``unet-batch`` gains over them is what batching, decoding at reduced size, overlapping stages
and thresholding before upsampling buy. The peer is what a skilled user would write with PyTorch
alone, with the same inputs, weights and outputs: prefetched file reads, batched nvJPEG decoding,
resize and normalize on the GPU, the U-Net in FP16 channels-last under ``torch.compile`` (batches
padded to one shape, so it never recompiles), upsample and threshold on the GPU, one pinned copy
back, PNG writes in a thread pool. Each loop's first photo (the peer's first batch: compilation,
cuDNN autotuning) is an untimed warm-up.
"""

from __future__ import annotations

import io
import logging
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from batch.core.contract import probability_to_logit
from batch.inference import runtime
from benchmarks.config import describe_error
from benchmarks.inference import model_input
from benchmarks.machine import Hardware
from benchmarks.models import BenchModel
from benchmarks.timing import Stats, rates, summarize

log = logging.getLogger(__name__)

BASELINES = {
    "torch-eager": "torch eager FP32, batch 1 loop",
    "onnxruntime": "ONNX Runtime, batch 1 loop",
}
PEER, PEER_LABEL = "torch-peer", "PyTorch peer: nvJPEG batches, FP16 channels-last, torch.compile"
PNG_COMPRESSION = 1  # zlib level of the peer's masks: fast, as a throughput-minded user would pick


@dataclass(frozen=True)
class BaselineResult:
    baseline: str  # a key of BASELINES, or PEER
    label: str
    status: str  # "ok", "skipped", "failed"
    reason: str | None = None
    device: str | None = None
    model: str | None = None
    images: int = 0  # timed photos (after the warm-up)
    batch_size: int = 1  # photos per network call (the naive loops: one)
    images_per_second: Stats | None = None  # per photo
    seconds_per_image: Stats | None = None


def torch_network(model: BenchModel):
    """The trained network when ``model`` was exported from a checkpoint; else its architecture, seeded random weights."""
    import torch

    from unet.checkpoint import load_checkpoint, model_from_checkpoint
    from unet.model import UNet, UNetConfig

    if model.checkpoint is not None:
        return model_from_checkpoint(load_checkpoint(model.checkpoint))
    torch.manual_seed(model.seed)
    return UNet(UNetConfig.from_dict(model.model_config))


def torch_missing(model: BenchModel, hardware: Hardware, peer: bool = False) -> str | None:
    """Why a torch loop (or with ``peer``, the GPU peer) cannot run here, or None."""
    if peer and hardware.device_id is None:
        return "the PyTorch peer is a GPU pipeline (nvJPEG decoding); it runs with --device cuda"
    try:
        import torch

        if peer:
            import torchvision  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed (pip install -e '.[train]'; the peer also needs torchvision)"
    if model.model_config is None:
        return f"{model.path.name} does not record its model_config, so the torch network cannot be rebuilt"
    if hardware.device_id is not None and not torch.cuda.is_available():
        return "this torch build has no CUDA: a CPU torch loop is no baseline for a GPU run"
    return None


# ---- the naive loops --------------------------------------------------------------------------------


def time_loop(step: Callable[[Path, Path], None], paths: Sequence[Path], out_dir: Path) -> list[float]:
    """Seconds per photo of ``step(photo, mask_path)``; the first photo is an untimed warm-up."""
    step(paths[0], out_dir / "warmup.png")
    seconds = []
    for path in paths[1:]:
        start = time.perf_counter()
        step(path, out_dir / f"{path.stem}.png")
        seconds.append(time.perf_counter() - start)
    return seconds


def torch_step(model: BenchModel, device: str) -> Callable[[Path, Path], None]:
    import torch
    import torch.nn.functional as F

    net = torch_network(model).to(device).eval()
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


def ort_step(model: BenchModel, hardware: Hardware) -> Callable[[Path, Path], None]:
    naive = runtime.onnxruntime().SessionOptions()  # ONNX Runtime's defaults, as a first script has them
    session = runtime.open_session(model.path, hardware.device, naive)
    input_name = session.get_inputs()[0].name
    height, width = model.contract.input_size

    def step(photo: Path, mask_path: Path) -> None:
        image = Image.open(photo).convert("RGB")
        pixels = np.asarray(image.resize((width, height), Image.Resampling.BILINEAR))[None]  # (1, H, W, 3) uint8
        logits = session.run(None, {input_name: model_input(pixels, model, 1)})[0][0, 0]  # (H, W) float32
        full = np.asarray(Image.fromarray(logits, mode="F").resize(image.size, Image.Resampling.BILINEAR))  # (H0, W0)
        mask = 1 / (1 + np.exp(-full)) > 0.5
        Image.fromarray(mask.astype(np.uint8) * 255).save(mask_path)

    return step


def run_baseline(name: str, paths: Sequence[Path], model: BenchModel, hardware: Hardware) -> BaselineResult:
    """Time one naive loop over ``paths`` (the first is a warm-up); a missing dependency is a recorded skip."""
    base = dict(baseline=name, label=BASELINES[name], model=model.name, device=str(hardware.device))
    reason = "needs at least 2 photos (one is a warm-up)" if len(paths) < 2 else None
    if reason is None and name == "torch-eager":
        reason = torch_missing(model, hardware)

    def measure() -> tuple[list[int], list[float]]:
        step = torch_step(model, str(hardware.device)) if name == "torch-eager" else ort_step(model, hardware)
        with tempfile.TemporaryDirectory(prefix="unet-bench-naive-") as out_dir:
            seconds = time_loop(step, paths, Path(out_dir))
        return [1] * len(seconds), seconds

    return measured(base, reason, measure)


def measured(base: dict, reason: str | None, measure: Callable[[], tuple[list[int], list[float]]]) -> BaselineResult:
    """A skip for ``reason``; else the rates of ``measure()`` (photos and seconds of each timing), or its failure."""
    if reason:
        return BaselineResult(status="skipped", reason=reason, **base)
    try:
        photos, seconds = measure()
    except Exception as e:  # noqa: BLE001 - record any failure of a baseline; the suite goes on
        log.error("baseline %s failed: %s", base["label"], describe_error(e))
        return BaselineResult(status="failed", reason=describe_error(e), **base)
    rate, per_image = rates(photos, seconds), summarize([s / n for n, s in zip(photos, seconds)])
    log.info("baseline %s: %.2f images/s", base["label"], rate.median)
    return BaselineResult(status="ok", images=sum(photos), images_per_second=rate, seconds_per_image=per_image, **base)


# ---- the PyTorch peer -------------------------------------------------------------------------------


def encode_png(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a (H, W) uint8 mask: OpenCV when installed (fastest), else Pillow."""
    try:
        import cv2
    except ImportError:
        buffer = io.BytesIO()
        Image.fromarray(mask).save(buffer, format="PNG", compress_level=PNG_COMPRESSION)
        return buffer.getvalue()
    ok, encoded = cv2.imencode(".png", mask, [cv2.IMWRITE_PNG_COMPRESSION, PNG_COMPRESSION])
    if not ok:
        raise RuntimeError("OpenCV could not encode a PNG")
    return encoded.tobytes()


def write_png(path: Path, mask: np.ndarray) -> None:
    path.write_bytes(encode_png(mask))


class TorchPeer:
    """The pipeline, built once (network compiled on the first batch)."""

    def __init__(self, model: BenchModel, hardware: Hardware, batch_size: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", hardware.device_id)
        self.batch_size = batch_size
        self.size = model.contract.input_size  # (h, w)
        self.cut = probability_to_logit(model.contract.threshold)
        self.mean = torch.tensor(model.contract.pixel_mean, device=self.device).view(1, 3, 1, 1) * 255
        self.inv_std = 1 / (torch.tensor(model.contract.pixel_std, device=self.device).view(1, 3, 1, 1) * 255)
        torch.backends.cudnn.benchmark = True
        net = torch_network(model).to(self.device).half().to(memory_format=torch.channels_last).eval()
        self.net = torch.compile(net)
        self.pool = ThreadPoolExecutor(hardware.threads, thread_name_prefix="torch-peer")

    def read(self, paths: Sequence[Path]) -> list:  # encoded JPEGs, as uint8 tensors
        return [self.torch.frombuffer(bytearray(p.read_bytes()), dtype=self.torch.uint8) for p in paths]

    def masks(self, encoded: list) -> np.ndarray:
        """Encoded JPEGs -> (B, H, W) uint8 masks in pinned host memory (all photos of one size)."""
        import torch
        import torch.nn.functional as F
        from torchvision.io import ImageReadMode, decode_jpeg

        with torch.inference_mode():
            images = decode_jpeg(encoded, mode=ImageReadMode.RGB, device=self.device)  # B x (3, H, W) uint8
            full = images[0].shape[1:]
            if any(image.shape[1:] != full for image in images):
                raise ValueError("the peer batches photos of one size (Carvana's are all 1918x1280)")
            x = torch.stack(images).float()  # (B, 3, H, W)
            x = F.interpolate(x, size=self.size, mode="bilinear", antialias=True, align_corners=False)  # (B, 3, h, w)
            x = ((x - self.mean) * self.inv_std).half().contiguous(memory_format=torch.channels_last)
            count = x.shape[0]
            if count < self.batch_size:  # a fixed shape: the compiled graph never recompiles
                x = torch.cat([x, x[-1:].expand(self.batch_size - count, -1, -1, -1)])
            logits = self.net(x)[:count].float()  # (B, 1, h, w)
            logits = F.interpolate(logits, size=tuple(full), mode="bilinear", align_corners=False)  # (B, 1, H, W)
            masks = (logits[:, 0] > self.cut).to(torch.uint8).mul_(255)  # (B, H, W)
            host = torch.empty(masks.shape, dtype=torch.uint8, pin_memory=True)
            host.copy_(masks, non_blocking=True)
            torch.cuda.current_stream(self.device).synchronize()
        return host.numpy()

    def run(self, paths: Sequence[Path], out_dir: Path) -> None:
        """Masks for ``paths`` written into ``out_dir``; returns when every file is on disk."""
        writes: list[Future] = []
        for batch, encoded in self.prefetched(paths):
            for path, mask in zip(batch, self.masks(encoded)):
                writes.append(self.pool.submit(write_png, out_dir / f"{path.stem}.png", mask))
        for write in writes:
            write.result()

    def prefetched(self, paths: Sequence[Path]) -> Iterator[tuple[Sequence[Path], list]]:
        """(paths, encoded tensors) per batch, the next batch's files read while this one runs."""
        batches = [paths[i : i + self.batch_size] for i in range(0, len(paths), self.batch_size)]
        pending = self.pool.submit(self.read, batches[0]) if batches else None
        for i, batch in enumerate(batches):
            encoded = pending.result()
            pending = self.pool.submit(self.read, batches[i + 1]) if i + 1 < len(batches) else None
            yield batch, encoded

    def close(self) -> None:
        self.pool.shutdown(wait=True)


def time_peer(paths: Sequence[Path], model: BenchModel, hardware: Hardware, batch_size: int) -> tuple[list[int], list[float]]:
    """Seconds the peer takes for every photo after the first batch (its warm-up: compilation and autotuning)."""
    peer = TorchPeer(model, hardware, batch_size)
    try:
        with tempfile.TemporaryDirectory(prefix="unet-bench-peer-") as out_dir:
            peer.run(paths[:batch_size], Path(out_dir))
            start = time.perf_counter()
            peer.run(paths[batch_size:], Path(out_dir))
            return [len(paths) - batch_size], [time.perf_counter() - start]
    finally:
        peer.close()


def run_torch_peer(paths: Sequence[Path], model: BenchModel, hardware: Hardware, batch_size: int) -> BaselineResult:
    """Time the peer over ``paths`` (the first batch is the warm-up); a missing dependency is a recorded skip."""
    base = dict(baseline=PEER, label=PEER_LABEL, model=model.name, device=str(hardware.device), batch_size=batch_size)
    reason = torch_missing(model, hardware, peer=True)
    if reason is None and len(paths) <= batch_size:
        reason = f"needs more than one batch of photos ({batch_size}): the first is the warm-up"
    return measured(base, reason, lambda: time_peer(paths, model, hardware, batch_size))
