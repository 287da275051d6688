"""Decode stage: images -> batches of model-sized pixels, with the images that cannot be decoded set aside.

An :class:`Item` is one image to segment: a file to read, the bytes of one already read (the Ray
engine reads them itself), or an image already decoded (a PIL image or an RGB array from Python).
Every :class:`Decoder` turns a stream of items into a stream of :class:`Batch` and :class:`Failure`
entries, each tagged with the items' positions in the input so that the caller can restore its order:

- :class:`PillowDecoder`: a thread pool running :func:`batch.core.images.load_resized_rgb` (JPEG draft
  mode + antialiased bilinear, or padding where a DCT scale lands just short of the model's size: the
  preprocessing training used). Yields host uint8 NHWC pixels and what of each is the photo.
- :class:`DaliDecoder`: NVIDIA DALI, ``"mixed"`` backend (nvJPEG, hardware decoder) on a GPU or
  ``"cpu"`` backend, fed file bytes through ``external_source``. Resizing and the model's own input
  preparation (layout, dtype, normalization, the mirrored copy for TTA) run inside the pipeline, on
  the decode device. Files are read and header-checked first; only plain JPEGs (RGB or grayscale,
  with an end marker) go to DALI, anything else (PNG, CMYK, suspect files, decoded images) to
  Pillow. DALI runs pipelined, a few batches in flight. It fails a whole batch on one bad file and
  may leave its pipeline unusable: the pipeline is restarted, the batch's files are retried one at
  a time, and the ones DALI refuses go to Pillow, which has the last word.
"""

from __future__ import annotations

import ctypes
import errno
import io
import logging
import queue
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from functools import cache, partial
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from PIL import Image

from batch.core.contract import ModelContract
from batch.core.errors import CarvanaError
from batch.core.files import FileRefused, read_regular_file
from batch.core.images import (
    DECODE_ERRORS,
    Fitted,
    ImageError,
    ImageInfo,
    fit_rgb,
    has_jpeg_end,
    load_resized_rgb,
    pillow_message,
    probe_image,
)
from batch.core.logs import first_line

log = logging.getLogger(__name__)

DALI_MODES = ("RGB", "L")  # JPEG colour modes DALI decodes like Pillow; CMYK/YCCK go to Pillow
DALI_IN_FLIGHT = 2  # DALI batches fed and scheduled before the oldest is taken out (its executor's prefetch depth)
DECODED = "decoded"  # ImageInfo.format of an image handed over already decoded
READ_FIXES = {  # errno of a failed read -> what to do about it
    errno.EACCES: "check the file's permissions (the run's user must be able to read it)",
    errno.EPERM: "check the file's permissions (the run's user must be able to read it)",
    errno.ENOENT: "it was moved or deleted after the folder was listed; rerun to retry it",
    errno.ELOOP: "it is a link that points to itself in a loop; replace it by the photo",
    errno.EIO: "the disk or network filesystem failed to read it; check the storage and rerun",
}


@dataclass(frozen=True)
class ReadLimits:
    """Bounds on reading one photo: a hung network filesystem or a huge file costs that photo, never the run."""

    max_bytes: int = 512 * 2**20  # a 100-megapixel JPEG is ~50 MB; more is not a photo to segment
    timeout: float = 60.0  # seconds a read may take before the photo is failed (the thread left behind is a daemon)

    def __post_init__(self) -> None:
        if self.max_bytes < 1 or not self.timeout > 0:
            raise ValueError(f"read limits must be positive, not {self.max_bytes} bytes and {self.timeout} s")


@dataclass(frozen=True, eq=False)
class Item:
    """One image to segment: the name messages call it by, and exactly one of ``path``, ``data``, ``image``."""

    name: str  # a path, a URI, or "image at index 3 of the list": every error about the image starts with it
    path: Path | None = None  # a file to read
    data: bytes | None = None  # the encoded file (JPEG or PNG), already in memory
    image: Image.Image | np.ndarray | None = None  # already decoded: a PIL image, or an (H, W, 3) uint8 RGB array
    tag: Any = None  # the caller's own reference (the folder runner's Job), handed back untouched

    def __post_init__(self) -> None:
        given = [source for source in (self.path, self.data, self.image) if source is not None]
        if len(given) != 1:
            raise ValueError(f"Item {self.name!r} needs exactly one of path, data or image, not {len(given)}")

    @classmethod
    def from_path(cls, path: str | Path, tag: Any = None) -> Item:
        return cls(str(path), path=Path(path), tag=tag)


