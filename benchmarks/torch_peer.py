"""The strong peer: the PyTorch pipeline a skilled user would write instead of ``unet-batch``, on a CUDA GPU.

Same inputs, same weights, same outputs as the runner (JPEG files in, full-size 8-bit PNG masks on
disk), built the way an expert would with PyTorch alone:

    read files (thread pool, prefetched)
      -> torchvision.io.decode_jpeg(batch, device="cuda")       batched nvJPEG
      -> resize (antialiased bilinear) + normalize on the GPU   (B, 3, h, w) FP16 channels-last
      -> the U-Net, FP16, channels-last, torch.compile          (B, 1, h, w) logits
      -> upsample to the photo's size, threshold on the GPU     (B, H, W) uint8, 0/255
      -> one copy into pinned host memory                       non-blocking, one sync per batch
      -> PNG encode + write (thread pool)

Batches are padded to a fixed size so the compiled graph never recompiles. The first batch
(compilation, cuDNN autotuning) is an untimed warm-up; the timed figure covers every later photo
from the file read to the PNG on disk, with all writes finished.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from batch.core.contract import probability_to_logit
from benchmarks.errors import describe_error
from benchmarks.models import BenchModel
from benchmarks.timing import rates, summarize

log = logging.getLogger(__name__)

NAME = "torch-peer"
LABEL = "PyTorch peer: nvJPEG batches, FP16 channels-last, torch.compile"
PNG_COMPRESSION = 1  # zlib level: fast, as a throughput-minded user would pick


def peer_unavailable(model: BenchModel, device: str) -> str | None:
    """Why the peer cannot run here, or None."""
    if device == "cpu":
        return "the PyTorch peer is a GPU pipeline (nvJPEG decoding); it runs with --device cuda"
    try:
        import torch
        import torchvision  # noqa: F401
    except ImportError as e:
        return f"{e.name} is not installed: the peer needs torch and torchvision with CUDA"
    if not torch.cuda.is_available():
        return "this torch build sees no CUDA GPU"
    if model.model_config is None:
        return f"{model.path.name} does not record its model_config, so the torch network cannot be rebuilt"
    return None


def encode_png(mask: np.ndarray) -> bytes:
    """8-bit grayscale PNG of a (H, W) uint8 mask: OpenCV when installed (fastest), else Pillow."""
    try:
        import cv2
    except ImportError:
        import io

        from PIL import Image

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

    def __init__(self, net, model: BenchModel, device_id: int, batch_size: int, threads: int):
        import torch

        self.torch = torch
        self.device = torch.device("cuda", device_id)
        self.batch_size = batch_size
        self.size = model.contract.input_size  # (h, w)
        self.cut = probability_to_logit(model.contract.threshold)
        mean = torch.tensor(model.contract.pixel_mean, device=self.device).view(1, 3, 1, 1) * 255
        std = torch.tensor(model.contract.pixel_std, device=self.device).view(1, 3, 1, 1) * 255
        self.mean, self.inv_std = mean, 1 / std
        torch.backends.cudnn.benchmark = True
        net = net.to(self.device).half().to(memory_format=torch.channels_last).eval()
        self.net = torch.compile(net)
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="torch-peer")

    def read(self, paths: Sequence[Path]) -> list:
        return [self.torch.frombuffer(bytearray(p.read_bytes()), dtype=self.torch.uint8) for p in paths]

    def masks(self, encoded: list):
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


def time_peer(
    paths: Sequence[Path], model: BenchModel, device_id: int, batch_size: int, checkpoint: Path | None, seed: int, threads: int
) -> tuple[float, Sequence[Path]]:
    """Seconds the peer takes for every photo after the first batch (its warm-up), and those photos."""
    from benchmarks.baselines import torch_network

    peer = TorchPeer(torch_network(model, checkpoint, seed), model, device_id, batch_size, threads)
    try:
        with tempfile.TemporaryDirectory(prefix="unet-bench-peer-") as out_dir:
            peer.run(paths[:batch_size], Path(out_dir))  # warm-up: compilation and autotuning
            timed = paths[batch_size:]
            start = time.perf_counter()
            peer.run(timed, Path(out_dir))
            return time.perf_counter() - start, timed
    finally:
        peer.close()


def run_torch_peer(
    paths: Sequence[Path], model: BenchModel, *, device_id: int, batch_size: int, checkpoint: Path | None, seed: int, threads: int
):
    """Time the peer over ``paths`` (the first batch is the warm-up); a missing dependency is a recorded skip."""
    from benchmarks.baselines import BaselineResult

    base = dict(baseline=NAME, label=LABEL, model=model.name, device=f"cuda:{device_id}", batch_size=batch_size)
    reason = peer_unavailable(model, "cuda")
    if reason is None and len(paths) <= batch_size:
        reason = f"needs more than one batch of photos ({batch_size}): the first is the warm-up"
    if reason:
        return BaselineResult(status="skipped", reason=reason, **base)
    try:
        seconds, timed = time_peer(paths, model, device_id, batch_size, checkpoint, seed, threads)
    except Exception as e:  # noqa: BLE001 - record any failure of the peer; the suite goes on
        log.error("baseline %s failed: %s", LABEL, describe_error(e))
        return BaselineResult(status="failed", reason=describe_error(e), **base)
    rate = rates([len(timed)], [seconds])
    log.info("baseline %s: %.1f images/s", LABEL, rate.median)
    return BaselineResult(
        status="ok", images=len(timed), images_per_second=rate, seconds_per_image=summarize([seconds / len(timed)]), **base
    )
