"""``unet-batch``: segment folders of car photos with an exported U-Net, and score the masks.

Exit codes: 0 everything succeeded; 1 some photos failed, or inference stopped the run (the rest are
done; see report.json); 2 usage errors (missing input folder, bad model file, unusable device,
unwritable output, a missing extra); 130 interrupted (Ctrl-C); 143 terminated (SIGTERM). The
libraries (ONNX Runtime, the runner) are imported inside the commands, so ``--help`` needs none.
"""

from __future__ import annotations

import contextlib
import functools
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from batch.clitypes import DEVICE, LOCATION, InputError, setup_logging, version_option
from batch.config import DECODERS, SegmentConfig, defaults
from batch.devices import cpu_count
from batch.evaluation import EvaluationError, evaluate, write_csv, write_error_maps
from batch.extras import require
from batch.formats import FORMATS

SHOWN_FAILURES = 10
ENGINES = ("local", "ray")
INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM
SEGMENT = defaults(SegmentConfig)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops the way Ctrl-C stops it."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@version_option
def main() -> None:
    """Segment car photos with an exported U-Net (ONNX Runtime; no torch needed)."""


@main.command("segment")
@click.argument("input_dir", type=LOCATION)
@click.argument("output_dir", type=LOCATION)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ONNX file from `unet-export to-onnx` [default: the bundled model]",
)
@click.option(
    "--device", type=DEVICE, default=SEGMENT["device"], help="auto: the GPU when ONNX Runtime's CUDA provider works, else the CPU"
)
@click.option(
    "--decoder", type=click.Choice(DECODERS), default=SEGMENT["decoder"], help="auto: DALI (nvJPEG) on a GPU, Pillow on the CPU"
)
@click.option("--batch-size", type=click.IntRange(min=1), help="photos per inference batch [default: 32 on a GPU, 8 on the CPU]")
@click.option(
    "--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="car probability cut [default: the model's]"
)
@click.option(
    "--tta", is_flag=True, default=SEGMENT["tta"], help="average with the prediction for the mirrored photo (2x the inference)"
)
@click.option(
    "--overwrite", is_flag=True, default=SEGMENT["overwrite"], help="redo photos whose outputs exist (default: skip them)"
)
@click.option("--limit", type=click.IntRange(min=1), help="only the first N photos (sorted by path)")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="report file [default: OUTPUT_DIR/report.json]")
@click.option(
    "--format",
    "formats",
    type=click.Choice(FORMATS),
    multiple=True,
    default=SEGMENT["formats"],
    help="output format; repeat for several. Only the formats named are written: `--format overlay` alone writes "
    "no mask (add `--format png`)",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    help="local: this process; ray: inference actors on a Ray cluster (the 'ray' extra; docs/scale-out.md)",
)
@click.option(
    "--address", help="--engine ray: the Ray cluster [default: $RAY_ADDRESS, else a local Ray using every GPU and core here]"
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help=f"local engine: decode and writer threads each [default: CPU cores, {cpu_count()} here]; --engine ray: inference "
    "actors [default: one per GPU, else one per node]",
)
@click.option("--threads", type=click.IntRange(min=1), help=f"ONNX Runtime threads [default: CPU cores, {cpu_count()} here]")
@click.option("--progress/--no-progress", default=SEGMENT["progress"], help="progress bar on stderr")
@click.option("-v", "--verbose", is_flag=True, help="debug logging, and each failed photo as it fails")
def segment_command(input_dir: Path | str, output_dir: Path | str, engine: str, address: str | None, verbose: bool,
                    **options) -> None:  # fmt: skip
    """Write a mask for every .jpg/.jpeg/.png under INPUT_DIR into OUTPUT_DIR (same tree); either may
    be a URI such as s3://bucket/prefix.

    Rerunning the same command finishes only what is missing. Failed photos are listed at the end
    and in the report, with the reason; the run goes on without them.
    """
    for module in ("onnxruntime", "onnx"):
        require(module, "cpu", what="unet-batch segment")
    from batch.runner import SegmentError, run

    if engine == "ray":
        require("ray", "ray", what="--engine ray")
        from batch.ray_engine import ClusterConfig, segment_on_ray

        cluster = ClusterConfig(address=address, workers=options.pop("workers"))
        run = functools.partial(segment_on_ray, cluster=cluster)  # the same contract as the local engine's
    try:
        config = SegmentConfig(input_dir=input_dir, output_dir=output_dir, **options)
    except ValueError as e:
        raise InputError(str(e)) from e
    with setup_logging(verbose), sigterm_as_interrupt():
        try:
            report = run(config)
        except SegmentError as e:
            raise InputError(str(e)) from e
        except KeyboardInterrupt as e:
            click.echo("interrupted: finished masks are kept; rerun the same command to do the rest", err=True)
            raise SystemExit(TERMINATED if isinstance(e, Terminated) else INTERRUPTED) from None
    click.echo(report.summary())
    for failure in report.failed[:SHOWN_FAILURES]:
        click.echo(f"  {failure['path']}: {failure['reason']}", err=True)
    if len(report.failed) > SHOWN_FAILURES:
        click.echo(f"  ... and {len(report.failed) - SHOWN_FAILURES} more", err=True)
    if report.failed:
        click.echo(f"{len(report.failed)} photo(s) failed; the list is in {config.report_path}", err=True)
    if report.stopped:
        click.echo(f"stopped: {report.stopped}; rerun the same command to do the rest", err=True)
    if report.failed or report.stopped:
        raise SystemExit(1)


