"""The host's cost of a photo: read, decode, upsample, encode and write, on one core, as unet-batch's threads do them.

Each photo goes through the runner's own functions (batch.inference.decode's read, header check and Pillow
decode at the model's input size; the writers' post-processing of a photo's scores, ``LowResScores.mask`` and
``confidence``: finite check, upsample and threshold to the photo's size, the mask's confidence;
batch.runs.formats' PNG encoders; batch.core.files' atomic write), one after the other in this thread. The
figure is CPU time (``time.process_time``: the measuring process does nothing else meanwhile), which a
shared machine inflates less than wall time; wall time is recorded beside it.

On a GPU host the network takes little of each photo and these milliseconds bound the throughput: a
host with ``c`` cores can feed at most ``c x 1000 / ms`` photos per second, whatever its GPU.

The low-resolution scores the upsample starts from are those of an ellipse the size of a car in a
studio photo: one smooth outline, like a real car's, so that the upsample and the PNG cost what they
cost on real masks without running a model.
"""

from __future__ import annotations

import statistics
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from batch.core.files import write_atomic
from batch.core.timing import StageClock
from batch.inference.decode import Item, ReadLimits, decode_with_pillow, probe
from batch.inference.postprocess import score_extent, unsure_band
from batch.runs.formats import encode
from benchmarks.config import describe_error

GPU_HOST_CORES = 16  # the GPU host the figure is related to: the cores that decode and write for its GPU
STAGES = ("read", "decode", "upsample", "encode", "write")
FORMATS = ("png", "png1")  # the 8-bit mask (the runner's default) and the 1-bit one


@dataclass(frozen=True)
class HostCostResult:
    status: str  # "ok", "failed"
    reason: str | None = None
    photos: int = 0
    input_size: tuple[int, int] | None = None
    ms_per_photo: dict[str, float] = field(default_factory=dict)  # stage -> median ms of one core; "encode png1" too
    total_ms: float | None = None  # read + decode + upsample + encode (8-bit PNG) + write, medians summed
    total_ms_png1: float | None = None  # the same with the 1-bit PNG
    wall_ms: float | None = None  # median wall time of a photo's whole path (8-bit PNG)
    gpu_host_cores: int = GPU_HOST_CORES
    gpu_host_photos_per_second: float | None = None  # what the host side of such a host feeds at most (8-bit PNG)


def car_scores(size: tuple[int, int]) -> np.ndarray:
    """(h, w) logits of an elliptical car filling the middle of the frame, as a model's output at ``size``."""
    height, width = size
    y, x = np.mgrid[:height, :width].astype(np.float32)
    inside = 1 - ((y - 0.55 * height) / (0.3 * height)) ** 2 - ((x - 0.5 * width) / (0.42 * width)) ** 2
    return 8 * inside  # a steep edge of a few pixels, like a trained model's


def measure_host_cost(photos: list[Path], size: tuple[int, int]) -> HostCostResult:
    """Median CPU milliseconds of each stage over ``photos`` (one untimed pass first: caches, lazy imports)."""
    try:
        with tempfile.TemporaryDirectory(prefix="unet-bench-host-") as scratch:
            scores, row = car_scores(size), np.empty((*size, 3), np.uint8)
            one_photo(photos[0], scores, row, Path(scratch))
            timings = [one_photo(photo, scores, row, Path(scratch)) for photo in photos]
    except Exception as e:  # noqa: BLE001 - a photo the runner would fail: the result says which error
        return HostCostResult(status="failed", reason=describe_error(e), photos=len(photos), input_size=size)
    medians = {stage: statistics.median(t[stage] for t in timings) for stage in timings[0] if stage != "wall"}
    total = sum(medians[stage] for stage in STAGES)
    total_png1 = total - medians["encode"] + medians["encode png1"]
    return HostCostResult(
        status="ok",
        photos=len(photos),
        input_size=size,
        ms_per_photo={stage: round(ms, 3) for stage, ms in medians.items()},
        total_ms=round(total, 3),
        total_ms_png1=round(total_png1, 3),
        wall_ms=round(statistics.median(t["wall"] for t in timings), 3),
        gpu_host_photos_per_second=round(GPU_HOST_CORES * 1000 / total, 1),
    )


def one_photo(photo: Path, scores: np.ndarray, row: np.ndarray, scratch: Path) -> dict[str, float]:
    """CPU ms of each stage for ``photo`` at the size of the model ``scores`` come from (decoded into ``row``, a batch's
    (H, W, 3) row), the 1-bit PNG's encoding ("encode png1"), and the wall ms of the 8-bit path."""
    from batch.inference.model import LowResScores  # it imports onnx: after the suite checked the extras

    clock = StageClock(timer=time.process_time)
    started = time.perf_counter()
    with clock("read"):
        probed = probe((0, Item.from_path(photo)), None, ReadLimits())  # read within limits, header checked
    with clock("decode"):  # into its row of a batch, as the decoder's batches are made
        fitted = decode_with_pillow(probed, scores.shape)
        fitted.place(row)
    extent = score_extent(fitted.content, scores.shape, scores.shape)  # a padded decode: the photo's scores only
    with clock("upsample"):  # the predictor's crop to the photo's scores, then what the writers' "postprocess" does
        prediction = LowResScores(scores, probed.info.size, 0.0, unsure_band(0.5, "logits"), extent)
        mask = prediction.full_mask()  # the outline's cells, interpolated: the mask's pixels or runs follow from them
        prediction.confidence()
    with clock("encode"):
        data = encode("png", mask)  # from the mask's runs, as the writers do
    with clock("write"):
        write_atomic(scratch / "mask.png", data)
    wall = 1e3 * (time.perf_counter() - started)
    with clock("encode png1"):
        encode("png1", mask)  # from its pixels
    return {stage: 1e3 * seconds for stage, seconds in clock.seconds.items()} | {"wall": wall}
