"""``unet-batch``: segment folders of car photos with an exported U-Net, and score the masks.

Exit codes: 0 everything succeeded, 1 some photos failed (the rest are done; see report.json),
2 usage errors (missing input folder, bad model file, unusable device, unwritable output), 130
interrupted.
"""

from __future__ import annotations

import logging
from pathlib import Path

import click

from batch.clitypes import DEVICE, InputError, setup_logging
from batch.engine import cpu_count
from batch.evaluate import EvaluationError, evaluate, write_csv, write_error_maps
from batch.formats import FORMATS
from batch.segment import DECODERS, SegmentConfig, SegmentError, segment

SHOWN_FAILURES = 10
INTERRUPTED = 130


def quiet_libraries() -> None:
    """Pillow logs every PNG chunk at DEBUG: keep -v about this program."""
    logging.getLogger("PIL").setLevel(logging.INFO)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
def main() -> None:
    """Segment car photos with an exported U-Net (ONNX Runtime; no torch needed)."""


@main.command("segment")
@click.argument("input_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("output_dir", type=click.Path(file_okay=False, path_type=Path))
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ONNX file from `unet-export to-onnx` [default: the bundled model]",
)
@click.option("--device", type=DEVICE, default="auto", help="auto: the GPU when ONNX Runtime's CUDA provider works, else the CPU")
@click.option("--decoder", type=click.Choice(DECODERS), default="auto", help="auto: DALI (nvJPEG) on a GPU, Pillow on the CPU")
@click.option("--batch-size", type=click.IntRange(min=1), help="photos per inference batch [default: 32 on a GPU, 8 on the CPU]")
@click.option(
    "--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="car probability cut [default: the model's]"
)
@click.option("--tta", is_flag=True, help="average with the prediction for the mirrored photo (2x the inference)")
@click.option("--overwrite", is_flag=True, help="redo photos whose outputs exist (default: skip them)")
@click.option("--limit", type=click.IntRange(min=1), help="only the first N photos (sorted by path)")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="report file [default: OUTPUT_DIR/report.json]")
@click.option(
    "--format", "formats", type=click.Choice(FORMATS), multiple=True, default=("png",), help="output format; repeat for several"
)
@click.option(
    "--workers", type=click.IntRange(min=1), help=f"decode and writer threads each [default: CPU cores, {cpu_count()} here]"
)
@click.option("--threads", type=click.IntRange(min=1), help=f"ONNX Runtime threads [default: CPU cores, {cpu_count()} here]")
@click.option("--progress/--no-progress", default=True, help="progress bar on stderr")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def segment_command(input_dir: Path, output_dir: Path, verbose: bool, **options) -> None:
    """Write a mask for every .jpg/.jpeg/.png under INPUT_DIR into OUTPUT_DIR (same tree).

    Rerunning the same command finishes only what is missing. Failed photos are listed in the
    report with the reason; the run goes on without them.
    """
    try:
        config = SegmentConfig(input_dir=input_dir, output_dir=output_dir, verbose=verbose, **options)
    except ValueError as e:
        raise InputError(str(e)) from e
    with setup_logging(verbose):
        quiet_libraries()
        try:
            report = segment(config)
        except SegmentError as e:
            raise InputError(str(e)) from e
        except KeyboardInterrupt:
            click.echo("interrupted: finished masks are kept; rerun the same command to do the rest", err=True)
            raise SystemExit(INTERRUPTED) from None
    click.echo(report.summary())
    if report.failed:
        for failure in report.failed[:SHOWN_FAILURES]:
            click.echo(f"  {failure['path']}: {failure['reason']}", err=True)
        if len(report.failed) > SHOWN_FAILURES:
            click.echo(f"  ... and {len(report.failed) - SHOWN_FAILURES} more", err=True)
        report_path = config.report or output_dir / "report.json"
        click.echo(f"{len(report.failed)} photo(s) failed; the list is in {report_path}", err=True)
        raise SystemExit(1)


@main.command("evaluate")
@click.argument("pred_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("gt_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--csv", "csv_path", type=click.Path(dir_okay=False, path_type=Path), help="per-image scores [default: PRED_DIR/evaluation.csv]"
)
@click.option("--workers", type=click.IntRange(min=1), default=cpu_count(), help="reader threads")
@click.option("--photos", "photos_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="the segmented photos: draw the worst images' errors on them into PRED_DIR/errors/")
@click.option("--worst", type=click.IntRange(min=1), default=5, help="how many error pictures --photos draws")
@click.option("-v", "--verbose", is_flag=True, help="debug logging")
def evaluate_command(pred_dir: Path, gt_dir: Path, csv_path: Path | None, workers: int, photos_dir: Path | None,
                     worst: int, verbose: bool) -> None:
    """Mean per-image Dice (the Kaggle metric) and IoU of the masks in PRED_DIR against GT_DIR.

    Files are matched by name: x.png in PRED_DIR (any sub-folder) against x.png, x.gif or Kaggle's
    x_mask.gif in GT_DIR. Without mask images, PRED_DIR/submission.csv is read.
    """
    with setup_logging(verbose):
        quiet_libraries()
        try:
            evaluation = evaluate(pred_dir, gt_dir, workers=workers)
        except EvaluationError as e:
            raise InputError(str(e)) from e
        csv_path = csv_path or pred_dir / "evaluation.csv"
        write_csv(evaluation, csv_path)
        try:
            pictures = write_error_maps(evaluation, pred_dir, photos_dir, pred_dir / "errors", worst) if photos_dir else []
        except EvaluationError as e:
            raise InputError(str(e)) from e
    click.echo(evaluation.summary())
    click.echo(f"per-image scores: {csv_path}")
    if pictures:
        click.echo(f"errors of the {len(pictures)} worst (green: car found, red: car missed, blue: background taken "
                   f"for car): {pictures[0].parent}")
    if evaluation.errors:
        for row in evaluation.errors[:SHOWN_FAILURES]:
            click.echo(f"  {row.name}: {row.error}", err=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