@dataclass
class Batch:
    """Decoded images ready for inference: either raw host pixels or model-ready input."""

    items: list[Item]
    positions: list[int]  # each item's position in the decoder's input
    sizes: list[tuple[int, int]]  # each image's original (H, W)
    decoder: str  # "pillow", "dali-cpu" or "dali-mixed"
    pixels: np.ndarray | None = None  # (N, H, W, 3) uint8 RGB at the model's size (Pillow)
    model_input: Any = None  # model-ready input (numpy on the host, OrtValue on a GPU, padded to the batch size) (DALI)
    model_input_flipped: Any = None  # the same for the mirrored images (TTA)
    contents: list[tuple[int, int]] | None = None  # each image's (h, w) in the top-left of the model's input; None: all of it

    def __len__(self) -> int:
        return len(self.items)

    def split(self, parts: int) -> list[Batch]:
        """This batch as up to ``parts`` batches of nearly equal size, in order: a CPU runtime's streams each get
        a share, so that the last batch of a run, or a call of a few photos, keeps every stream busy. A batch
        whose input is on a device (DALI's GPU buffers) stays whole."""
        on_device = any(x is not None and not isinstance(x, np.ndarray) for x in (self.model_input, self.model_input_flipped))
        parts = min(parts, len(self))
        if parts <= 1 or on_device:
            return [self]
        bounds = [len(self) * k // parts for k in range(parts + 1)]
        return [self.rows(slice(start, stop)) for start, stop in zip(bounds[:-1], bounds[1:])]

    def rows(self, rows: slice) -> Batch:
        def part(x):
            return None if x is None else x[rows]

        return Batch(
            self.items[rows],
            self.positions[rows],
            self.sizes[rows],
            self.decoder,
            pixels=part(self.pixels),
            model_input=part(self.model_input),
            model_input_flipped=part(self.model_input_flipped),
            contents=part(self.contents),
        )


@dataclass(frozen=True)
class Failure:
    """An item without a mask; ``error``'s message starts with the item's name and says what to do."""

    item: Item
    error: Exception  # ImageError: the image itself; InferenceError (batch.inference.segmenter), DeviceCopyError: its batch
    position: int  # the item's position in the decoder's input

    @property
    def reason(self) -> str:
        """The message without the leading item name (the report lists the name beside it)."""
        return str(self.error).removeprefix(f"{self.item.name}: ")


class Decoder(Protocol):
    """What the inference stage reads from: batches in (near) input order, and failures."""

    name: str  # "pillow", "dali-cpu" or "dali-mixed"
    pillow_fallbacks: int  # images a DALI decoder handed to Pillow (always 0 for Pillow itself)

    def batches(self, items: Iterable[Item]) -> Iterator[Batch | Failure]: ...

    def close(self) -> None: ...


class DecoderError(CarvanaError):
    """A decoder that was asked for and cannot run here; the message says what to install or choose."""


class DeviceCopyError(CarvanaError):
    """A decoded batch that could not be copied into an inference buffer (out of GPU memory, usually); the
    message starts with the image's name. Its batch's images fail with it; the other batches go on."""


@dataclass
class Probed:
    """An item read into memory and header-checked (or an already decoded image, checked)."""

    position: int
    item: Item
    info: ImageInfo
    data: bytes | None = None  # the encoded file
    image: Image.Image | None = None  # the decoded image, for items that came decoded


def probe(entry: tuple[int, Item], max_pixels: int | None, limits: ReadLimits) -> Probed:
    """Read (if needed) and check one item; :class:`ImageError` naming it when it cannot be an image."""
    position, item = entry
    if item.image is not None:
        image = as_pil_image(item)
        return Probed(position, item, ImageInfo(DECODED, image.mode, image.height, image.width), image=image)
    data = item.data if item.data is not None else read_file(item, limits)
    return Probed(position, item, probe_image(data, item.name, max_pixels), data=data)


def read_file(item: Item, limits: ReadLimits) -> bytes:
    """The item's file, read within ``limits``; an :class:`ImageError` saying why and what to do when it cannot be."""
    local = isinstance(item.path, Path)  # else an object in a store (batch.runs.storage.StoredFile)
    read = partial(read_regular_file, item.path, limits.max_bytes) if local else item.path.read_bytes
    try:
        data = call_with_timeout(read, limits.timeout)
    except FileRefused as e:
        raise ImageError(f"{item.name}: {e}; only photo files are segmented: replace it by the photo or remove it") from e
    except TimeoutError as e:
        raise ImageError(
            f"{item.name}: reading did not finish within {limits.timeout:.0f} s (a hung network filesystem?); "
            "check the storage and rerun to retry it"
        ) from e
    except MemoryError as e:
        raise ImageError(f"{item.name}: not enough memory to read it; free memory or remove the file") from e
    except OSError as e:
        fix = READ_FIXES.get(e.errno, "check the file and the storage, then rerun to retry it")
        raise ImageError(f"{item.name}: cannot read ({e.strerror or e}); {fix}") from e
    if not local and len(data) > limits.max_bytes:
        raise ImageError(f"{item.name}: is {len(data) / 2**20:.0f} MiB, more than the {limits.max_bytes / 2**20:.0f} MiB limit")
    return data


def call_with_timeout(fn: Callable[[], Any], seconds: float) -> Any:
    """``fn()`` in one of :data:`TIMED_CALLS`' daemon threads; ``TimeoutError`` when it has not returned within ``seconds``."""
    return TIMED_CALLS.call(fn, seconds)


class TimedCalls:
    """Daemon threads that run calls, each waited on for at most a timeout.

    The thread of a call that never returns (a read stuck in the kernel on a dead NFS server) is left
    behind: being a daemon, it neither holds the run nor keeps the process from exiting, and the next
    call that finds no thread idle starts a new one. Threads are kept between calls (starting one per
    call cost a quarter of a millisecond of CPU a photo).
    """

    def __init__(self) -> None:
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.idle = 0  # threads waiting for a task
        self.lock = threading.Lock()

    def call(self, fn: Callable[[], Any], seconds: float) -> Any:
        outcome: queue.SimpleQueue = queue.SimpleQueue()
        with self.lock:
            start = self.idle == 0
            self.idle -= not start
        if start:
            threading.Thread(target=self.work, name="read", daemon=True).start()
        self.tasks.put((fn, outcome))
        try:
            ok, value = outcome.get(timeout=seconds)
        except queue.Empty:
            raise TimeoutError(f"no result after {seconds} s") from None
        if not ok:
            raise value
        return value

    def work(self) -> None:
        while True:
            fn, outcome = self.tasks.get()
            try:
                outcome.put((True, fn()))
            except BaseException as e:  # noqa: BLE001  (handed to the caller, which re-raises it)
                outcome.put((False, e))
            with self.lock:
                self.idle += 1


TIMED_CALLS = TimedCalls()  # the process's reader threads: one per read in flight, kept for the next


class DaemonPool:
    """A minimal thread pool of daemon threads (``submit`` -> Future): a worker stuck on a file never holds up
    the run's end or the interpreter's exit, which ``ThreadPoolExecutor``'s joined workers would."""

    def __init__(self, workers: int, name: str):
        self.tasks: queue.SimpleQueue = queue.SimpleQueue()
        self.threads = [threading.Thread(target=self.work, name=f"{name}-{i}", daemon=True) for i in range(max(1, workers))]
        for thread in self.threads:
            thread.start()

    def submit(self, fn: Callable, *args: Any) -> Future:
        future: Future = Future()
        self.tasks.put((future, fn, args))
        return future

    def work(self) -> None:
        while (task := self.tasks.get()) is not None:
            future, fn, args = task
            if not future.set_running_or_notify_cancel():
                continue
            try:
                future.set_result(fn(*args))
            except BaseException as e:  # noqa: BLE001  (the future hands it to whoever asks for the result)
                future.set_exception(e)

    def shutdown(self) -> None:
        """Let the workers end once the queued tasks are done; do not wait for them."""
        for _ in self.threads:
            self.tasks.put(None)

    def __enter__(self) -> DaemonPool:
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown()


def as_pil_image(item: Item) -> Image.Image:
    """The item's decoded image as a PIL image; arrays must be (H, W, 3) uint8 RGB."""
    image = item.image
    if isinstance(image, Image.Image):
        return image
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3 or 0 in image.shape:
        raise ImageError(
            f"{item.name}: a {image.dtype} array of shape {image.shape}; pass an (H, W, 3) uint8 RGB array "
            "(or a PIL image, a path, or the encoded bytes); for several images pass a list"
        )
    return Image.fromarray(image)


def decode_with_pillow(probed: Probed, size: tuple[int, int]) -> Fitted:
    """The image at ``size`` (batch.core.images.fit_rgb); :class:`ImageError` with the reason when Pillow cannot decode it."""
    try:
        if probed.image is not None:
            return fit_rgb(probed.image, size)
        fitted = load_resized_rgb(io.BytesIO(probed.data), size)
    except MemoryError as e:
        raise ImageError(f"{probed.item.name}: not enough memory to decode it; free memory or downscale the photo") from e
    except DECODE_ERRORS as e:
        raise ImageError(f"{probed.item.name}: cannot decode {probed.info.format} ({pillow_message(e)}); {decode_fix(e)}") from e
    except Exception as e:  # a decoder bug on one odd file must not stop the run
        log.debug("Pillow failed on %s", probed.item.name, exc_info=True)
        raise ImageError(f"{probed.item.name}: decoder error {type(e).__name__}: {e}") from e
    return fitted


def decode_fix(error: Exception) -> str:
    """What to do about a file Pillow cannot decode."""
    if "truncated" in str(error) or isinstance(error, EOFError):
        return "the file is cut short: copy it again from its source"
    return "re-save it as a plain 8-bit JPEG or PNG"


def ordered_map(pool: DaemonPool, fn: Callable, items: Iterable, window: int) -> Iterator[tuple[Any, Any]]:
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


def probe_all(
    items: Iterable[Item], pool: DaemonPool, window: int, max_pixels: int | None, limits: ReadLimits
) -> Iterator[Probed | Failure]:
    """Every item read and checked in ``pool``, in input order; a :class:`Failure` for those that are not images."""
    checked = partial(probe, max_pixels=max_pixels, limits=limits)
    for (position, item), result in ordered_map(pool, checked, enumerate(items), window):
        yield Failure(item, result, position) if isinstance(result, ImageError) else result


def pillow_batch(probed: list[Probed], pool: DaemonPool, size: tuple[int, int]) -> Iterator[Batch | Failure]:
    """Decode checked items with Pillow; yield a Failure per refused one, then one host batch of the others."""
    decoded = []
    for item, result in ordered_map(pool, partial(decode_with_pillow, size=size), probed, window=len(probed)):
        if isinstance(result, ImageError):
            yield Failure(item.item, result, item.position)
        else:
            decoded.append((item, result))
    if decoded:
        yield host_batch(decoded, "pillow")


def host_batch(decoded: list[tuple[Probed, Fitted]], decoder: str) -> Batch:
    """One batch of images decoded on the host, in the order given: each photo copied once, into its row."""
    height, width = decoded[0][1].size
    pixels = np.empty((len(decoded), height, width, 3), np.uint8)  # (N, H, W, 3)
    for row, (_, fitted) in zip(pixels, decoded):
        fitted.place(row)
    return Batch(
        items=[p.item for p, _ in decoded],
        positions=[p.position for p, _ in decoded],
        sizes=[p.info.size for p, _ in decoded],
        decoder=decoder,
        pixels=pixels,
        contents=[fitted.content for _, fitted in decoded],
    )


@dataclass
class PillowDecoder:
    """CPU decoding with Pillow in ``workers`` threads (Pillow releases the GIL while decoding)."""

    size: tuple[int, int]  # model input (H, W)
    batch_size: int
    workers: int
    max_pixels: int | None = None
    limits: ReadLimits = ReadLimits()
    name: str = field(default="pillow", init=False)
    pillow_fallbacks: int = field(default=0, init=False)  # always 0: there is nothing to fall back from

    def batches(self, items: Iterable[Item]) -> Iterator[Batch | Failure]:
        """Reading, checking and decoding overlap in the pool; batches keep the input order."""
        with DaemonPool(self.workers, "pillow") as pool:
            ready: list[tuple[Probed, Fitted]] = []
            entries = enumerate(items)
            for (position, item), result in ordered_map(pool, self.probe_and_decode, entries, window=2 * self.batch_size):
                if isinstance(result, ImageError):
                    yield Failure(item, result, position)
                    continue
                ready.append(result)
                if len(ready) == self.batch_size:
                    yield host_batch(ready, self.name)
                    ready = []
            if ready:
                yield host_batch(ready, self.name)

    def probe_and_decode(self, entry: tuple[int, Item]) -> tuple[Probed, Fitted]:
        probed = probe(entry, self.max_pixels, self.limits)
        return probed, decode_with_pillow(probed, self.size)

    def close(self) -> None:
        pass


def dali_available() -> bool:
    try:
        import nvidia.dali  # noqa: F401
    except ImportError:
        return False
    return True


def dali_can_decode(probed: Probed) -> bool:
    """Complete upright RGB or grayscale JPEGs go to DALI; PNGs, CMYK/YCCK, suspect JPEGs, photos stored sideways
    (EXIF orientation: Pillow applies it exactly as the masks' size assumes) and decoded images to Pillow."""
    info = probed.info
    return info.format == "JPEG" and info.mode in DALI_MODES and info.orientation == 1 and has_jpeg_end(probed.data)


class DaliDecoder:
    """DALI decoding on ``device_id`` (``"mixed"`` backend) or on the CPU (``device_id=None``).

    The pipeline is pipelined and asynchronous: :data:`DALI_IN_FLIGHT` batches are fed and scheduled
    before the oldest is taken out, so that DALI decodes the next batch (its CPU part, then its GPU
    part) while this thread hands out the last one. It is built and warmed up (codec start-up, the
    executor's prefetch) when the decoder is made.

    ``allocate(shape, numpy dtype)`` returns a buffer to copy each GPU batch into (an ONNX Runtime
    ``OrtValue`` on the same GPU), ``batch_size`` rows whatever the batch's size, so that inference
    sees one shape. The copy (device to device) lets the batch outlive DALI's next runs. A copy
    that fails (out of GPU memory) fails its batch's images, and the other batches go on. CPU
    batches are copied into numpy arrays of their own size.
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
        limits: ReadLimits = ReadLimits(),
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
        self.limits = limits
        self.name = "dali-cpu" if device_id is None else "dali-mixed"
        self.pillow_fallbacks = 0  # files this decoder handed to Pillow (routed there, or refused by DALI)
        self.in_flight: deque[_InFlight] = deque()  # batches fed to DALI and scheduled, oldest first
        self.pipeline = self._start_pipeline()

    # -- the pipeline ---------------------------------------------------------------------------

    def _start_pipeline(self):
        """A new pipeline, built and warmed up; batches in flight in the old one are lost (the caller resubmits them)."""
        self.in_flight.clear()
        pipeline = define_pipeline(self.contract, self.batch_size, self.workers, self.device_id, self.tta)
        pipeline.build()
        # The first schedule_run() of a pipelined executor runs DALI_IN_FLIGHT iterations (its prefetch),
        # each needing its input: one small JPEG each, whose results are dropped. Every later
        # schedule_run() runs one iteration, so a stream of any length can be fed one batch at a time.
        for _ in range(DALI_IN_FLIGHT):
            _feed(pipeline, [warm_up_jpeg()])
        pipeline.schedule_run()
        for _ in range(DALI_IN_FLIGHT):
            pipeline.outputs()
        return pipeline

    def _submit(self, probed: list[Probed]) -> None:
        """Feed one batch and schedule its run; an error is kept for when the batch is taken out."""
        try:
            _feed(self.pipeline, [p.data for p in probed])
            self.pipeline.schedule_run()
        except RuntimeError as e:  # DALI's errors; the pipeline is restarted when this batch comes out
            self.in_flight.append(_InFlight(probed, e))
        else:
            self.in_flight.append(_InFlight(probed))

    def _outputs(self, batch: _InFlight) -> tuple:
        """The oldest batch's outputs (DALI's TensorLists); RuntimeError when DALI failed it."""
        if batch.error is not None:
            raise batch.error
        return self.pipeline.outputs()

    def _copy_out(self, tensor_list) -> Any:
        """One output into a buffer of its own: a CPU TensorList into numpy, a GPU one into ``allocate()``'s (padded)."""
        from nvidia.dali.tensors import TensorListCPU

        sample_shape = tuple(tensor_list.shape()[0])  # uniform: every image is resized to the model size
        dtype = np.dtype(np.float16 if self.contract.input_dtype == "float16" else self.contract.input_dtype)
        if isinstance(tensor_list, TensorListCPU):
            host = np.empty((len(tensor_list), *sample_shape), dtype=dtype)
            tensor_list.copy_to_external(ctypes.c_void_p(host.ctypes.data))
            return host
        buffer = self.allocate((self.batch_size, *sample_shape), dtype)
        tensor_list.copy_to_external(ctypes.c_void_p(buffer.data_ptr()), cuda_stream=None, non_blocking=False)  # waits
        return buffer

    # -- batches ---------------------------------------------------------------------------------

    def batches(self, items: Iterable[Item]) -> Iterator[Batch | Failure]:
        """Plain JPEGs in DALI batches, the rest in Pillow batches, handed out in input order.

        When either group fills, both are queued (the one holding the earlier image first): a DALI
        group is submitted at once, and the oldest queued groups are handed out while DALI has
        :data:`DALI_IN_FLIGHT` batches in flight, so output strays from input order by a few batches at most.
        """
        with DaemonPool(self.workers, "read") as pool:
            queued: deque[tuple[bool, list[Probed]]] = deque()  # (for DALI?, group) in input order
            for_dali: list[Probed] = []
            for_pillow: list[Probed] = []
            try:
                for probed in probe_all(items, pool, 2 * self.batch_size, self.max_pixels, self.limits):
                    if isinstance(probed, Failure):
                        yield probed
                        continue
                    (for_dali if dali_can_decode(probed) else for_pillow).append(probed)
                    if self.batch_size in (len(for_dali), len(for_pillow)):
                        self._queue(for_dali, for_pillow, queued)
                        for_dali, for_pillow = [], []
                        while len(self.in_flight) >= DALI_IN_FLIGHT:
                            yield from self._hand_out(queued.popleft(), pool)
                self._queue(for_dali, for_pillow, queued)
                while queued:
                    yield from self._hand_out(queued.popleft(), pool)
            finally:  # a stream closed early leaves batches in flight, which the next stream must not receive
                self._discard_in_flight()

    def _queue(self, for_dali: list[Probed], for_pillow: list[Probed], queued: deque) -> None:
        groups = sorted([(True, for_dali), (False, for_pillow)], key=lambda g: g[1][0].position if g[1] else -1)
        for to_dali, group in groups:
            if group:
                if to_dali:
                    self._submit(group)
                queued.append((to_dali, group))

    def _hand_out(self, entry: tuple[bool, list[Probed]], pool: DaemonPool) -> Iterator[Batch | Failure]:
        to_dali, group = entry
        yield from self._take_out(pool) if to_dali else self._pillow(group, pool)

    def _take_out(self, pool: DaemonPool) -> Iterator[Batch | Failure]:
        """The oldest DALI batch; when DALI failed it, its files one by one, and Pillow for those DALI refuses.

        A failed pipeline is restarted (it may be unusable); the batches that were in flight behind the
        failed one are submitted again after the retries.
        """
        batch = self.in_flight.popleft()
        try:
            outputs = self._outputs(batch)
        except RuntimeError as e:  # DALI's pipeline errors
            log.debug("DALI failed on a batch of %d (%s); retrying its files one by one", len(batch.probed), first_line(e))
            behind = [waiting.probed for waiting in self.in_flight]
            self.pipeline = self._start_pipeline()
            yield from self._one_by_one(batch.probed, pool)
            for probed in behind:
                self._submit(probed)
            return
        yield from self._hand_over(batch.probed, outputs)

    def _one_by_one(self, probed: list[Probed], pool: DaemonPool) -> Iterator[Batch | Failure]:
        refused = []
        for item in probed:
            self._submit([item])
            try:
                outputs = self._outputs(self.in_flight.popleft())
            except RuntimeError as e:
                log.info("DALI cannot decode %s (%s); trying Pillow", item.item.name, first_line(e))
                self.pipeline = self._start_pipeline()
                refused.append(item)
            else:
                yield from self._hand_over([item], outputs)
        if refused:
            yield from self._pillow(refused, pool)

    def _hand_over(self, probed: list[Probed], outputs: tuple) -> Iterator[Batch | Failure]:
        """A Batch of DALI's outputs, copied out; a Failure per image when the copy fails."""
        try:
            copies = [self._copy_out(out) for out in outputs]
        except Exception as e:  # noqa: BLE001  ONNX Runtime's allocation errors (Fail, RuntimeException) are not RuntimeError
            reason = (
                f"decoded, but its batch of {len(probed)} could not be copied for inference ({first_line(e)}); "
                "a smaller batch size may fit"
            )
            log.debug("copying a DALI batch failed", exc_info=True)
            for p in probed:
                yield Failure(p.item, DeviceCopyError(f"{p.item.name}: {reason}"), p.position)
            return
        yield Batch(
            items=[p.item for p in probed],
            positions=[p.position for p in probed],
            sizes=[p.info.size for p in probed],
            decoder=self.name,
            model_input=copies[0],
            model_input_flipped=copies[1] if self.tta else None,
        )

    def _discard_in_flight(self) -> None:
        while self.in_flight and self.pipeline is not None:
            try:
                self._outputs(self.in_flight.popleft())
            except RuntimeError:
                self.pipeline = self._start_pipeline()

    def _pillow(self, probed: list[Probed], pool: DaemonPool) -> Iterator[Batch | Failure]:
        for entry in pillow_batch(probed, pool, self.contract.input_size):
            if isinstance(entry, Batch):
                self.pillow_fallbacks += len(entry)
            yield entry

    def close(self) -> None:
        self.in_flight.clear()
        self.pipeline = None


