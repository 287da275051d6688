"""``unet-batch evaluate``: predicted masks against the truth, per image and on average (batch.evaluation)."""

from __future__ import annotations

from pathlib import Path

import click

from batch.cli.options import SHOWN_FAILURES, Command, InputError, setup_logging
from batch.core.devices import cpu_count
from batch.evaluation import EvaluationError, evaluate, write_csv, write_error_maps


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
