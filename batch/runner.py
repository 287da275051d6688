"""The folder runner (``unet-batch segment``): photos -> masks on the :class:`~batch.api.Segmenter` stream.

    discover -> Segmenter.stream: [decode thread] -> queue -> [inference: main thread] -> [writer pool]

The Segmenter decodes the next batches while ONNX Runtime runs the current one (see batch/api.py);
a pool of writers upsamples, encodes and writes finished masks while both go on. A cap on pending
writes holds the stream back when the writers fall behind, so memory stays bounded whatever the
folder's size and the slowest stage sets the pace. See docs/batch.md for the options, formats,
report and exit codes.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import Path, PurePosixPath
from typing import Any, TextIO

from PIL import Image
from tqdm import tqdm

from batch.api import InferenceError, Segmenter
from batch.config import SegmentConfig
from batch.decode import DecoderError, Failure, Item
from batch.devices import DeviceError
from batch.engine import Prediction
from batch.formats import PHOTO_FORMATS, encode, write_submission
from batch.images import ImageError, load_rgb
from batch.plan import Job, Plan, make_plan
from batch.report import REPORT_NAME, Report, StageClock
from batch.runtime import ModelError
from batch.storage import LocalFolder, Storage, StorageError, open_location
from batch.version import package_version

log = logging.getLogger(__name__)

LOCK_NAME = ".unet-batch.lock"


class SegmentError(RuntimeError):
    """A run that cannot start (bad folders, model, device or options); the message says what to fix."""


def segment(input_dir: str | Path, output_dir: str | Path, **options: Any) -> Report:
    """``unet-batch segment INPUT_DIR OUTPUT_DIR`` from Python: folders (or URIs) as str or Path.

    ``options`` are :class:`~batch.config.SegmentConfig`'s fields (``model``, ``device``, ``formats``,
    ``tta``, ``overwrite``, ``progress``, ...) with its defaults; a bad one raises ``ValueError`` or
    ``TypeError``. Otherwise as :func:`run`.
    """
    return run(SegmentConfig(input_dir, output_dir, **options))


def run(config: SegmentConfig) -> Report:
    """Segment every photo under ``config.input_dir``; write outputs and the report; return the report.

    Raises :class:`SegmentError` for anything that prevents the run from starting; such a run leaves
    nothing behind (no lock file, no new empty OUTPUT_DIR). Per-photo problems never stop it: they
    are listed in ``report.failed``, and so are the photos of a batch whose inference failed. When
    inference fails on several batches in a row the run stops there, with ``report.stopped`` saying
    why. On KeyboardInterrupt (or SIGTERM turned into one by the CLI) the finished outputs stay, the
    report is written with ``interrupted: true``, and the interrupt propagates.
    """
    started = time.perf_counter()
    clock = StageClock()
    source, output = open_locations(config)
    with clock("discover"):
        inputs = find_inputs(config, source, output)
    with open_segmenter(config, clock) as segmenter, output_folder(output):
        with clock("discover"):
            plan = make_plan(source, output, inputs, config.formats, config.overwrite)
        log.info(
            "%d photos: %d to segment, %d already done, %d in conflict; %s on %s, decoder %s, batch %d",
            plan.size,
            len(plan.jobs),
            len(plan.done),
            len(plan.conflicts),
            segmenter.model.path.name,
            segmenter.device,
            segmenter.decoder.name,
            segmenter.batch_size,
        )
        output.clean()
        results = Results()
        for job, reason in plan.conflicts:
            results.fail(job, reason)
        interruption: KeyboardInterrupt | None = None
        stopped = ""
        try:
            items = [Item(job.source, path=source.file(job.rel), tag=job) for job in plan.jobs]
            write_all(items, segmenter, output, results, config.progress)
        except KeyboardInterrupt as e:
            interruption = e
        except InferenceError as e:
            stopped = str(e)
        interrupted = interruption is not None
        report = finish(
            config, plan, output, clock,
            lambda: make_report(config, plan, segmenter, results, time.perf_counter() - started, interrupted, stopped),
        )  # fmt: skip
    if interruption is not None:
        raise interruption
    return report


def make_report(
    config: SegmentConfig, plan: Plan, segmenter: Segmenter, results: Results, seconds: float, interrupted: bool, stopped: str
) -> Report:
    return run_report(
        config,
        plan,
        results,
        seconds,
        interrupted,
        stopped,
        stages=segmenter.clock.snapshot(),
        device=segmenter.device,
        provider=segmenter.model.provider,
        decoder=segmenter.decoder.name,
        pillow_fallbacks=segmenter.decoder.pillow_fallbacks,
        model=segmenter.model.describe(),
        batch_size=segmenter.batch_size,
        threshold=segmenter.threshold,
        tta=segmenter.tta,
    )


def run_report(
    config: SegmentConfig, plan: Plan, results: Results, seconds: float, interrupted: bool, stopped: str, **engine: Any
) -> Report:
    """The report of a run on either engine: what was asked and what was done, plus ``engine``'s fields
    (the device, model, decoder, stages, ... as the engine saw them)."""
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
        formats=list(config.formats),
        interrupted=interrupted,
        stopped=stopped,
        version=package_version(),
        **engine,
    )


# ---------------------------------------------------------------------------------------------
# Set-up: everything that can refuse the run happens before OUTPUT_DIR is touched.


def open_locations(config: SegmentConfig) -> tuple[Storage, Storage]:
    """INPUT_DIR and OUTPUT_DIR (folders or URIs, batch.storage), checked without creating anything."""
    try:
        source, output = open_location(config.input_dir), open_location(config.output_dir)
        source.check(writable=False)
        output.check(writable=True)
    except StorageError as e:
        raise SegmentError(str(e)) from e
    inside = source.relative_to(output)
    if inside == PurePosixPath("."):
        raise SegmentError(f"OUTPUT_DIR {output} is the input folder; choose another folder for the masks")
    if inside is not None:
        raise SegmentError(
            f"INPUT_DIR {source} lies inside OUTPUT_DIR {output}: masks would land among the photos; "
            "choose an OUTPUT_DIR outside the input folder"
        )
    return source, output


def find_inputs(config: SegmentConfig, source: Storage, output: Storage) -> list[PurePosixPath]:
    """The photos under INPUT_DIR (relative paths, sorted, at most ``limit``; none inside OUTPUT_DIR)."""
    try:
        inputs = source.find_images(exclude=output)
    except StorageError as e:
        raise SegmentError(str(e)) from e
    if not inputs:
        raise SegmentError(f"no .jpg, .jpeg or .png files under {source}")
    return inputs[: config.limit]


@contextlib.contextmanager
def open_segmenter(config: SegmentConfig, clock: StageClock) -> Iterator[Segmenter]:
    """The Segmenter for ``config``; what keeps it from opening is a :class:`SegmentError`."""
    try:
        segmenter = Segmenter.from_config(config, clock)
    except FileNotFoundError as e:  # no bundled model
        raise SegmentError(f"no --model given, and {e}") from e
    except (ModelError, DeviceError, DecoderError) as e:
        raise SegmentError(str(e)) from e
    with segmenter:
        yield segmenter


@contextlib.contextmanager
def output_folder(output: Storage) -> Iterator[None]:
    """OUTPUT_DIR, created if needed and locked for this run; on the way out the lock file goes, and so do
    the folders made here if they are still empty (a run that could not start leaves nothing behind).
    A bucket needs neither (there is no lock: do not point two runs at one prefix)."""
    if not isinstance(output, LocalFolder):
        yield
        return
    output_dir = output.root
    made = missing_folders(output_dir)  # deepest first
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise SegmentError(f"cannot create output folder {output_dir}: {e.strerror or e}") from e
        with output_lock(output_dir):
            yield
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR (two runs writing one folder would spoil resume); the lock file
    ``OUTPUT_DIR/.unet-batch.lock`` exists only while a run holds it."""
    path = output_dir / LOCK_NAME
    handle = take_lock(path)
    with handle:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding the lock: the next run makes a fresh file


