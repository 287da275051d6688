"""``evaluate``: predicted masks against ground truth, per image and on average (Kaggle's mean Dice).

Predictions and truths are matched by file stem: ``a/x.png`` predicts the truth ``x.png``,
``x.gif`` or Kaggle's ``x_mask.gif``. Predictions are the ``.png``/``.gif`` masks under PRED_DIR
(recursively; ``*_cutout.png`` and hidden files are not masks; where a folder holds both ``x.png``
and ``x.gif``, as ``--format png --format gif`` writes, the ``.png`` is scored); when there are
none, the rows of PRED_DIR/submission.csv are used, decoded at each truth's size. Folders that
look swapped (GT_DIR holding segment's report.json or submission.csv when PRED_DIR does not,
PRED_DIR holding only Kaggle's ``*_mask.gif`` truths) are refused; two runs' outputs may be
compared. Evaluating reads only; the CSV and error pictures are written by the caller, never into
GT_DIR (the CLI checks).
"""

from __future__ import annotations

import csv
import io
import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

import numpy as np
from PIL import UnidentifiedImageError

from batch.core.errors import CarvanaError
from batch.core.files import DuplicateNameError, index_by_stem, write_atomic
from batch.core.images import load_rgb
from batch.core.masks import MaskError, dice, iou, read_mask, rle_decode
from batch.runs.formats import SUBMISSION_NAME, encode_jpeg, render_errors
from batch.runs.report import REPORT_NAME

log = logging.getLogger(__name__)

PREDICTION_SUFFIXES = (".png", ".gif")
TRUTH_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
NOT_MASKS = ("_cutout", "_overlay")  # other outputs of unet-batch segment
KAGGLE_TRUTH = "_mask.gif"  # how Kaggle names its ground truth; unet-batch never names a prediction so


class EvaluationError(CarvanaError):
    """Folders that cannot be evaluated against each other; the message says why."""


@dataclass(frozen=True)
class Row:
    name: str  # the stem both files share
    prediction: str
    truth: str
    dice: float | None = None
    iou: float | None = None
    error: str = ""


@dataclass
class Evaluation:
    rows: list[Row]  # one per matched pair, sorted by name
    missing_predictions: list[str] = field(default_factory=list)  # truths without a prediction
    unmatched_predictions: list[str] = field(default_factory=list)  # predictions without a truth
    ignored_predictions: list[str] = field(default_factory=list)  # .gif masks left out for the .png of the same photo

    @property
    def scored(self) -> list[Row]:
        return [row for row in self.rows if not row.error]

    @property
    def errors(self) -> list[Row]:
        return [row for row in self.rows if row.error]

    @property
    def mean_dice(self) -> float:
        return float(np.mean([row.dice for row in self.scored])) if self.scored else float("nan")

    @property
    def mean_iou(self) -> float:
        return float(np.mean([row.iou for row in self.scored])) if self.scored else float("nan")

    def summary(self) -> str:
        line = f"mean Dice {self.mean_dice:.5f}, mean IoU {self.mean_iou:.5f} over {len(self.scored)} images"
        notes = []
        if self.errors:
            notes.append(f"{len(self.errors)} could not be compared")
        if self.missing_predictions:
            notes.append(f"{len(self.missing_predictions)} truths have no prediction")
        if self.unmatched_predictions:
            notes.append(f"{len(self.unmatched_predictions)} predictions have no truth")
        return line + (f" ({'; '.join(notes)})" if notes else "")

    def to_csv(self) -> str:
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["name", "dice", "iou", "prediction", "truth", "error"])
        for row in self.rows:
            writer.writerow([row.name, format_score(row.dice), format_score(row.iou), row.prediction, row.truth, row.error])
        return buffer.getvalue()


