"""Decode stage: image files -> batches of model-sized pixels, with bad files set aside.

Two decoders yield the same stream of :class:`Batch` and :class:`Failure` items:

- :class:`PillowDecoder`: a thread pool running :func:`batch.images.load_resized_rgb` (JPEG draft
  mode + antialiased bilinear, the preprocessing training used). Yields host uint8 NHWC pixels.
- :class:`DaliDecoder`: NVIDIA DALI, ``"mixed"`` backend (nvJPEG, hardware decoder) on a GPU or
  ``"cpu"`` backend, fed file bytes through ``external_source``. Resizing and the model's own input
  preparation (layout, dtype, normalization, the mirrored copy for TTA) run inside the pipeline, on
  the decode device. Files are read and header-checked first; only plain JPEGs (RGB or grayscale,
  with an end marker) go to DALI, anything else (PNG, CMYK, suspect files) to Pillow. DALI fails a
  whole batch on one bad file and leaves its pipeline unusable: the pipeline is rebuilt, the batch's
  files are retried one at a time, and the ones DALI refuses go to Pillow, which has the last word.
"""

from __future__ import annotations

import ctypes
import io
import logging
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import numpy as np

from batch.contract import ModelContract
from batch.images import DECODE_ERRORS, ImageError, ImageInfo, has_jpeg_end, load_resized_rgb, probe_image

if TYPE_CHECKING:
    from batch.plan import Job

log = logging.getLogger(__name__)

DALI_MODES = ("RGB", "L")  # JPEG colour modes DALI decodes like Pillow; CMYK/YCCK go to Pillow


@dataclass
class Batch:
    """Decoded images ready for inference: either raw host pixels or model-ready input."""

    jobs: list[Job]
    sizes: list[tuple[int, int]]  # each photo's original (H, W)
    decoder: str  # "pillow", "dali-cpu" or "dali-mixed"
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8 RGB at the model's size (Pillow)
    model_input: Any = None  # model-ready input (numpy on the host, OrtValue on a GPU) (DALI)
    model_input_flipped: Any = None  # the same for the mirrored images (TTA)

    def __len__(self) -> int:
        return len(self.jobs)


@dataclass(frozen=True)
class Failure:
    job: Job
    reason: str


@dataclass
class Encoded:
    """A file read into memory and header-checked."""

    job: Job
    data: bytes
    info: ImageInfo


def read_and_probe(job: Job, max_pixels: int | None) -> Encoded:
    try:
        data = job.source.read_bytes()
    except OSError as e:
        raise ImageError(f"{job.source}: cannot read ({e.strerror or e})") from e
    return Encoded(job, data, probe_image(data, job.source, max_pixels))


def decode_with_pillow(encoded: Encoded, size: tuple[int, int]) -> np.ndarray:
    """(H, W, 3) uint8 at ``size``; :class:`ImageError` with the reason when Pillow cannot decode it."""
    try:
        pixels, _ = load_resized_rgb(io.BytesIO(encoded.data), size)
    except DECODE_ERRORS as e:
        raise ImageError(f"{encoded.job.source}: cannot decode {encoded.info.format} ({e})") from e
    except Exception as e:  # a decoder bug on one odd file must not stop the run
        log.debug("Pillow failed on %s", encoded.job.source, exc_info=True)
        raise ImageError(f"{encoded.job.source}: decoder error {type(e).__name__}: {e}") from e
    return pixels


def ordered_map(pool: ThreadPoolExecutor, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Any]]:
    """(item, result or ImageError) in input order, with at most ``window`` calls in flight."""
    pending: deque[tuple[Any, Future]] = deque()

    def pop() -> tuple[Any, Any]:
        item, future = pending.popleft()
        try:
            return item, future.result()
        except ImageError as e:
            return item, e

    for item in items:
        pending.append((item, pool.submit(fn, item)))
        if len(pending) >= window:
            yield pop()
    while pending:
        yield pop()


def pillow_batch(encoded: list[Encoded], pool: ThreadPoolExecutor, size: tuple[int, int]) -> Iterator[Batch | Failure]:
    """Decode already-read files with Pillow; yield one host batch and a Failure per refused file."""
    decoded = []
    for item, result in ordered_map(pool, partial(decode_with_pillow, size=size), encoded, window=len(encoded)):
        if isinstance(result, ImageError):
            yield Failure(item.job, str(result))
        else:
            decoded.append((item, result))
    if decoded:
        yield Batch(
            jobs=[item.job for item, _ in decoded],
            sizes=[item.info.size for item, _ in decoded],
            decoder="pillow",
            pixels=np.stack([pixels for _, pixels in decoded]),  # (N, H, W, 3)
        )


