"""A run over a folder or a bucket (``unet-batch segment``, :func:`batch.segment`): one skeleton, either engine.

    locations -> inputs -> OUTPUT_DIR locked -> plan (resume, conflicts) -> engine opened -> clean
      -> engine.process(jobs)  [local: this process's Segmenter; ray: actors on a cluster]
      -> submission.csv (--format rle) -> report.json

The engine opens once the plan says how many photos there are to do: ``--engine auto`` chooses with
that number, and a Ray run with nothing to do never starts Ray. A run that cannot start raises
:class:`SegmentError` and leaves nothing behind (an OUTPUT_DIR made for it is removed again, still
empty). Per-photo problems never stop it: they are listed in ``report.failed``, and so are the
photos of a batch whose inference failed. When inference fails on several batches in a row the run
stops there, with ``report.stopped`` saying why. On KeyboardInterrupt
(or SIGTERM turned into one by the CLI) the finished outputs stay, the report is written with
``interrupted: true``, and the interrupt propagates. See docs/batch.md for the options and the report.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from contextlib import AbstractContextManager
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from batch.core.extras import require
from batch.core.images import is_image_file
from batch.core.logs import first_line
from batch.core.timing import StageClock
from batch.core.version import package_version
from batch.inference.segmenter import InferenceError
from batch.runs.config import ENGINES, RAY_PAYS_OFF, ClusterConfig, RunConfig, SegmentError
from batch.runs.lock import Held, output_folder
from batch.runs.manifest import MadeBy, append_history, check_and_record, finish_overwrite
from batch.runs.outputs import Results, read_confidence, write_confidence, write_report, write_submission
from batch.runs.plan import Job, Plan, make_plan
from batch.runs.report import REPORT_NAME, Report, summarize_confidence
from batch.runs.storage import Listing, LocalFolder, Storage, StorageError, open_location

log = logging.getLogger(__name__)


class Engine(Protocol):
    """Where a run's photos are segmented: this process (:mod:`batch.runs._local`) or a Ray cluster
    (:mod:`batch.runs.ray_engine`). The skeleton does everything else."""

    def open(self) -> AbstractContextManager[None]:
        """Load the model (or reach the cluster); what keeps the engine from starting is a :class:`SegmentError`."""

    def summary(self) -> str:
        """How the engine runs, for the run's first log line."""

    def process(self, jobs: list[Job], source: Storage, output: Storage, results: Results, progress: bool) -> None:
        """Segment ``jobs`` from ``source`` into ``output``, counting each in ``results``; an
        :class:`InferenceError` when inference cannot go on; KeyboardInterrupt passes through."""

    def describe(self) -> dict[str, Any]:
        """The report's engine fields (device, provider, decoder, model, stages, batch size, ...)."""

    def model_identity(self) -> tuple[str, str, float]:
        """The model that makes the masks: its path (for messages), its file's SHA-256, the threshold applied."""


def segment(
    input_dir: str | Path, output_dir: str | Path, *, engine: str = "local", cluster: ClusterConfig | None = None, **options: Any
) -> Report:
    """``unet-batch segment INPUT_DIR OUTPUT_DIR`` from Python: folders (or URIs) as str or Path.

    ``options`` are :class:`~batch.runs.config.RunConfig`'s fields (``model``, ``device``, ``formats``,
    ``tta``, ``overwrite``, ``progress``, ...) with its defaults; a bad one raises ``ValueError`` or
    ``TypeError``. ``engine``: ``local``, ``ray`` (``cluster`` says which cluster) or ``auto``. Otherwise as :func:`run`.

    Example:
        >>> report = batch.segment("photos/", "masks/", device="cpu", formats=("png", "rle"))
    """
    return run(RunConfig(input_dir, output_dir, **options), engine, cluster)


