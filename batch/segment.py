"""``segment``: a folder of photos -> masks, streaming through decode, inference and writer stages.

    discover -> [decode thread] -> bounded queue -> [inference: main thread] -> [writer pool]

The decode thread (Pillow pool or DALI) prepares the next batches while ONNX Runtime runs the
current one; a pool of writers upsamples, encodes and writes finished masks while both go on. The
queue and a cap on pending writes bound memory whatever the folder's size, and the slowest stage
sets the pace. See docs/batch.md for the options, formats, report and exit codes.
"""

from __future__ import annotations

import contextlib
import fcntl
import importlib.metadata
import importlib.resources
import importlib.resources.abc
import logging
import queue
import threading
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from tqdm import tqdm

from batch.decode import Batch, DaliDecoder, Failure, PillowDecoder, dali_available
from batch.engine import (
    BoundEngine,
    CpuEngine,
    DeviceError,
    FinishedMask,
    LowResScores,
    Model,
    ModelError,
    cpu_count,
    load_model,
    parse_device,
)
from batch.formats import FORMATS, PHOTO_FORMATS, encode, remove_stale_temporaries, write_atomic, write_submission
from batch.images import ImageError, load_rgb
from batch.plan import Job, Plan, find_images, make_plan
from batch.report import Report, StageClock

log = logging.getLogger(__name__)

DECODERS = ("auto", "dali", "pillow")
LOCK_NAME = ".unet-batch.lock"
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}


class SegmentError(RuntimeError):
    """A run that cannot start (bad folders, model, device or options); the message says what to fix."""


@dataclass(frozen=True)
class SegmentConfig:
    input_dir: Path
    output_dir: Path
    model: Path | None = None  # ONNX file from unet-export; None: the bundled default model
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    decoder: str = "auto"  # auto | dali | pillow
    batch_size: int | None = None  # None: 32 on a GPU, 8 on the CPU
    threshold: float | None = None  # probability; None: the model's metadata
    tta: bool = False  # average with the prediction for the horizontally flipped photo
    overwrite: bool = False  # redo photos whose outputs exist
    limit: int | None = None  # only the first N photos (sorted)
    report: Path | None = None  # None: OUTPUT_DIR/report.json
    formats: tuple[str, ...] = ("png",)
    workers: int | None = None  # decode and writer threads each; None: CPU cores
    threads: int | None = None  # ONNX Runtime intra-op threads; None: CPU cores
    progress: bool = True
    verbose: bool = False

    def __post_init__(self) -> None:
        object.__setattr__(self, "input_dir", Path(self.input_dir))
        object.__setattr__(self, "output_dir", Path(self.output_dir))
        formats = tuple(dict.fromkeys(self.formats or ("png",)))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
        object.__setattr__(self, "formats", formats)
        try:
            parse_device(self.device)
        except DeviceError as e:
            raise ValueError(str(e)) from e
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {self.decoder!r}")
        for name in ("batch_size", "limit", "workers", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"{name} must be a positive integer, not {value}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, not {self.threshold}")


def segment(config: SegmentConfig) -> Report:
    """Segment every photo under ``config.input_dir``; write outputs and the report; return the report.

    Raises :class:`SegmentError` for anything that prevents the run from starting. Per-photo
    problems never stop it: they are listed in ``report.failed``. On KeyboardInterrupt the finished
    outputs stay, the report is written with ``interrupted: true``, and the interrupt propagates.
    """
    started = time.perf_counter()
    clock = StageClock()
    input_dir, output_dir = check_folders(config.input_dir, config.output_dir)
    with contextlib.ExitStack() as stack:
        stack.enter_context(output_lock(output_dir))
        with clock("discover"):
            plan = discover(input_dir, output_dir, config)
        with clock("setup"):
            stages = set_up(config, stack.enter_context(resolve_model(config.model)), clock)
        log.info(
            "%d photos: %d to segment, %d already done, %d in conflict; %s on %s, decoder %s, batch %d",
            plan.size, len(plan.jobs), len(plan.done), len(plan.conflicts),
            stages.model.path.name, stages.model.device, stages.decoder.name, stages.batch_size,
        )
        remove_stale_temporaries(output_dir)
        make_folders(plan)
        results = Results()
        for job, reason in plan.conflicts:
            results.fail(job, reason)
        interrupted = False
        try:
            run_stages(plan.jobs, stages, results, clock, config.progress)
        except KeyboardInterrupt:
            interrupted = True
        finally:
            stages.decoder.close()
        if "rle" in config.formats:
            with clock("write"):
                write_submission(output_dir, [(job.name, job.outputs["rle"]) for job in plan.all_jobs])
        report = make_report(config, plan, stages, results, clock, time.perf_counter() - started, interrupted)
        report.write(config.report or output_dir / "report.json")
    if interrupted:
        raise KeyboardInterrupt
    return report