def take_lock(path: Path) -> TextIO:
    while True:
        try:
            handle = open(path, "a")  # noqa: SIM115  (returned open, to be held while the run goes)
        except OSError as e:
            raise SegmentError(f"cannot write to output folder {path.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            handle.close()
            raise SegmentError(
                f"another unet-batch run is writing to {path.parent}; wait for it to finish or choose another OUTPUT_DIR"
            ) from e
        if is_same_file(handle, path):
            return handle
        handle.close()  # the run before removed this lock file as this one took it: take the new file


def is_same_file(handle: TextIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), path.stat())
    except FileNotFoundError:
        return False


def make_folders(plan: Plan) -> None:
    folders = {path.parent for job in plan.jobs for fmt, path in job.outputs.items() if fmt in job.todo}
    for folder in sorted(folders):
        folder.mkdir(parents=True, exist_ok=True)


# ---------------------------------------------------------------------------------------------
# The run: the Segmenter's stream into a writer pool.


class Results:
    """Counts and failures, updated from writer threads."""

    def __init__(self) -> None:
        self.failed: list[tuple[Job, str]] = []
        self.processed = 0
        self.lock = threading.Lock()

    def done(self) -> None:
        with self.lock:
            self.processed += 1

    def fail(self, job: Job, reason: str) -> None:
        """Record a failure (the CLI lists them at the end; -v logs each as it happens)."""
        log.debug("failed: %s: %s", job.source, reason)
        with self.lock:
            self.failed.append((job, reason))


