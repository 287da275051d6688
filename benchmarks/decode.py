"""Decode + resize to the model's input size: Pillow (with and without JPEG draft mode) and DALI.

Every decoder reads the same files (from the page cache after the first pass) and produces
(H, W, 3) uint8 RGB at the model's input size. Pillow runs in a thread pool as wide as DALI's
(both release the GIL while decoding), so the comparison is of decoders, not of parallelism.
DALI is the runner's own decoder (:class:`batch.inference.decode.DaliDecoder`: files read and header-checked,
fed to its pipeline one batch at a time, copied out), for the uint8 NHWC input ``unet-export`` writes.
Megapixels/s counts the source photos' pixels: what a decoder had to get through.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from batch.core.contract import ModelContract
from batch.core.images import load_resized_rgb
from batch.inference import runtime
from batch.inference.decode import DaliDecoder, Failure, Item
from benchmarks.config import BenchError, SuiteConfig, describe_error
from benchmarks.machine import Hardware
from benchmarks.timing import Stats, rates, time_calls

log = logging.getLogger(__name__)

DECODERS = {
    "pillow": "Pillow + draft mode",
    "pillow-no-draft": "Pillow, full decode",
    "dali-cpu": "DALI CPU",
    "dali-mixed": "DALI mixed (GPU)",
}


@dataclass(frozen=True)
class DecodeResult:
    decoder: str  # a key of DECODERS
    label: str
    threads: int
    images: int  # photos per timed repeat
    input_size: tuple[int, int]  # (H, W) decoded to
    source_megapixels: float  # mean size of the source photos
    status: str  # "ok", "skipped", "failed"
    reason: str | None = None
    images_per_second: Stats | None = None
    megapixels_per_second: Stats | None = None


@dataclass(frozen=True)
class DecodeJob:
    """What every decoder gets through: the same photos, to the same size, with as many threads."""

    paths: tuple[Path, ...]
    size: tuple[int, int]  # (H, W) of the model input
    threads: int
    megapixels: float  # mean size of the source photos

    def result(
        self, decoder: str, status: str, images: int = 0, reason: str | None = None, seconds: list[float] | None = None
    ) -> DecodeResult:
        """The row of ``decoder``; with ``seconds`` (one per repeat of ``images`` photos), its rates."""
        rate = rates([images] * len(seconds), seconds) if seconds else None
        megapixels = rate.scaled(self.megapixels) if rate else None
        row = (decoder, DECODERS[decoder], self.threads, images, self.size, self.megapixels, status, reason, rate, megapixels)
        return DecodeResult(*row)


def load_resized_rgb_no_draft(path: str | Path, size: tuple[int, int]) -> np.ndarray:
    """Like ``batch.core.images.load_resized_rgb`` but decoding every pixel: what draft mode saves."""
    height, width = size
    with Image.open(path) as im:
        rgb = im.convert("RGB")
        if rgb.size != (width, height):
            rgb = rgb.resize((width, height), Image.Resampling.BILINEAR)
        return np.asarray(rgb)


def source_megapixels(paths: Sequence[Path]) -> float:
    """Mean megapixels of the photos (from their headers; nothing is decoded)."""
    total = 0
    for path in paths:
        with Image.open(path) as im:
            total += im.width * im.height
    return total / len(paths) / 1e6


def pillow_runner(job: DecodeJob, pool: ThreadPoolExecutor, draft: bool) -> Callable[[], list]:
    def decode(path: Path) -> np.ndarray:
        return load_resized_rgb(path, job.size).pixels if draft else load_resized_rgb_no_draft(path, job.size)

    return lambda: list(pool.map(decode, job.paths))


def dali_runner(job: DecodeJob, batch: int, device_id: int | None) -> tuple[Callable[[], None], int]:
    """A function decoding ``len(paths) // batch`` batches with the runner's DALI decoder, and the photo count.

    ``device_id`` None: the CPU decoder; else the mixed (nvJPEG, GPU) decoder with a GPU resize, each
    batch copied into an ONNX Runtime buffer on that GPU, as the runner hands it to inference.
    """

    def on_gpu(shape: tuple[int, ...], dtype) -> object:  # the buffers the runner copies each GPU batch into
        return runtime.onnxruntime().OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, "cuda", device_id)

    allocate = on_gpu if device_id is not None else None
    decoder = DaliDecoder(ModelContract(*job.size), batch, job.threads, device_id, tta=False, allocate=allocate)
    items = [Item.from_path(p) for p in job.paths[: len(job.paths) // batch * batch]]

    def run() -> None:
        for entry in decoder.batches(items):
            if isinstance(entry, Failure):
                raise BenchError(f"DALI could not decode {entry.item.name}: {entry.reason}")
        if decoder.pillow_fallbacks:
            raise BenchError(f"{decoder.pillow_fallbacks} photos went to Pillow, not DALI: use plain RGB JPEGs")

    run.decoder = decoder  # keep the pipeline alive as long as its runner
    return run, len(items)


def bench_decoders(
    paths: Sequence[Path], size: tuple[int, int], suite: SuiteConfig, hardware: Hardware
) -> tuple[list[DecodeResult], np.ndarray]:
    """Measure every decoder; also return the photos decoded by Pillow, (N, H, W, 3) uint8, for inference."""
    job = DecodeJob(tuple(paths), size, hardware.threads, source_megapixels(paths))
    results = []
    with ThreadPoolExecutor(job.threads) as pool:
        decoded = np.stack(pillow_runner(job, pool, draft=True)())  # (N, H, W, 3) uint8
        for decoder, draft in (("pillow", True), ("pillow-no-draft", False)):
            seconds = time_calls(pillow_runner(job, pool, draft), warmup=suite.warmup, repeats=suite.repeats)
            results.append(job.result(decoder, "ok", len(paths), seconds=seconds))
    results += [bench_dali(decoder, job, suite, hardware) for decoder in ("dali-cpu", "dali-mixed")]
    for r in results:
        if r.status == "ok":
            log.info("decode %s: %.1f images/s", r.label, r.images_per_second.median)
    return results, decoded


def bench_dali(decoder: str, job: DecodeJob, suite: SuiteConfig, hardware: Hardware) -> DecodeResult:
    """One DALI decoder (CPU, or mixed on the GPU); a missing GPU or DALI is a recorded skip, a failure a row."""
    if decoder == "dali-mixed" and hardware.device_id is None:
        return job.result(decoder, "skipped", reason="needs a GPU: run with --device cuda")
    try:
        import nvidia.dali  # noqa: F401
    except ImportError as e:
        return job.result(decoder, "skipped", reason=f"nvidia-dali is not installed ({e}): pip install -e '.[gpu]'")
    batch = min(suite.dali_batch, len(job.paths))
    try:
        run, images = dali_runner(job, batch, hardware.device_id if decoder == "dali-mixed" else None)
        seconds = time_calls(run, warmup=max(suite.warmup, 1), repeats=suite.repeats)  # >= 1 warm-up: fills the prefetch queue
    except Exception as e:  # noqa: BLE001 - DALI raises RuntimeError subclasses from C++; record and go on
        log.error("decode %s failed: %s", DECODERS[decoder], e)
        return job.result(decoder, "failed", reason=describe_error(e))
    return job.result(decoder, "ok", images, seconds=seconds)
