"""``evaluate``: predicted masks against ground truth, per image and on average (Kaggle's mean Dice).

Predictions and truths are matched by file stem: ``a/x.png`` predicts the truth ``x.png``,
``x.gif`` or Kaggle's ``x_mask.gif``. Predictions are the ``.png``/``.gif`` masks under PRED_DIR
(recursively; ``*_cutout.png`` and hidden files are not masks); when there are none, the rows of
PRED_DIR/submission.csv are used, decoded at each truth's size.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path, PurePosixPath

import numpy as np

from PIL import UnidentifiedImageError

from batch.formats import SUBMISSION_NAME, render_errors, write_atomic
from batch.images import load_rgb
from batch.masks import MaskError, dice, iou, read_mask, rle_decode

log = logging.getLogger(__name__)

PREDICTION_SUFFIXES = (".png", ".gif")
TRUTH_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
NOT_MASKS = ("_cutout", "_overlay")  # other outputs of unet-batch segment


class EvaluationError(ValueError):
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


def index_by_stem(root: Path, suffixes: tuple[str, ...], strip: str) -> dict[str, Path]:
    """stem -> file for the masks under ``root`` (recursive); two files with one stem are an error."""
    found: dict[str, Path] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            path = Path(folder, name)
            if name.startswith(".") or path.suffix.lower() not in suffixes or path.stem.endswith(NOT_MASKS):
                continue
            stem = path.stem.removesuffix(strip)
            if stem in found:
                raise EvaluationError(f"{found[stem]} and {path} both give the mask of '{stem}'; keep one of them")
            found[stem] = path
    return found


def read_submission(path: Path) -> dict[str, str]:
    """stem -> RLE from a submission CSV (``img,rle_mask``)."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if reader.fieldnames is None or not {"img", "rle_mask"} <= set(reader.fieldnames):
            raise EvaluationError(f"{path} is not a submission CSV: its header must be img,rle_mask")
        return {PurePosixPath(row["img"]).stem: row["rle_mask"] for row in reader}


def read_prediction(path: Path, shape: tuple[int, int]) -> np.ndarray:
    return read_mask(path)


def compare(name: str, prediction: str, truth: Path, load_prediction: Callable[[tuple[int, int]], np.ndarray]) -> Row:
    try:
        expected = read_mask(truth)
        predicted = load_prediction(expected.shape)
    except (MaskError, ValueError, OSError) as e:
        return Row(name, prediction, str(truth), error=str(e))
    if predicted.shape != expected.shape:
        return Row(
            name, prediction, str(truth),
            error=f"prediction is {predicted.shape[1]}x{predicted.shape[0]}, truth is {expected.shape[1]}x{expected.shape[0]}",
        )
    return Row(name, prediction, str(truth), dice=dice(predicted, expected), iou=iou(predicted, expected))


Loader = tuple[str, Callable[[tuple[int, int]], np.ndarray]]  # (label, shape -> bool mask)


def prediction_loaders(pred_dir: Path) -> dict[str, Loader]:
    """stem -> how to read its predicted mask: the mask images under PRED_DIR, else its submission.csv."""
    predictions = index_by_stem(pred_dir, PREDICTION_SUFFIXES, strip="_mask")
    submission = pred_dir / SUBMISSION_NAME
    if predictions:
        return {stem: (str(path), partial(read_prediction, path)) for stem, path in predictions.items()}
    if submission.is_file():
        log.info("no mask images under %s: reading %s", pred_dir, submission)
        rles = read_submission(submission)
        return {stem: (f"{submission}:{stem}", partial(rle_decode, rle)) for stem, rle in rles.items()}
    raise EvaluationError(f"no predicted masks (.png, .gif) and no {SUBMISSION_NAME} under {pred_dir}")


def evaluate(pred_dir: Path, gt_dir: Path, workers: int = 4) -> Evaluation:
    truths = index_by_stem(gt_dir, TRUTH_SUFFIXES, strip="_mask")
    if not truths:
        raise EvaluationError(f"no mask files (.png, .gif, .jpg) under {gt_dir}")
    loaders = prediction_loaders(pred_dir)
    names = sorted(loaders.keys() & truths.keys())
    if not names:
        raise EvaluationError(
            f"no prediction under {pred_dir} has the name of a mask under {gt_dir} "
            "(x.png matches x.png, x.gif or x_mask.gif); check the two folders"
        )

    def compare_one(name: str) -> Row:
        label, load = loaders[name]
        return compare(name, label, truths[name], load)

    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(compare_one, names))
    return Evaluation(
        rows=rows,
        missing_predictions=sorted(truths.keys() - loaders.keys()),
        unmatched_predictions=sorted(loaders.keys() - truths.keys()),
    )


def write_error_maps(evaluation: Evaluation, pred_dir: Path, photos_dir: Path, out_dir: Path, worst: int) -> list[Path]:
    """Draw the ``worst`` lowest-Dice images' errors on their photos (``batch.formats.render_errors``) as
    ``out_dir/<rank>_<name>_dice<score>.jpg``; returns the files written."""
    photos = index_by_stem(photos_dir, PHOTO_SUFFIXES, strip="")
    ranked = sorted(evaluation.scored, key=lambda row: row.dice)[:worst]
    missing = [row.name for row in ranked if row.name not in photos]
    if missing:
        raise EvaluationError(f"no photo named {', '.join(missing[:5])} (.jpg, .jpeg, .png) under {photos_dir}: "
                              "pass the folder that was segmented as --photos")
    loaders = prediction_loaders(pred_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for rank, row in enumerate(ranked, start=1):
        truth = read_mask(Path(row.truth))
        predicted = loaders[row.name][1](truth.shape)
        try:
            photo = load_rgb(photos[row.name])
        except (OSError, UnidentifiedImageError, ValueError) as e:
            raise EvaluationError(f"cannot read photo {photos[row.name]}: {e}") from e
        if photo.size != (truth.shape[1], truth.shape[0]):
            raise EvaluationError(f"photo {photos[row.name]} is {photo.size[0]}x{photo.size[1]}, its mask "
                                  f"{truth.shape[1]}x{truth.shape[0]}: pass the photos the masks were made from")
        buffer = io.BytesIO()
        render_errors(photo, predicted, truth).save(buffer, format="JPEG", quality=90)
        path = out_dir / f"{rank:02d}_{row.name}_dice{row.dice:.4f}.jpg"
        write_atomic(path, buffer.getvalue())
        written.append(path)
    return written


def write_csv(evaluation: Evaluation, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, evaluation.to_csv().encode("utf-8"))
