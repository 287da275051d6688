"""The Python API: :class:`Segmenter`, the one inference path behind notebooks, ``unet-batch segment`` and the Ray engine.

    from batch import Segmenter

    with Segmenter() as segmenter:                  # the bundled model; the GPU when there is one
        mask = segmenter("car.jpg")                  # (H, W) uint8, 255 = car, at the photo's size
        masks = segmenter(["a.jpg", png_bytes, pil_image, rgb_array])

Every way in goes through :meth:`Segmenter.stream`, the one decode -> infer -> post-process path:

    items -> [decode thread: Pillow pool or DALI] -> queue (2 batches) -> [inference: the runtime's streams] -> (item, prediction)

``__call__`` and :meth:`Segmenter.predict` feed it images held in memory or named by path and
finish the masks in a thread pool; a folder run (:mod:`batch.runs`) feeds it the files of
a folder and hands each prediction to its writers; the Ray engine feeds it the bytes Ray Data read.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from typing import Any, Literal, Self

import numpy as np
from PIL import Image

from batch.core.devices import cpu_count
from batch.core.errors import CarvanaError
from batch.core.logs import first_line
from batch.core.timing import StageClock
from batch.inference.bundled import default_model_path
from batch.inference.config import DEFAULT_BATCH_SIZE, SegmenterConfig, segmenter_options
from batch.inference.decode import (
    Batch,
    DaemonPool,
    DaliDecoder,
    Decoder,
    DecoderError,
    Failure,
    Item,
    PillowDecoder,
    ReadLimits,
    dali_available,
    ordered_map,
)
from batch.inference.model import Model, Prediction, Predictor, load_model, make_predictor

log = logging.getLogger(__name__)

PREFETCH_BATCHES = 2  # decoded batches waiting for inference
STOP_WAIT_SECONDS = 5.0  # how long closing a stream waits for its decode thread before leaving it behind
FAILED_BATCHES_IN_A_ROW = 3  # inference failing this often in a row means the model or device is broken: stop

ImageLike = str | os.PathLike | bytes | bytearray | memoryview | Image.Image | np.ndarray
SINGLE_IMAGE_TYPES = (str, os.PathLike, bytes, bytearray, memoryview, Image.Image, np.ndarray)
MaskOrError = np.ndarray | tuple[np.ndarray, float] | Exception


class InferenceError(CarvanaError):
    """Inference failed: on one batch (its images fail with this error, the others go on), or on several
    batches in a row (the model or device is unusable: raised, the stream stops)."""


class Segmenter:
    """A model opened on a device with its decoder, ready to mask images. Not for two threads at once.

    ``model``: an ONNX file from ``unet-export to-onnx``; None: the bundled model for the device
    (:func:`batch.default_model_path`). ``device``: ``auto`` (the GPU when ONNX Runtime's CUDA provider
    works, else the CPU), ``cpu``, ``cuda``, ``cuda:N``; a GPU asked for and not had raises
    :class:`~batch.core.devices.DeviceError`. ``threshold``: car probability cut (default: the model's).
    ``batch_size``: images per inference (default 32 on a GPU, 8 on the CPU). ``decoder``: ``auto``
    (DALI's nvJPEG on a GPU, Pillow on the CPU), ``dali`` or ``pillow``. ``workers``: decode and
    post-processing threads each; ``threads``: the runtime's (default: this process's CPU cores).
    ``runtime``: what runs the model on the CPU: ``auto`` (the faster of ONNX Runtime and OpenVINO on this CPU
    for this model, measured on first use and cached: :mod:`batch.inference.runtime_choice`), ``onnxruntime``
    or ``openvino``; a GPU always runs ONNX Runtime's CUDA provider.
    ``clock``: where the stage times go (the folder runner's report); a new one by default.

    Raises ``ValueError`` for bad options, :class:`~batch.inference.runtime.ModelError` for a model that cannot be
    used, :class:`FileNotFoundError` when ``model`` is None and the installation has no bundled model,
    :class:`~batch.inference.decode.DecoderError` for ``decoder="dali"`` without DALI.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        device: str = "auto",
        tta: bool = False,
        threshold: float | None = None,
        batch_size: int | None = None,
        decoder: str = "auto",
        workers: int | None = None,
        threads: int | None = None,
        read_timeout: float = SegmenterConfig.read_timeout,
        runtime: str = SegmenterConfig.runtime,
        streams: int | None = None,
        *,
        clock: StageClock | None = None,
    ):
        self.config = SegmenterConfig(
            model=model,
            device=device,
            tta=tta,
            threshold=threshold,
            batch_size=batch_size,
            decoder=decoder,
            workers=workers,
            threads=threads,
            read_timeout=read_timeout,
            runtime=runtime,
            streams=streams,
        )
        self.clock = clock or StageClock()
        self.streaming = threading.Lock()
        self.pool: ThreadPoolExecutor | None = None  # finishes masks for predict(); made on first use
        self.closed = False
        with self.clock("setup"):
            path = self.config.model or default_model_path(self.config.device)
            verbose = logging.getLogger("batch").isEnabledFor(logging.DEBUG)  # -v: ONNX Runtime's warnings too
            self.model: Model = load_model(
                path, self.config.device, self.config.threads, verbose, self.config.runtime, self.config.streams
            )
            self.threshold: float = self.model.contract.threshold if self.config.threshold is None else self.config.threshold
            self.batch_size: int = self.config.batch_size or DEFAULT_BATCH_SIZE["cuda" if self.model.on_gpu else "cpu"]
            self.workers: int = self.config.workers or cpu_count()
            self.predictor: Predictor = make_predictor(self.model, self.threshold, self.config.tta, self.batch_size, self.clock)
            self.decoder: Decoder = make_decoder(self.config, self.model, self.predictor, self.batch_size, self.workers)

    @classmethod
    def from_config(cls, config: SegmenterConfig, clock: StageClock | None = None) -> Segmenter:
        """A Segmenter with the options of ``config`` (a run's :class:`~batch.runs.config.RunConfig` works too)."""
        return cls(**segmenter_options(config), clock=clock)

    @property
    def device(self) -> str:
        """Where the model runs: ``cpu`` or ``cuda:N``."""
        return self.model.device

    @property
    def tta(self) -> bool:
        return self.config.tta

    def describe(self) -> dict:
        """How this Segmenter runs, as report.json records it (the one source of a report's engine fields)."""
        return {
            "device": self.device,
            "provider": self.model.provider,
            "runtime": self.model.describe_runtime(),
            "decoder": self.decoder.name,
            "pillow_fallbacks": self.decoder.pillow_fallbacks,
            "model": self.model.describe(),
            "batch_size": self.batch_size,
            "threshold": self.threshold,
            "tta": self.tta,
            "stages": self.clock.snapshot(),
        }

    def __repr__(self) -> str:
        return (
            f"Segmenter(model={str(self.model.path)!r}, device={self.device!r}, runtime={self.model.runtime.runtime!r}, "
            f"decoder={self.decoder.name!r}, "
            f"batch_size={self.batch_size}, threshold={self.threshold}, tta={self.tta})"
        )

    # -- masks of images in memory or named by path -----------------------------------------------

    def __call__(
        self, images: ImageLike | Iterable[ImageLike], errors: Literal["raise", "return"] = "raise", confidence: bool = False
    ) -> MaskOrError | list[MaskOrError]:
        """The mask of one image, or the list of masks of several, in order: (H, W) uint8, 0 or 255, each at its image's size.

        ``confidence=True``: each entry is ``(mask, confidence)`` instead, the confidence in [0, 1] telling how sure
        the model is of the mask (:func:`batch.inference.postprocess.mask_confidence`; the lowest are the masks to
        check first).

        An image is a path (str or Path), the bytes of a JPEG or PNG file, a PIL image, or an (H, W, 3)
        uint8 RGB array. A file (path or bytes) gets exactly the mask ``unet-batch segment`` writes for it;
        a PIL image or an array is taken as it is (no JPEG draft-mode decoding), so its mask may differ
        from its file's by a few edge pixels. An image that cannot be segmented raises its
        :class:`~batch.core.images.ImageError` (the message names it: its path, or its index in the list);
        with ``errors="return"`` its entry is the error instead and the others are still masked. An
        inference failure (out of memory: lower ``batch_size``) is an :class:`InferenceError` likewise.
        """
        if errors not in ("raise", "return"):
            raise ValueError(f"errors must be 'raise' or 'return', not {errors!r}")
        single = isinstance(images, SINGLE_IMAGE_TYPES)
        listed = [images] if single else list(images)
        names = ["the image"] if single else [f"image at index {i} of the list" for i in range(len(listed))]
        results = self.predict([as_item(image, name) for image, name in zip(listed, names)], confidence)
        if errors == "raise":
            failed = next((result for result in results if isinstance(result, Exception)), None)
            if failed is not None:
                raise failed
        return results[0] if single else results

    def predict(self, items: Iterable[Item], confidence: bool = False) -> list[MaskOrError]:
        """Full-size masks of ``items`` (with ``confidence``: ``(mask, confidence)`` pairs), in order; a failed item's
        entry is its error (ImageError, InferenceError, or the model's NaN scores).

        The masks are finished (upsampled and thresholded) in ``workers`` threads while inference goes on.
        """
        if self.pool is None:
            self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="mask")
        finish = finish_with_confidence if confidence else finish_mask
        pending: list[Future | Exception] = []
        with closing(self.stream(items)) as results:
            for _, result in results:
                pending.append(result.error if isinstance(result, Failure) else self.pool.submit(finish, result))
        return [outcome(entry) for entry in pending]

    # -- the one decode -> infer -> post-process path --------------------------------------------------

    def stream(self, items: Iterable[Item]) -> Iterator[tuple[Item, Prediction | Failure]]:
        """``(item, prediction)`` or ``(item, Failure)`` for every item, in input order, as inference goes.

        Decoding runs in a thread, ahead of inference by at most two batches; inference runs in the
        thread that iterates (or, for a CPU runtime of several streams, that many batches at once in
        threads of its own), and only as fast as it iterates, so a slow consumer (a writer pool that
        is behind) holds everything back and memory stays bounded whatever the number of items.
        ``prediction.mask()`` makes the full-size mask: on the CPU that is the upsampling, left to the
        consumer so that it can run in a pool. A batch whose inference fails fails its items with an
        :class:`InferenceError` and the stream goes on; after three such batches in a row it raises
        the error instead. One stream at a time per Segmenter; close the iterator (or exhaust it)
        before starting another.
        """
        self.check_open()
        if not self.streaming.acquire(blocking=False):
            raise RuntimeError(
                "this Segmenter is already streaming: finish or close that iteration first, or use one Segmenter per thread"
            )
        try:
            with closing(Prefetcher(self.decoder.batches(items), PREFETCH_BATCHES, self.clock, "decode")) as batches:
                yield from in_input_order(self.infer(batches))
        finally:
            self.streaming.release()

    def infer(self, entries: Iterable[Batch | Failure]) -> Iterator[tuple[int, Item, Prediction | Failure]]:
        """(position, item, prediction or Failure) for the decoder's entries, in the order they come."""
        failed_in_a_row = 0
        for entry, outcome in self.predicted(entries):
            if isinstance(entry, Failure):
                yield entry.position, entry.item, entry
                continue
            if isinstance(outcome, Exception):  # onnxruntime's error types; out of memory is the usual one
                failed_in_a_row += 1
                if failed_in_a_row == FAILED_BATCHES_IN_A_ROW:
                    raise InferenceError(
                        f"inference failed on {failed_in_a_row} batches in a row, the last with {first_line(outcome)}; "
                        "stopping (a smaller batch size may fit, or the device is unusable)"
                    ) from outcome
                log.debug("inference failed on a batch of %d", len(entry), exc_info=outcome)
                reason = f"inference failed on its batch of {len(entry)} ({first_line(outcome)}); a smaller batch size may fit"
                for position, item in zip(entry.positions, entry.items):
                    yield position, item, Failure(item, InferenceError(f"{item.name}: {reason}"), position)
                continue
            failed_in_a_row = 0
            yield from zip(entry.positions, entry.items, outcome)

    def predicted(self, entries: Iterable[Batch | Failure]) -> Iterator[tuple[Batch | Failure, Any]]:
        """Each entry with its predictions, or the exception inference raised (None for a Failure), in order.

        The predictor's ``streams`` batches run at once, each in a thread of its own (a CPU runtime's streams:
        :func:`batch.inference.runtime.cpu_streams`), each decoded batch split evenly among them (the last
        batch of a run, or a call of a few photos, would otherwise leave streams idle); one stream runs in
        this thread.
        """
        streams = self.predictor.streams
        if streams == 1:
            yield from ((entry, self.try_predict(entry)) for entry in entries)
            return
        shares = (share for entry in entries for share in (entry.split(streams) if isinstance(entry, Batch) else [entry]))
        with DaemonPool(streams, "infer") as pool:
            yield from ordered_map(pool, self.try_predict, shares, window=streams)

    def try_predict(self, entry: Batch | Failure) -> Sequence[Prediction] | Exception | None:
        if isinstance(entry, Failure):
            return None
        try:
            return self.predictor.predict(entry)
        except Exception as e:  # handed to infer, which fails the batch's items with it
            return e

    # -- lifetime ---------------------------------------------------------------------------------------

    def check_open(self) -> None:
        if self.closed:
            raise RuntimeError("this Segmenter is closed; make a new one")

    def close(self) -> None:
        """Release the decoder (DALI's pipeline) and the threads; the Segmenter cannot be used afterwards."""
        if self.closed:
            return
        self.closed = True
        self.decoder.close()
        if self.pool is not None:
            self.pool.shutdown(wait=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()


def finish_mask(prediction: Prediction) -> np.ndarray:
    return prediction.mask()


def finish_with_confidence(prediction: Prediction) -> tuple[np.ndarray, float]:
    return prediction.mask(), prediction.confidence()


def outcome(entry: Future | Exception) -> Any:
    """A finished entry of :meth:`Segmenter.predict`: its result, or the project's error that kept it from one."""
    if not isinstance(entry, Future):
        return entry
    try:
        return entry.result()
    except CarvanaError as e:
        return e


def as_item(image: ImageLike, name: str) -> Item:
    """An :class:`Item` for one image given to ``Segmenter.__call__``; a path names the image by itself."""
    if isinstance(image, (str, os.PathLike)):
        return Item.from_path(image)
    if isinstance(image, (bytes, bytearray, memoryview)):
        return Item(name, data=bytes(image))
    if isinstance(image, (Image.Image, np.ndarray)):
        return Item(name, image=image)
    raise TypeError(
        f"{name} is a {type(image).__name__}; pass a path, the bytes of a JPEG or PNG file, a PIL image, "
        "or an (H, W, 3) uint8 RGB array"
    )


def make_decoder(config: SegmenterConfig, model: Model, predictor: Predictor, batch_size: int, workers: int) -> Decoder:
    """``auto``: DALI on a GPU (Pillow when DALI is not installed, with a log line), Pillow on the CPU."""
    choice, limits = config.decoder, ReadLimits(timeout=config.read_timeout)
    if choice == "pillow" or (choice == "auto" and not model.on_gpu):
        return PillowDecoder(model.contract.input_size, batch_size, workers, limits=limits)
    if not dali_available():
        if choice == "dali":
            raise DecoderError(
                "decoder dali: NVIDIA DALI is not installed; pip install '.[gpu]', or use the pillow decoder (--decoder pillow)"
            )
        log.info("decoder auto: NVIDIA DALI is not installed, decoding with Pillow on the CPU (pip install '.[gpu]' for nvJPEG)")
        return PillowDecoder(model.contract.input_size, batch_size, workers, limits=limits)
    device_id = model.device_index if model.on_gpu else None
    allocate = predictor.allocate if model.on_gpu else None
    try:
        return DaliDecoder(model.contract, batch_size, workers, device_id, config.tta, allocate=allocate, limits=limits)
    except RuntimeError as e:
        raise DecoderError(
            f"cannot start the DALI decoder on {model.device}: {e}; use the pillow decoder (--decoder pillow)"
        ) from e


def in_input_order(entries: Iterable[tuple[int, Item, Any]]) -> Iterator[tuple[Item, Any]]:
    """(item, result) by position 0, 1, 2, ... from entries that come nearly in order (decoders stray by a batch at most)."""
    waiting: dict[int, tuple[Item, Any]] = {}
    next_position = 0
    for position, item, result in entries:
        waiting[position] = (item, result)
        while next_position in waiting:
            yield waiting.pop(next_position)
            next_position += 1


class Prefetcher:
    """Runs an iterator in a thread, ``depth`` items ahead, timing it as ``stage``; exceptions reach the consumer."""

    DONE = object()

    def __init__(self, source: Iterator, depth: int, clock: StageClock, stage: str):
        self.source, self.clock, self.stage = source, clock, stage
        self.queue: queue.Queue = queue.Queue(maxsize=depth)
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.fill, name=f"{stage}-stage", daemon=True)
        self.thread.start()

    def fill(self) -> None:
        try:
            while not self.stop.is_set():
                start = time.perf_counter()
                item = next(self.source, self.DONE)
                self.clock.add(self.stage, time.perf_counter() - start)
                if not self.put(item) or item is self.DONE:
                    return
        except BaseException as e:  # noqa: BLE001  (handed to the consumer, which re-raises it)
            self.put(e)
        finally:
            close = getattr(self.source, "close", None)
            if close is not None:
                close()

    def put(self, item) -> bool:
        while not self.stop.is_set():
            try:
                self.queue.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> Iterator:
        while True:
            item = self.queue.get()
            if item is self.DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item

    def close(self) -> None:
        """Stop the thread; wait for it a moment only: one stuck in a read that never returns is a daemon, left behind."""
        self.stop.set()
        self.thread.join(timeout=STOP_WAIT_SECONDS)
        if self.thread.is_alive():
            log.warning("the %s stage is stuck (a read that does not return?): leaving it behind", self.stage)