def run(config: RunConfig, engine: str | Engine = "local", cluster: ClusterConfig | None = None) -> Report:
    """Segment every photo under ``config.input_dir``; write outputs and the report; return the report.

    ``engine``: ``"local"``, ``"ray"`` (on ``cluster``), ``"auto"`` (:func:`choose_engine`), or an :class:`Engine`
    made by the caller.
    """
    started = time.perf_counter()
    check_engine(engine)
    clock = StageClock()
    source, output = _open_locations(config)
    with clock("discover"):
        inputs = _find_inputs(config, source, output)
    try:
        with output_folder(output) as lock:
            with clock("discover"):
                plan = make_plan(source, output, inputs, config.formats, config.overwrite, read_confidence(output).keys())
            runner = _make_engine(engine, config, cluster, clock, len(plan.jobs))
            with runner.open():
                log.info("%d photos: %d to segment, %d already done, %d refused; %s", plan.size, len(plan.jobs),
                         len(plan.done), len(plan.refused), runner.summary())  # fmt: skip
                output.clean()
                path, sha256, threshold = runner.model_identity()
                made = MadeBy(sha256, path, threshold, config.tta, config.formats)
                check_and_record(output, made, config.overwrite)
                return _process(config, plan, source, output, runner, clock, started, lock)
    except StorageError as e:  # the output location cannot be made or is locked by another run
        raise SegmentError(str(e)) from e


def _process(
    config: RunConfig, plan: Plan, source: Storage, output: Storage, engine: Engine, clock: StageClock, started: float,
    lock: Held,
) -> Report:  # fmt: skip
    """The run proper: the engine segments the jobs; the report is written whatever happens, then an interrupt propagates.
    A bucket lock taken over meanwhile (``lock.lost``) ends it as a failing engine does: ``report.stopped`` says so."""
    results = Results()
    for job, reason in plan.refused:
        results.fail(job, reason)
    interruption: KeyboardInterrupt | None = None
    stopped = ""
    try:
        engine.process(plan.jobs, source, output, results, config.progress)
    except KeyboardInterrupt as e:
        interruption = e
    except InferenceError as e:  # Ray wraps an actor's InferenceError; its ``cause`` is the actor's own
        stopped = first_line(getattr(e, "cause", e))
    except SegmentError as e:  # an engine that could not go on (its workers out of reach): still a report
        stopped = str(e)
    stopped = lock.lost or stopped
    report = _finish(
        config, plan, output, clock, results,
        lambda: _make_report(config, plan, results, time.perf_counter() - started, interruption is not None, stopped,
                            engine.describe()),
    )  # fmt: skip
    if interruption is not None:
        raise interruption
    if config.overwrite and not stopped:
        finish_overwrite(output)
    return report


def _make_engine(
    engine: str | Engine, config: RunConfig, cluster: ClusterConfig | None, clock: StageClock, photos: int
) -> Engine:
    """The engine named (``auto``: :func:`choose_engine`) for ``photos`` photos to segment."""
    if not isinstance(engine, str):
        return engine
    cluster, engine_asked = cluster or ClusterConfig(), engine
    if engine == "auto":
        engine = choose_engine(cluster, photos)
    if engine == "local":
        from batch.runs._local import LocalEngine

        return LocalEngine(config, clock)
    require("ray", "ray", what=f"--engine {engine_asked}")
    from batch.runs.ray_engine import RayEngine  # imports ray: only when asked for

    return RayEngine(config, cluster, clock, photos=photos)


def check_engine(engine: str | Engine) -> None:
    """Refuse an unknown engine name before anything is listed or locked."""
    if isinstance(engine, str) and engine not in ENGINES:
        raise SegmentError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")


def choose_engine(cluster: ClusterConfig, photos: int) -> str:
    """``--engine auto``: Ray when a cluster is named (``--address``, ``RAY_ADDRESS``) and there are enough photos to do
    for its start-up to pay off (:data:`RAY_PAYS_OFF`), else this process. One host's cores or GPU are the local
    engine's to use: Ray adds its start-up and its daemons to the same work (docs/scale-out.md, "Start-up")."""
    address = cluster.named_address
    if not address:
        log.info("--engine auto: local (no Ray cluster named: --address or RAY_ADDRESS)")
        return "local"
    if photos < RAY_PAYS_OFF:
        log.info("--engine auto: local (%d photos to do; Ray's start-up pays off from about %d)", photos, RAY_PAYS_OFF)
        return "local"
    log.info("--engine auto: ray (%d photos to do on the cluster at %s)", photos, address)
    return "ray"