@dataclass
class PillowDecoder:
    """CPU decoding with Pillow in ``workers`` threads (Pillow releases the GIL while decoding)."""

    size: tuple[int, int]  # model input (H, W)
    batch_size: int
    workers: int
    max_pixels: int | None = None
    name: str = field(default="pillow", init=False)
    pillow_fallbacks: int = field(default=0, init=False)  # always 0: there is nothing to fall back from

    def batches(self, jobs: Iterable[Job]) -> Iterator[Batch | Failure]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="pillow") as pool:
            ready: list[Encoded] = []
            pixels: list[np.ndarray] = []
            for job, result in ordered_map(pool, self.read_and_decode, jobs, window=2 * self.batch_size):
                if isinstance(result, ImageError):
                    yield Failure(job, str(result))
                    continue
                ready.append(result[0])
                pixels.append(result[1])
                if len(ready) == self.batch_size:
                    yield self.stack(ready, pixels)
                    ready, pixels = [], []
            if ready:
                yield self.stack(ready, pixels)

    def read_and_decode(self, job: Job) -> tuple[Encoded, np.ndarray]:
        encoded = read_and_probe(job, self.max_pixels)
        return encoded, decode_with_pillow(encoded, self.size)

    def stack(self, encoded: list[Encoded], pixels: list[np.ndarray]) -> Batch:
        return Batch(
            jobs=[e.job for e in encoded],
            sizes=[e.info.size for e in encoded],
            decoder=self.name,
            pixels=np.stack(pixels),  # (N, H, W, 3)
        )

    def close(self) -> None:
        pass


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_can_decode(encoded: Encoded) -> bool:
    """Complete RGB or grayscale JPEGs go to DALI; PNGs, CMYK/YCCK and suspect JPEGs to Pillow."""
    return encoded.info.format == "JPEG" and encoded.info.mode in DALI_MODES and has_jpeg_end(encoded.data)