@dataclass
class _InFlight:
    """A batch fed to DALI and scheduled, or the error DALI raised when it was."""

    probed: list[Probed]
    error: RuntimeError | None = None


def _feed(pipeline, files: list[bytes]) -> None:
    pipeline.feed_input("encoded", [np.frombuffer(data, dtype=np.uint8) for data in files])


@cache
def warm_up_jpeg() -> bytes:
    """A small grey JPEG that every decoder takes: what a new pipeline's warm-up runs decode."""
    buffer = io.BytesIO()
    Image.new("RGB", (64, 48), (128, 128, 128)).save(buffer, format="JPEG")
    return buffer.getvalue()


def define_pipeline(contract: ModelContract, batch_size: int, workers: int, device_id: int | None, tta: bool):
    """The DALI pipeline, defined and not built: the same graph on the CPU (``device_id`` None) and on a GPU
    (``"mixed"`` decoding, then GPU operators), only the devices differ.

    Read, fed and run by :class:`DaliDecoder`; defining it needs no GPU, so the tests check the GPU
    graph's operators and arguments against the installed DALI.
    """
    from nvidia.dali import fn, pipeline_def, types

    height, width = contract.input_size
    backend = "cpu" if device_id is None else "mixed"

    @pipeline_def(
        batch_size=batch_size,
        num_threads=workers,
        device_id=device_id,
        prefetch_queue_depth=DALI_IN_FLIGHT,
        exec_pipelined=True,
        exec_async=True,
    )
    def segment_input():
        encoded = fn.external_source(name="encoded", dtype=types.UINT8, ndim=1)
        images = fn.decoders.image(encoded, device=backend, output_type=types.RGB, adjust_orientation=False)
        images = fn.resize(images, resize_x=width, resize_y=height, antialias=True, interp_type=types.INTERP_LINEAR)
        outputs = [prepare_in_dali(fn, types, images, contract, mirror=False)]
        if tta:
            outputs.append(prepare_in_dali(fn, types, images, contract, mirror=True))
        return tuple(outputs)

    return segment_input()


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