def format_score(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


@dataclass(frozen=True)
class PredictedMask:
    """Where one predicted mask is: a mask image, or a row of submission.csv."""

    label: str  # the file, or "submission.csv:<stem>"
    path: Path | None = None
    rle: str | None = None

    def read(self, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) bool; ``shape`` (the truth's) is the size a run-length encoding is decoded at."""
        return read_mask(self.path) if self.path is not None else rle_decode(self.rle, shape)


def image_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files under ``root`` with these suffixes (recursive, sorted), less hidden ones and segment's cut-outs and overlays."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if not name.startswith(".") and path.suffix.lower() in suffixes and not path.stem.endswith(NOT_MASKS):
                found.append(path)
    return found


def index_masks(paths: list[Path]) -> dict[str, Path]:
    """stem (less Kaggle's ``_mask``) -> file; two files with one stem are an :class:`EvaluationError`."""
    try:
        return index_by_stem(paths, strip_suffix="_mask")
    except DuplicateNameError as e:
        raise EvaluationError(str(e)) from e


def prefer_png(paths: list[Path]) -> tuple[list[Path], list[Path]]:
    """(kept, ignored): where one folder holds x.png and x.gif (``--format png --format gif``), the .png is kept."""
    rank = {suffix: i for i, suffix in enumerate(PREDICTION_SUFFIXES)}
    chosen: dict[Path, Path] = {}
    for path in paths:
        key = path.with_suffix("")
        if key not in chosen or rank[path.suffix.lower()] < rank[chosen[key].suffix.lower()]:
            chosen[key] = path
    kept = sorted(chosen.values())
    return kept, sorted(set(paths) - set(kept))


def read_submission(path: Path) -> dict[str, str]:
    """stem -> RLE from a submission CSV (``img,rle_mask``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"img", "rle_mask"} <= set(reader.fieldnames):
            raise EvaluationError(f"{path} is not a submission CSV: its header must be img,rle_mask")
        return {PurePosixPath(row["img"]).stem: row["rle_mask"] for row in reader}


def compare(name: str, prediction: PredictedMask, truth: Path) -> Row:
    try:
        expected = read_mask(truth)
        predicted = prediction.read(expected.shape)
    except (MaskError, ValueError, OSError) as e:
        return Row(name, prediction.label, str(truth), error=str(e))
    if predicted.shape != expected.shape:
        return Row(
            name,
            prediction.label,
            str(truth),
            error=f"prediction is {predicted.shape[1]}x{predicted.shape[0]}, truth is {expected.shape[1]}x{expected.shape[0]}",
        )
    return Row(name, prediction.label, str(truth), dice=dice(predicted, expected), iou=iou(predicted, expected))


def find_predictions(pred_dir: Path) -> tuple[dict[str, PredictedMask], list[Path]]:
    """(stem -> predicted mask, mask files ignored): the mask images under PRED_DIR, else its submission.csv."""
    files, ignored = prefer_png(image_files(pred_dir, PREDICTION_SUFFIXES))
    if files:
        return {stem: PredictedMask(str(path), path=path) for stem, path in index_masks(files).items()}, ignored
    submission = pred_dir / SUBMISSION_NAME
    if submission.is_file():
        log.info("no mask images under %s: reading %s", pred_dir, submission)
        rles = read_submission(submission)
        return {stem: PredictedMask(f"{submission}:{stem}", rle=rle) for stem, rle in rles.items()}, []
    raise EvaluationError(f"no predicted masks (.png, .gif) and no {SUBMISSION_NAME} under {pred_dir}")


def check_order(pred_dir: Path, gt_dir: Path) -> None:
    """An :class:`EvaluationError` when PRED_DIR and GT_DIR look swapped (or are one folder).

    Two runs' outputs may be compared (one run's masks as the reference for another's); the runner's
    output as GT_DIR against anything else as PRED_DIR may not.
    """
    order = "the order is PRED_DIR (the masks to score) then GT_DIR (the ground truth)"
    if pred_dir.resolve() == gt_dir.resolve():
        raise EvaluationError(f"PRED_DIR and GT_DIR are the same folder ({pred_dir}); {order}")
    gt_run = runner_output(gt_dir)
    if gt_run and not runner_output(pred_dir):
        raise EvaluationError(
            f"GT_DIR {gt_dir} holds unet-batch segment's {gt_run} and PRED_DIR does not, so GT_DIR looks like the "
            f"predictions: the arguments look swapped; {order}"
        )
    predictions = image_files(pred_dir, PREDICTION_SUFFIXES)
    if predictions and all(path.name.lower().endswith(KAGGLE_TRUTH) for path in predictions):
        raise EvaluationError(
            f"PRED_DIR {pred_dir} holds only Kaggle ground-truth masks (*{KAGGLE_TRUTH}): the arguments look swapped; {order}"
        )


def runner_output(folder: Path) -> str:
    """The name of the file that marks ``folder`` as unet-batch segment's OUTPUT_DIR, or ""."""
    return next((name for name in (REPORT_NAME, SUBMISSION_NAME) if (folder / name).is_file()), "")


def evaluate(pred_dir: str | Path, gt_dir: str | Path, workers: int = 4) -> Evaluation:
    """Score the masks under ``pred_dir`` against the truths under ``gt_dir``; reads only, writes nothing.

    Raises :class:`EvaluationError` when the folders cannot be compared: nothing matches, two files
    claim one photo, or the arguments look swapped.
    """
    pred_dir, gt_dir = Path(pred_dir), Path(gt_dir)
    check_order(pred_dir, gt_dir)
    truths = index_masks(image_files(gt_dir, TRUTH_SUFFIXES))
    if not truths:
        raise EvaluationError(f"no mask files (.png, .gif, .jpg) under {gt_dir}")
    predictions, ignored = find_predictions(pred_dir)
    names = sorted(predictions.keys() & truths.keys())
    if not names:
        raise EvaluationError(
            f"no prediction under {pred_dir} has the name of a mask under {gt_dir} "
            "(x.png matches x.png, x.gif or x_mask.gif); check the two folders"
        )
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda name: compare(name, predictions[name], truths[name]), names))
    return Evaluation(
        rows=rows,
        missing_predictions=sorted(truths.keys() - predictions.keys()),
        unmatched_predictions=sorted(predictions.keys() - truths.keys()),
        ignored_predictions=[str(path) for path in ignored],
    )