def _make_report(
    config: RunConfig, plan: Plan, results: Results, seconds: float, interrupted: bool, stopped: str, engine: dict[str, Any]
) -> Report:
    """The report of a run: what was asked and what was done, plus the engine's fields (device, model, decoder, stages, ...)."""
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
# Set-up: checked before anything is created.


def _open_locations(config: RunConfig) -> tuple[Storage, Storage]:
    """INPUT_DIR and OUTPUT_DIR (folders or URIs, batch.runs.storage), checked without creating anything."""
    try:
        source, output = open_location(config.input_dir), open_location(config.output_dir)
        source.check(writable=False)
        output.check(writable=True)
    except StorageError as e:
        raise SegmentError(str(e)) from e
    _check_report_path(config, source)
    inside = source.relative_to(output)
    if inside == PurePosixPath("."):
        raise SegmentError(f"OUTPUT_DIR {output} is the input folder; choose another folder for the masks")
    if inside is not None:
        raise SegmentError(
            f"INPUT_DIR {source} lies inside OUTPUT_DIR {output}: masks would land among the photos; "
            "choose an OUTPUT_DIR outside the input folder"
        )
    return source, output


def _check_report_path(config: RunConfig, source: Storage) -> None:
    """``--report`` must be writable, and never a photo or a file among the photos: checked before any work."""
    if config.report is None:
        return
    path = config.report.resolve()
    if LocalFolder(path.parent).relative_to(source) is not None:
        raise SegmentError(f"--report {config.report} lies in the input folder {source}: choose a path outside it")
    if path.exists() and (is_image_file(path) or not path.is_file()):
        raise SegmentError(f"--report {config.report} is a photo or not a file: choose a new .json path")
    existing = next(folder for folder in (path.parent, *path.parents) if folder.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise SegmentError(f"--report {config.report} cannot be written: {existing} is not a writable folder")


def _find_inputs(config: RunConfig, source: Storage, output: Storage) -> Listing:
    """The photos under INPUT_DIR (sorted, at most ``limit``; none inside OUTPUT_DIR), and the entries skipped."""
    try:
        listing = source.find_images(exclude=output)
    except StorageError as e:
        raise SegmentError(str(e)) from e
    if not listing.images and not listing.skipped:
        raise SegmentError(f"no .jpg, .jpeg or .png files under {source}")
    return Listing(listing.images[: config.limit], listing.skipped)


def _finish(
    config: RunConfig, plan: Plan, output: Storage, clock: StageClock, results: Results, report: Callable[[], Report]
) -> Report:
    """What ends a run: submission.csv from every finished photo's RLE file (--format rle), confidence.csv, then the
    report (made after them, so that their time counts) written to report.json."""
    with clock("write"):
        if "rle" in config.formats:
            write_submission(output, [(job.name, job.outputs["rle"]) for job in plan.all_jobs])
        confidence = write_confidence(output, results) if results.confidence or plan.done else {}
    made = report()
    made.confidence = summarize_confidence(confidence)
    did_work = bool(plan.jobs) or config.report is not None or not output.existing([PurePosixPath(REPORT_NAME)])
    try:
        append_history(output, made)
        if did_work:  # a rerun with nothing to do keeps the report of the run that did the work
            write_report(made, config, output)
    except OSError as e:  # a full disk, a bucket gone: the caller still gets the report, failures and all
        made.report_error = f"cannot write the report to {config.report_path} ({e.strerror or e})"
        log.error("%s; the failed photos are listed below", made.report_error)
    return made