@main.command("evaluate")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, path_type=Path),
    help="per-image scores [default: PRED_DIR/evaluation.csv]",
)
@click.option("--workers", type=click.IntRange(min=1), default=cpu_count(), help="reader threads")
@click.option(
    "--photos",
    "photos_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    help="the segmented photos: draw the worst images' errors on them into PRED_DIR/errors/",
)
@click.option("--worst", type=click.IntRange(min=1), default=5, help="how many error pictures --photos draws")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def evaluate_command(
    pred_dir: Path, gt_dir: Path, csv_path: Path | None, workers: int, photos_dir: Path | None, worst: int, verbose: bool
) -> None:
    """Mean per-image Dice (the Kaggle metric) and IoU of the masks in PRED_DIR against GT_DIR.

    Files are matched by name: x.png in PRED_DIR (any sub-folder) against x.png, x.gif or Kaggle's
    x_mask.gif in GT_DIR. When PRED_DIR holds both .png and .gif masks of a photo (`unet-batch
    segment --format png --format gif`), the .png is scored. Without mask images,
    PRED_DIR/submission.csv is read. Nothing is ever written into GT_DIR.
    """
    csv_path = csv_path or pred_dir / "evaluation.csv"
    errors_dir = pred_dir / "errors"
    for path, option in ((csv_path, "--csv"), (errors_dir if photos_dir else None, "--photos")):
        if path is not None and path.resolve().is_relative_to(gt_dir.resolve()):
            raise InputError(
                f"{option} would write {path} into GT_DIR {gt_dir}, which is never written to; "
                "choose a PRED_DIR (or --csv) outside the truth folder"
            )
    with setup_logging(verbose):
        try:
            evaluation = evaluate(pred_dir, gt_dir, workers=workers)
            write_csv(evaluation, csv_path)
            pictures = write_error_maps(evaluation, pred_dir, photos_dir, errors_dir, worst) if photos_dir else []
        except EvaluationError as e:
            raise InputError(str(e)) from e
    if evaluation.ignored_predictions:
        click.echo(
            f"PRED_DIR has both a .png and a .gif mask of {len(evaluation.ignored_predictions)} photos: scored the .png ones"
        )
    click.echo(evaluation.summary())
    click.echo(f"per-image scores: {csv_path}")
    if pictures:
        click.echo(
            f"errors of the {len(pictures)} worst (green: car found, red: car missed, blue: background taken "
            f"for car): {pictures[0].parent}"
        )
    if evaluation.errors:
        for row in evaluation.errors[:SHOWN_FAILURES]:
            click.echo(f"  {row.name}: {row.error}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