class DaliDecoder:
    """DALI decoding on ``device_id`` (``"mixed"`` backend) or on the CPU (``device_id=None``).

    ``allocate(shape, numpy dtype)`` returns a buffer to copy each GPU batch into (an ONNX Runtime
    ``OrtValue`` on the same GPU): DALI reuses its output buffers on the next run, and the copy
    (device to device) decouples decoding from inference. CPU batches are copied into numpy arrays.
    """

    def __init__(
        self,
        contract: ModelContract,
        batch_size: int,
        workers: int,
        device_id: int | None,
        tta: bool,
        allocate: Callable[[tuple[int, ...], np.dtype], Any] | None = None,
        max_pixels: int | None = None,
    ):
        if device_id is not None and allocate is None:
            raise ValueError("a GPU DaliDecoder needs an allocate() for device buffers")
        self.contract = contract
        self.batch_size = batch_size
        self.workers = workers
        self.device_id = device_id
        self.tta = tta
        self.allocate = allocate
        self.max_pixels = max_pixels
        self.name = "dali-cpu" if device_id is None else "dali-mixed"
        self.pillow_fallbacks = 0  # files this decoder handed to Pillow (routed there, or refused by DALI)
        self.pipeline = self.build_pipeline()

    # -- the pipeline ---------------------------------------------------------------------------

    def build_pipeline(self):
        from nvidia.dali import fn, pipeline_def, types

        contract, tta = self.contract, self.tta
        height, width = contract.input_size
        backend = "cpu" if self.device_id is None else "mixed"

        @pipeline_def(
            batch_size=self.batch_size,
            num_threads=self.workers,
            device_id=self.device_id,
            prefetch_queue_depth=1,  # synchronous: feed a batch, run, copy out (see class docstring)
            exec_pipelined=False,
            exec_async=False,
        )
        def segment_input():
            encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
            images = fn.decoders.image(encoded, device=backend, output_type=types.RGB, adjust_orientation=False)
            images = fn.resize(images, resize_x=width, resize_y=height, antialias=True, interp_type=types.INTERP_LINEAR)
            outputs = [prepare_in_dali(fn, types, images, contract, mirror=False)]
            if tta:
                outputs.append(prepare_in_dali(fn, types, images, contract, mirror=True))
            return tuple(outputs)

        pipeline = segment_input()
        pipeline.build()
        return pipeline

    def run_pipeline(self, encoded: list[Encoded]) -> tuple[Any, Any]:
        """Decode one batch; (model input, mirrored input or None) in buffers that outlive the pipeline run."""
        self.pipeline.feed_input("encoded", [np.frombuffer(e.data, dtype=np.uint8) for e in encoded])
        outputs = self.pipeline.run()
        copies = [self.copy_out(out) for out in outputs]
        return copies[0], copies[1] if self.tta else None

    def copy_out(self, tensor_list) -> Any:
        shape = (len(tensor_list), *tensor_list.shape()[0])  # uniform: every image is resized to the model size
        dtype = np.dtype(np.float16 if self.contract.input_dtype == "float16" else self.contract.input_dtype)
        if self.device_id is None:
            host = np.empty(shape, dtype=dtype)
            tensor_list.copy_to_external(ctypes.c_void_p(host.ctypes.data))
            return host
        buffer = self.allocate(shape, dtype)
        tensor_list.copy_to_external(ctypes.c_void_p(buffer.data_ptr()), non_blocking=False)  # waits for the copy
        return buffer

    # -- batches ---------------------------------------------------------------------------------

    def batches(self, jobs: Iterable[Job]) -> Iterator[Batch | Failure]:
        with ThreadPoolExecutor(self.workers, thread_name_prefix="read") as pool:
            for_dali: list[Encoded] = []
            for_pillow: list[Encoded] = []
            read = partial(read_and_probe, max_pixels=self.max_pixels)
            for job, result in ordered_map(pool, read, jobs, window=2 * self.batch_size):
                if isinstance(result, ImageError):
                    yield Failure(job, str(result))
                    continue
                (for_dali if dali_can_decode(result) else for_pillow).append(result)
                if len(for_dali) == self.batch_size:
                    yield from self.decode(for_dali, pool)
                    for_dali = []
                if len(for_pillow) == self.batch_size:
                    yield from self.pillow(for_pillow, pool)
                    for_pillow = []
            if for_dali:
                yield from self.decode(for_dali, pool)
            if for_pillow:
                yield from self.pillow(for_pillow, pool)

    def decode(self, encoded: list[Encoded], pool: ThreadPoolExecutor) -> Iterator[Batch | Failure]:
        """One DALI batch; on an error, each file alone, and Pillow for those DALI refuses."""
        try:
            batch = self.dali_batch(encoded)
        except RuntimeError as e:  # DALI's pipeline errors; the pipeline is unusable afterwards
            log.debug("DALI failed on a batch of %d (%s); retrying its files one by one", len(encoded), first_line(e))
            self.pipeline = self.build_pipeline()
        else:
            yield batch
            return
        refused = []
        for item in encoded:
            try:
                single = self.dali_batch([item])
            except RuntimeError as e:
                log.info("DALI cannot decode %s (%s); trying Pillow", item.job.source, first_line(e))
                self.pipeline = self.build_pipeline()
                refused.append(item)
            else:
                yield single
        if refused:
            yield from self.pillow(refused, pool)

    def dali_batch(self, encoded: list[Encoded]) -> Batch:
        model_input, flipped = self.run_pipeline(encoded)
        return Batch(
            jobs=[e.job for e in encoded],
            sizes=[e.info.size for e in encoded],
            decoder=self.name,
            model_input=model_input,
            model_input_flipped=flipped,
        )

    def pillow(self, encoded: list[Encoded], pool: ThreadPoolExecutor) -> Iterator[Batch | Failure]:
        for item in pillow_batch(encoded, pool, self.contract.input_size):
            if isinstance(item, Batch):
                self.pillow_fallbacks += len(item)
            yield item

    def close(self) -> None:
        self.pipeline = None


def prepare_in_dali(fn, types, images, contract: ModelContract, mirror: bool):
    """Images (H, W, 3) uint8 -> the model's input layout and dtype, normalized unless uint8."""
    layout = "HWC" if contract.input_layout == "NHWC" else "CHW"
    if contract.input_dtype == "uint8":
        if layout == "HWC" and not mirror:
            return images
        return fn.crop_mirror_normalize(images, dtype=types.UINT8, output_layout=layout, mirror=int(mirror))
    return fn.crop_mirror_normalize(
        images,
        dtype=types.FLOAT16 if contract.input_dtype == "float16" else types.FLOAT,
        output_layout=layout,
        mean=[255.0 * m for m in contract.pixel_mean],
        std=[255.0 * s for s in contract.pixel_std],
        mirror=int(mirror),
    )


def first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(("Critical error", "Error in", "File ", "which was used", "encountered"))]
    return (useful or lines or [type(error).__name__])[0]