def write_error_maps(
    evaluation: Evaluation, pred_dir: str | Path, photos_dir: str | Path, out_dir: str | Path, worst: int
) -> list[Path]:
    """Draw the ``worst`` lowest-Dice images' errors on their photos (``batch.runs.formats.render_errors``) as
    ``out_dir/<rank>_<name>_dice<score>.jpg``; returns the files written."""
    try:
        photos = index_by_stem(image_files(photos_dir, PHOTO_SUFFIXES))
    except DuplicateNameError as e:
        raise EvaluationError(str(e)) from e
    ranked = sorted(evaluation.scored, key=lambda row: row.dice)[:worst]
    pred_dir, photos_dir, out_dir = Path(pred_dir), Path(photos_dir), Path(out_dir)
    missing = [row.name for row in ranked if row.name not in photos]
    if missing:
        raise EvaluationError(
            f"no photo named {', '.join(missing[:5])} (.jpg, .jpeg, .png) under {photos_dir}: "
            "pass the folder that was segmented as --photos"
        )
    predictions, _ = find_predictions(pred_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, row in enumerate(ranked, start=1):
        truth = read_mask(Path(row.truth))
        predicted = predictions[row.name].read(truth.shape)
        try:
            photo = load_rgb(photos[row.name])
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise EvaluationError(f"cannot read photo {photos[row.name]}: {e}") from e
        if photo.size != (truth.shape[1], truth.shape[0]):
            raise EvaluationError(
                f"photo {photos[row.name]} is {photo.size[0]}x{photo.size[1]}, its mask "
                f"{truth.shape[1]}x{truth.shape[0]}: pass the photos the masks were made from"
            )
        path = out_dir / f"{rank:02d}_{row.name}_dice{row.dice:.4f}.jpg"
        write_atomic(path, encode_jpeg(render_errors(photo, predicted, truth)))
        written.append(path)
    return written


def write_csv(evaluation: Evaluation, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, evaluation.to_csv().encode("utf-8"))