@dataclass
class Stages:
    """What set-up resolved: the model on its device, its engine and decoder, and the run's sizes."""

    model: Model
    engine: CpuEngine | BoundEngine
    decoder: PillowDecoder | DaliDecoder
    threshold: float
    batch_size: int
    workers: int


def set_up(config: SegmentConfig, model_path: Path, clock: StageClock) -> Stages:
    model = open_model(model_path, config)
    threshold = config.threshold if config.threshold is not None else model.contract.threshold
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE["cuda" if model.on_gpu else "cpu"]
    workers = config.workers or cpu_count()
    engine = make_engine(model, threshold, config.tta, clock)
    decoder = make_decoder(config.decoder, model, engine, batch_size, workers, config.tta)
    return Stages(model, engine, decoder, threshold, batch_size, workers)


def make_report(
    config: SegmentConfig, plan: Plan, stages: Stages, results: Results, clock: StageClock, seconds: float, interrupted: bool
) -> Report:
    failed = sorted(results.failed, key=lambda failure: failure[0].rel.parts)
    return Report(
        input_dir=str(config.input_dir),
        output_dir=str(config.output_dir),
        inputs=plan.size,
        processed=results.processed,
        skipped=len(plan.done),
        failed=[{"path": str(job.source), "reason": reason} for job, reason in failed],
        seconds=round(seconds, 4),
        images_per_second=round(results.processed / seconds, 3),
        stages=clock.snapshot(),
        device=stages.model.device,
        provider=stages.model.provider,
        decoder=stages.decoder.name,
        pillow_fallbacks=stages.decoder.pillow_fallbacks,
        model=stages.model.describe(),
        batch_size=stages.batch_size,
        formats=list(config.formats),
        threshold=stages.threshold,
        tta=config.tta,
        interrupted=interrupted,
        version=package_version(),
    )


# ---------------------------------------------------------------------------------------------
# Set-up.


