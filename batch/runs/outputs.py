"""The writing side of a run, shared by both engines: the Segmenter's stream into a pool of writers, the
per-run tally, ``submission.csv`` and ``report.json``.

    Segmenter.stream: [decode thread] -> queue -> [inference: the calling thread] -> [writer pool] -> Storage

A cap on pending writes holds the stream back when the writers fall behind, so memory stays bounded
whatever the number of photos and the slowest stage sets the pace. Every file is written whole or not
at all (:meth:`batch.runs.storage.Storage.write`).
"""

from __future__ import annotations

import csv
import io
import logging
import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import closing
from pathlib import PurePosixPath

from PIL import Image
from tqdm import tqdm

from batch.core.errors import CarvanaError
from batch.core.images import ImageError, load_rgb, pillow_message
from batch.core.timing import StageClock
from batch.inference.decode import Failure, Item, decode_fix
from batch.inference.model import Prediction
from batch.inference.segmenter import Segmenter
from batch.runs.config import RunConfig
from batch.runs.formats import CONFIDENCE_NAME, PHOTO_FORMATS, SUBMISSION_NAME, encode
from batch.runs.plan import Job
from batch.runs.report import REPORT_NAME, Report
from batch.runs.storage import Storage

log = logging.getLogger(__name__)


class Results:
    """Counts and failures, updated from writer threads."""

    def __init__(self) -> None:
        self.failed: list[tuple[Job, str]] = []
        self.processed = 0
        self.confidence: dict[str, float] = {}  # photo (Job.name) -> its mask's confidence
        self.lock = threading.Lock()

    def done(self, job: Job, confidence: float) -> None:
        with self.lock:
            self.processed += 1
            self.confidence[job.name] = confidence

    def fail(self, job: Job, reason: str) -> None:
        """Record a failure (the CLI lists them at the end; -v logs each as it happens)."""
        log.debug("failed: %s: %s", job.source, reason)
        with self.lock:
            self.failed.append((job, reason))


def write_all(items: list[Item], segmenter: Segmenter, output: Storage, results: Results, bar: tqdm | None = None) -> None:
    """Stream ``items`` (each tagged with its Job) through the Segmenter (decode thread, inference here)
    into the writer pool, which writes their outputs to ``output``; ``bar`` counts them. The Ray engine's actors run
    this too."""
    if not items:
        return
    pending_writes = threading.BoundedSemaphore(2 * segmenter.batch_size)

    def finished(job: Job, future: Future) -> None:
        pending_writes.release()
        error = future.exception()
        if error is None:
            results.done(job, future.result())
        else:
            log.debug("writing %s failed", job.source, exc_info=error)
            results.fail(job, _reason_of(job, error))
        if bar is not None:
            bar.update(1)

    # Leaving the block (also on Ctrl-C) stops decoding first, then lets the writers finish what was predicted (few, bounded).
    with (
        ThreadPoolExecutor(segmenter.workers, thread_name_prefix="write") as writers,
        closing(segmenter.stream(items)) as stream,
    ):
        for item, result in stream:
            job = item.tag
            if isinstance(result, Failure):
                results.fail(job, result.reason)
                if bar is not None:
                    bar.update(1)
                continue
            pending_writes.acquire()
            future = writers.submit(_write_outputs, item, result, output, segmenter.clock)
            future.add_done_callback(lambda f, job=job: finished(job, f))


def _reason_of(job: Job, error: BaseException) -> str:
    """Why a photo's outputs were not written, for the report: the project's own message, or the write that failed."""
    if isinstance(error, CarvanaError):
        return str(error).removeprefix(f"{job.source}: ")
    return f"cannot write outputs: {error}; check OUTPUT_DIR's free space and permissions, then rerun"


def _write_outputs(item: Item, prediction: Prediction, output: Storage, clock: StageClock) -> float:
    """Make the full-size mask and write every format still to do (masks first, then photo-based ones); return the
    mask's confidence."""
    job = item.tag
    with clock("postprocess"):
        mask = prediction.full_mask()  # its pixels or runs, made as the formats need them
        confidence = prediction.confidence()
    with clock("write"):
        photo = None
        for fmt in sorted(job.todo, key=lambda f: f in PHOTO_FORMATS):
            if fmt in PHOTO_FORMATS and photo is None:
                photo = _load_photo(item)
            output.write(job.outputs[fmt], encode(fmt, mask, photo))
    return confidence


def _load_photo(item: Item) -> Image.Image:
    try:
        return load_rgb(io.BytesIO(item.data if item.data is not None else item.path.read_bytes()))
    except Exception as e:  # Pillow's many error types, or the file gone: the photo cannot be read at full size
        raise ImageError(
            f"{item.name}: cannot decode the full-size photo for overlay/cutout ({pillow_message(e)}); {decode_fix(e)}"
        ) from e


def write_submission(output: Storage, entries: list[tuple[str, PurePosixPath]]) -> int:
    """Rebuild ``submission.csv`` in ``output`` from the per-image RLE files there; return its row count.

    ``entries``: (img column value, RLE file relative to ``output``) in the order the rows should have;
    those without a file are left out. The CSV is written atomically, so it is always the complete
    list of the masks finished so far.
    """
    rles = output.read_many(rel for _, rel in entries)
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["img", "rle_mask"])
    rows = [(name, rles[rel].decode("ascii")) for name, rel in entries if rel in rles]
    writer.writerows(rows)
    output.write(PurePosixPath(SUBMISSION_NAME), buffer.getvalue().encode("utf-8"))
    return len(rows)


def write_confidence(output: Storage, results: Results) -> dict[str, float]:
    """``confidence.csv`` (``photo,confidence``, a row per photo, sorted) with this run's photos updated in the rows of
    the runs before; return every row. Written whole, like submission.csv."""
    rows = read_confidence(output) | results.confidence
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["photo", "confidence"])
    writer.writerows((photo, "" if math.isnan(value) else f"{value:.4f}") for photo, value in sorted(rows.items()))
    output.write(PurePosixPath(CONFIDENCE_NAME), buffer.getvalue().encode("utf-8"))
    return rows


def read_confidence(output: Storage) -> dict[str, float]:
    """The rows of an earlier run's ``confidence.csv`` (none when it is missing or unreadable: rebuilt from this run's)."""
    data = output.read_many([PurePosixPath(CONFIDENCE_NAME)]).get(PurePosixPath(CONFIDENCE_NAME))
    if data is None:
        return {}
    try:
        rows = list(csv.reader(io.StringIO(data.decode("utf-8"))))[1:]
        return {photo: float(value) if value else math.nan for photo, value in rows}
    except (UnicodeDecodeError, ValueError, csv.Error):
        log.warning("%s is damaged: rebuilding it from this run's photos", output.locate(PurePosixPath(CONFIDENCE_NAME)))
        return {}


def write_report(report: Report, config: RunConfig, output: Storage) -> None:
    """report.json into OUTPUT_DIR (a folder or a bucket), or where --report says."""
    if config.report is not None:
        report.write(config.report)
    else:
        output.write(PurePosixPath(REPORT_NAME), report.to_json())