def write_all(items: list[Item], segmenter: Segmenter, output: Storage, results: Results, progress: bool) -> None:
    """Stream ``items`` (each tagged with its Job) through the Segmenter (decode thread, inference here)
    into the writer pool, which writes their outputs to ``output``. The Ray engine's actors run this too."""
    if not items:
        return
    pending_writes = threading.BoundedSemaphore(2 * segmenter.batch_size)

    def finished(job: Job, future: Future) -> None:
        pending_writes.release()
        error = future.exception()
        if error is None:
            results.done()
        else:
            log.debug("writing %s failed", job.source, exc_info=error)
            results.fail(
                job,
                str(error).removeprefix(f"{job.source}: ") if isinstance(error, ImageError) else f"cannot write outputs: {error}",
            )
        bar.update(1)

    # Leaving the block (also on Ctrl-C) stops decoding first, then lets the writers finish what was predicted (few, bounded).
    with (
        tqdm(total=len(items), unit="img", desc="segment", disable=not progress, dynamic_ncols=True) as bar,
        ThreadPoolExecutor(segmenter.workers, thread_name_prefix="write") as writers,
        closing(segmenter.stream(items)) as stream,
    ):
        for item, result in stream:
            job = item.tag
            if isinstance(result, Failure):
                results.fail(job, result.reason)
                bar.update(1)
                continue
            pending_writes.acquire()
            future = writers.submit(write_outputs, item, result, output, segmenter.clock)
            future.add_done_callback(lambda f, job=job: finished(job, f))


def write_outputs(item: Item, prediction: Prediction, output: Storage, clock: StageClock) -> None:
    """Make the full-size mask and write every format still to do (masks first, then photo-based ones)."""
    job = item.tag
    with clock("postprocess"):
        mask = prediction.mask()  # (H, W) uint8, 0 or 255
    with clock("write"):
        photo = None
        for fmt in sorted(job.todo, key=lambda f: f in PHOTO_FORMATS):
            if fmt in PHOTO_FORMATS and photo is None:
                photo = load_photo(item)
            output.write(job.outputs[fmt], encode(fmt, mask, photo))


def load_photo(item: Item) -> Image.Image:
    try:
        return load_rgb(io.BytesIO(item.data if item.data is not None else item.path.read_bytes()))
    except Exception as e:  # Pillow's many error types, or the file gone: the photo cannot be read at full size
        raise ImageError(f"{item.name}: cannot decode the full-size photo for overlay/cutout ({e})") from e


def finish(config: SegmentConfig, plan: Plan, output: Storage, clock: StageClock, make_report: Callable[[], Report]) -> Report:
    """What ends a run on either engine: submission.csv from every finished photo's RLE file (--format rle), then
    the report (made after it, so that its time counts) written to report.json."""
    if "rle" in config.formats:
        with clock("write"):
            write_submission(output, [(job.name, job.outputs["rle"]) for job in plan.all_jobs])
    report = make_report()
    write_report(report, config, output)
    return report


def write_report(report: Report, config: SegmentConfig, output: Storage) -> None:
    """report.json into OUTPUT_DIR (a folder or a bucket), or where --report says."""
    if config.report is not None:
        report.write(config.report)
    else:
        output.write(PurePosixPath(REPORT_NAME), report.to_json())