def check_folders(input_dir: Path, output_dir: Path) -> tuple[Path, Path]:
    if not input_dir.is_dir():
        what = "is not a folder" if input_dir.exists() else "does not exist"
        raise SegmentError(f"input folder {input_dir} {what}")
    source, target = input_dir.resolve(), output_dir.resolve()
    if source == target:
        raise SegmentError(f"OUTPUT_DIR {output_dir} is the input folder; choose another folder for the masks")
    if source.is_relative_to(target):
        raise SegmentError(
            f"INPUT_DIR {input_dir} lies inside OUTPUT_DIR {output_dir}: masks would land among the photos; "
            "choose an OUTPUT_DIR outside the input folder"
        )
    try:
        output_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise SegmentError(f"cannot create output folder {output_dir}: {e.strerror or e}") from e
    return input_dir, output_dir


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR: two runs writing the same folder would spoil resume."""
    path = output_dir / LOCK_NAME
    try:
        handle = open(path, "a")
    except OSError as e:
        raise SegmentError(f"cannot write to output folder {output_dir}: {e.strerror or e}") from e
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            raise SegmentError(
                f"another unet-batch run is writing to {output_dir}; wait for it to finish or choose another OUTPUT_DIR"
            ) from e
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def discover(input_dir: Path, output_dir: Path, config: SegmentConfig) -> Plan:
    rels = find_images(input_dir, exclude=output_dir)
    if not rels:
        raise SegmentError(f"no .jpg, .jpeg or .png files under {input_dir}")
    if config.limit is not None:
        rels = rels[: config.limit]
    return make_plan(input_dir, output_dir, rels, config.formats, config.overwrite)


@contextlib.contextmanager
def resolve_model(path: Path | None) -> Iterator[Path]:
    """``path`` itself, or the bundled default model (batch/models/default.onnx) when None."""
    if path is not None:
        yield Path(path)
        return
    resource = default_model_resource()
    if not resource.is_file():
        raise SegmentError(
            "no --model given, and this installation has no bundled default model (batch/models/default.onnx); "
            "pass --model PATH to an ONNX file made by `unet-export to-onnx`"
        )
    with importlib.resources.as_file(resource) as file:
        yield file


def default_model_resource() -> importlib.resources.abc.Traversable:
    return importlib.resources.files("batch").joinpath("models", "default.onnx")


def open_model(path: Path, config: SegmentConfig) -> Model:
    try:
        return load_model(path, config.device, threads=config.threads, verbose=config.verbose)
    except (ModelError, DeviceError) as e:
        raise SegmentError(str(e)) from e


def make_engine(model: Model, threshold: float, tta: bool, clock: StageClock) -> CpuEngine | BoundEngine:
    if model.on_gpu:
        return BoundEngine(model, threshold, tta, clock=clock)
    return CpuEngine(model, threshold, tta, clock=clock)


def make_decoder(
    choice: str, model: Model, engine: CpuEngine | BoundEngine, batch_size: int, workers: int, tta: bool
) -> PillowDecoder | DaliDecoder:
    if choice == "pillow" or (choice == "auto" and not model.on_gpu):
        return PillowDecoder(model.contract.input_size, batch_size, workers)
    if not dali_available():
        if choice == "dali":
            raise SegmentError("--decoder dali: NVIDIA DALI is not installed; pip install '.[gpu]' or use --decoder pillow")
        log.info("decoder auto: NVIDIA DALI is not installed, decoding with Pillow on the CPU (pip install '.[gpu]' for nvJPEG)")
        return PillowDecoder(model.contract.input_size, batch_size, workers)
    device_id = model.device_index if model.on_gpu else None
    allocate = engine.allocate if model.on_gpu else None
    try:
        return DaliDecoder(model.contract, batch_size, workers, device_id, tta, allocate=allocate)
    except RuntimeError as e:
        raise SegmentError(f"cannot start the DALI decoder on {model.device}: {e}; use --decoder pillow") from e


def make_folders(plan: Plan) -> None:
    folders = {path.parent for job in plan.jobs for fmt, path in job.outputs.items() if fmt in job.todo}
    for folder in sorted(folders):
        folder.mkdir(parents=True, exist_ok=True)


def package_version() -> str:
    try:
        return importlib.metadata.version("carvana-unet")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# ---------------------------------------------------------------------------------------------
# The stages.


class Results:
    """Counts and failures, updated from writer threads."""

    def __init__(self) -> None:
        self.failed: list[tuple[Job, str]] = []
        self.processed = 0
        self.lock = threading.Lock()

    def done(self, job: Job) -> None:
        with self.lock:
            self.processed += 1

    def fail(self, job: Job, reason: str) -> None:
        """Record a failure; ``reason`` without the file name (a leading "path: " is dropped)."""
        reason = reason.removeprefix(f"{job.source}: ")
        log.warning("failed: %s: %s", job.source, reason)
        with self.lock:
            self.failed.append((job, reason))


class Prefetcher:
    """Runs an iterator in a thread, ``depth`` items ahead, timing it as ``stage``."""

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
        except BaseException as e:  # handed to the consumer, which re-raises it
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
        self.stop.set()
        self.thread.join()


def write_outputs(job: Job, prediction: LowResScores | FinishedMask, clock: StageClock) -> None:
    """Make the full-size mask and write every format still to do (masks first, then photo-based ones)."""
    with clock("postprocess"):
        mask = prediction.mask()  # (H, W) uint8, 0 or 255
    with clock("write"):
        photo = None
        for fmt in sorted(job.todo, key=lambda f: f in PHOTO_FORMATS):
            if fmt in PHOTO_FORMATS and photo is None:
                photo = load_photo(job)
            write_atomic(job.outputs[fmt], encode(fmt, mask, photo))


def load_photo(job: Job) -> Image.Image:
    try:
        return load_rgb(job.source)
    except Exception as e:  # Pillow's many error types: the photo cannot be read at full size
        raise ImageError(f"{job.source}: cannot decode the full-size photo for overlay/cutout ({e})") from e


def run_stages(jobs: list[Job], stages: Stages, results: Results, clock: StageClock, progress: bool) -> None:
    """Stream ``jobs`` through decode (a thread), inference (this thread) and the writer pool."""
    if not jobs:
        return
    pending_writes = threading.BoundedSemaphore(2 * stages.batch_size)
    bar = tqdm(total=len(jobs), unit="img", desc="segment", disable=not progress, dynamic_ncols=True)

    def finished(job: Job, future: Future) -> None:
        pending_writes.release()
        error = future.exception()
        if error is None:
            results.done(job)
        else:
            log.debug("writing %s failed", job.source, exc_info=error)
            results.fail(job, str(error) if isinstance(error, ImageError) else f"cannot write outputs: {error}")
        bar.update(1)

    batches = Prefetcher(stages.decoder.batches(jobs), depth=2, clock=clock, stage="decode")
    writers = ThreadPoolExecutor(stages.workers, thread_name_prefix="write")
    try:
        for item in batches:
            if isinstance(item, Failure):
                results.fail(item.job, item.reason)
                bar.update(1)
                continue
            for job, prediction in zip(item.jobs, predict(stages.engine, item)):
                pending_writes.acquire()
                future = writers.submit(write_outputs, job, prediction, clock)
                future.add_done_callback(lambda f, job=job: finished(job, f))
    finally:  # also on Ctrl-C: masks already predicted are few (bounded) and cheap to finish
        batches.close()
        writers.shutdown(wait=True)
        bar.close()


def predict(engine: CpuEngine | BoundEngine, batch: Batch) -> list[LowResScores] | list[FinishedMask]:
    try:
        return engine.predict(batch)
    except Exception as e:  # onnxruntime's error types; out of memory is the usual one
        raise SegmentError(f"inference failed on a batch of {len(batch)} ({e}); try a smaller --batch-size") from e
