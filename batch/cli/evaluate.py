"""``unet-batch evaluate``: predicted masks against the truth, per image and on average (batch.evaluation)."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from pathlib import Path

import click
from PIL import Image

from batch.cli.options import SHOWN_FAILURES, Command, InputError, setup_logging
from batch.core.devices import cpu_count
from batch.evaluation import Evaluation, EvaluationError, Pictures, check_outputs, evaluate, write_csv, write_error_maps
from batch.runs.names import shown


@click.command("evaluate", cls=Command)
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
    PRED_DIR/submission.csv is read. Nothing is ever written into GT_DIR or the photos, nor over a
    file that is not an earlier evaluation. Exit 1 when some masks, rows or pictures failed (each
    listed in the CSV with why), 2 when nothing could be compared.
    """
    csv_path = csv_path or pred_dir / "evaluation.csv"
    errors_dir = pred_dir / "errors" if photos_dir else None
    with setup_logging(verbose), refused_as_input_error():
        check_outputs(csv_path, errors_dir, read_only={"GT_DIR": gt_dir, "--photos": photos_dir})
        evaluation = evaluate(pred_dir, gt_dir, workers=workers)
        unsaved = save_csv(evaluation, csv_path)
        pictures = write_error_maps(evaluation, pred_dir, photos_dir, errors_dir, worst) if errors_dir else Pictures([], [])
    tell(evaluation, None if unsaved else csv_path, pictures)
    failures = [(str(csv_path), unsaved)] if unsaved else []
    failures += [(row.name, row.error) for row in evaluation.errors] + pictures.failed
    if failures:
        for name, why in failures[:SHOWN_FAILURES]:
            click.echo(f"  {shown(name)}: {shown(why)}", err=True)
        if len(failures) > SHOWN_FAILURES:
            click.echo(f"  ... and {len(failures) - SHOWN_FAILURES} more: see the CSV", err=True)
        raise SystemExit(1)


def save_csv(evaluation: Evaluation, path: Path) -> str:
    """Write the per-image CSV; "" or why it could not be (the disk filled up since the check): the means are still told."""
    try:
        write_csv(evaluation, path)
    except OSError as e:
        return f"cannot write it ({e.strerror or e}): pass --csv with a path in a folder you can write"
    return ""


@contextlib.contextmanager
def refused_as_input_error() -> Iterator[None]:
    """An :class:`EvaluationError` as exit status 2 with its message, names escaped (a file name may hold a newline).

    Pillow's decompression-bomb warnings are silenced meanwhile: masks and photos are refused by header past
    Pillow's limit, each with an error row that says what to do.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            yield
    except EvaluationError as e:
        raise InputError(shown(str(e))) from e


def tell(evaluation: Evaluation, csv_path: Path | None, pictures: Pictures) -> None:
    """The means, and where the CSV (``None``: not written) and the pictures are."""
    if evaluation.ignored_predictions:
        click.echo(
            f"PRED_DIR has both a .png and a .gif mask of {len(evaluation.ignored_predictions)} photos: scored the .png ones"
        )
    click.echo(evaluation.summary())
    if csv_path is not None:
        click.echo(f"per-image scores: {shown(str(csv_path))}")
    if pictures.written:
        click.echo(
            f"errors of the {len(pictures.written)} worst (green: car found, red: car missed, blue: background taken "
            f"for car): {shown(str(pictures.written[0].parent))}"
        )
