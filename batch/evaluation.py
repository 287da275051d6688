"""``evaluate``: predicted masks against ground truth, per image and on average (Kaggle's mean Dice).

Predictions and truths are matched by file stem: ``a/x.png`` predicts the truth ``x.png``,
``x.gif`` or Kaggle's ``x_mask.gif``. Predictions are the ``.png``/``.gif`` masks under PRED_DIR
(recursively; ``*_cutout.png`` and hidden files are not masks; where a folder holds both ``x.png``
and ``x.gif``, as ``--format png --format gif`` writes, the ``.png`` is scored); when there are
none, the rows of PRED_DIR/submission.csv are used, decoded at each truth's size. Folders that
look swapped (GT_DIR holding segment's report.json or submission.csv when PRED_DIR does not,
PRED_DIR holding only Kaggle's ``*_mask.gif`` truths) are refused; two runs' outputs may be
compared. Evaluating reads only; the CSV and error pictures are written by the caller, never into
GT_DIR or the photos folder, nor over a file that is not an earlier evaluation (:func:`check_outputs`).

Nothing read is trusted. Files are opened without blocking and refused unless they are regular
files of bounded size (a FIFO, device or folder in a mask's place is an error row, never a hang);
masks and photos are checked by header before they are decoded (a decompression bomb is refused);
a submission row's ``img`` must be a relative photo path ``segment`` could have written (no ``..``,
no absolute path, no control character, valid UTF-8), or the row is an error row and is not matched
to any truth; a photo named by two rows is an error row; its run-length encoding is checked before
a mask is made from it. Names are written to the CSV and the terminal escaped (``\\xff``, ``\\x0a``).
Every problem is a row of the CSV with the reason and what to do, and the command exits 1.
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
from PIL import Image

from batch.core.errors import CarvanaError
from batch.core.files import (
    DuplicateNameError,
    FileRefused,
    index_by_stem,
    read_input_file,
    why_unreadable,
    write_atomic,
)
from batch.core.images import DECODE_ERRORS, ImageError, load_rgb, pillow_message, probe_image
from batch.core.masks import MaskError, dice, iou, read_mask, rle_decode
from batch.runs.formats import SUBMISSION_NAME, encode_jpeg, render_errors
from batch.runs.names import UnsafeName, safe_relative, shown
from batch.runs.report import REPORT_NAME

log = logging.getLogger(__name__)

PREDICTION_SUFFIXES = (".png", ".gif")
TRUTH_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg")
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png")
NOT_MASKS = ("_cutout", "_overlay")  # other outputs of unet-batch segment
KAGGLE_TRUTH = "_mask.gif"  # how Kaggle names its ground truth; unet-batch never names a prediction so
CSV_HEADER = ("name", "dice", "iou", "prediction", "truth", "error")
MAX_SUBMISSION_BYTES = 4 * 2**30  # Kaggle's 100,064 test photos encode to ~0.5 GB
MAX_EVALUATION_BYTES = 256 * 2**20  # an earlier evaluation CSV, read to recognise it before it is replaced
MAX_PHOTO_BYTES = 512 * 2**20  # what the runner reads of a photo (batch.inference.decode.ReadLimits)
PICTURE_NAME_BYTES = 200  # of a photo's name in its error picture's name: room for rank and score in 255 bytes


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
        """The rows as CSV; names and reasons escaped (:func:`batch.runs.names.shown`): a file name may hold any byte."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_HEADER)
        for row in self.rows:
            text = (shown(row.name), shown(row.prediction), shown(row.truth), shown(row.error))
            writer.writerow([text[0], format_score(row.dice), format_score(row.iou), *text[1:]])
        return buffer.getvalue()


def format_score(value: float | None) -> str:
    return "" if value is None else f"{value:.6f}"


@dataclass(frozen=True)
class PredictedMask:
    """Where one predicted mask is: a mask image, or a row of submission.csv."""

    label: str  # the file, or "submission.csv:<stem>"
    path: Path | None = None
    rle: str | None = None
    problem: str = ""  # why it cannot be scored, known before reading it (a photo named by two rows)

    def read(self, shape: tuple[int, int]) -> np.ndarray:
        """(H, W) bool; ``shape`` (the truth's) is the size a run-length encoding is decoded at."""
        return read_mask(self.path) if self.path is not None else rle_decode(self.rle, shape)


@dataclass(frozen=True)
class Found:
    """What a folder holds: the files with the wanted suffixes, and the entries skipped, each with why."""

    files: list[Path]  # sorted by folder, then name
    skipped: list[tuple[Path, str]]


@dataclass(frozen=True)
class Predictions:
    masks: dict[str, PredictedMask]  # stem -> where its mask is
    ignored: list[Path]  # .gif masks left out for the .png of the same photo
    refused: list[Row]  # entries and submission rows that cannot be scored, as error rows


@dataclass(frozen=True)
class Pictures:
    written: list[Path]
    failed: list[tuple[str, str]]  # (name, why) of the pictures that could not be drawn


def find_files(root: Path, suffixes: tuple[str, ...]) -> Found:
    """The files under ``root`` with these suffixes (recursive), less hidden ones and segment's cut-outs and overlays;
    folders that cannot be listed, folders named like such files and links to folders (not followed: they may lead
    outside ``root`` or loop) are skipped and reported."""
    files: list[Path] = []
    skipped: list[tuple[Path, str]] = []

    def unlisted(error: OSError) -> None:
        skipped.append((Path(error.filename), f"cannot list this folder: {why_unreadable(error)}; the files in it were not read"))

    for folder, dirs, names in os.walk(root, onerror=unlisted):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in dirs:
            if os.path.islink(Path(folder, name)):
                skipped.append((Path(folder, name), "is a link to a folder, which is not followed: copy the folder in instead"))
            elif is_wanted(name, suffixes):
                skipped.append((Path(folder, name), "is a folder named like an image file; rename it (its files are read)"))
        files.extend(Path(folder, name) for name in sorted(names) if is_wanted(name, suffixes))
    return Found(files, skipped)


def is_wanted(name: str, suffixes: tuple[str, ...]) -> bool:
    path = PurePosixPath(name)
    return not name.startswith(".") and path.suffix.lower() in suffixes and not path.stem.endswith(NOT_MASKS)


def image_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """The files of :func:`find_files`, without the skipped entries."""
    return find_files(root, suffixes).files


def skipped_rows(found: Found, root: Path, side: str) -> list[Row]:
    """Error rows for the entries :func:`find_files` skipped under ``root``; ``side``: the column the path goes in."""
    rows = []
    for path, why in found.skipped:
        name, where = os.path.relpath(path, root), str(path)
        rows.append(Row(name, where, "", error=why) if side == "prediction" else Row(name, "", where, error=why))
    return rows


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


def read_submission(path: Path) -> tuple[dict[str, PredictedMask], list[Row]]:
    """(stem -> its row's mask, error rows) from a submission CSV (``img,rle_mask``).

    A row is used only when its ``img`` is a photo path segment could have written (:func:`safe_relative`)
    and it has both fields; a photo named by two rows is scored by neither. Bytes that are not UTF-8 fail
    their row, not the file.
    """
    text = read_text(path, MAX_SUBMISSION_BYTES, f"PRED_DIR's {SUBMISSION_NAME} must be the file `segment --format rle` writes")
    allow_csv_fields_of(len(text))
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader, [])
        if not {"img", "rle_mask"} <= set(header):
            raise EvaluationError(f"{path} is not a submission CSV: its header must be img,rle_mask")
        rows, refused = submission_rows(reader, header, path)
    except csv.Error as e:
        raise EvaluationError(
            f"{path} line {reader.line_num} is not CSV ({e}); write it again with `segment --format rle`"
        ) from e
    masks = {}
    for stem, entries in rows.items():
        label = f"{path}:{stem}"
        lines = ", ".join(str(line) for line, _ in entries)
        duplicated = f"{len(entries)} rows name it (lines {lines}): keep one"
        masks[stem] = PredictedMask(label, problem=duplicated) if len(entries) > 1 else PredictedMask(label, rle=entries[0][1])
    return masks, refused


def submission_rows(reader, header: list[str], path: Path) -> tuple[dict[str, list[tuple[int, str]]], list[Row]]:
    """(stem -> [(line, RLE)], error rows) of the CSV rows after the header."""
    img, rle = header.index("img"), header.index("rle_mask")
    rows: dict[str, list[tuple[int, str]]] = {}
    refused = []
    line = reader.line_num + 1  # where the next row starts (a quoted field may span lines)
    for fields in reader:
        if len(fields) != len(header):
            refused.append(row_error(path, line, f"has {len(fields)} fields, the header {len(header)}: a row is img,rle_mask"))
        elif fields:
            try:
                rows.setdefault(safe_relative(fields[img]).stem, []).append((line, fields[rle]))
            except UnsafeName as e:
                why = f"its img '{shown(fields[img])}' is not a photo path segment writes ({e}); fix or remove the row"
                refused.append(row_error(path, line, why))
        line = reader.line_num + 1
    return rows, refused


def row_error(path: Path, line: int, why: str) -> Row:
    return Row(f"{path.name} line {line}", f"{path}:{line}", "", error=why)


def read_text(path: Path, max_bytes: int, fix: str) -> str:
    """A text file from outside (:func:`read_input`); bytes that are not UTF-8 are kept as lone surrogates
    (``surrogateescape``), to fail only the names and fields that hold them; a BOM is dropped."""
    return read_input(path, max_bytes, fix).decode("utf-8", "surrogateescape").removeprefix("\ufeff")


def read_input(path: Path, max_bytes: int, fix: str) -> bytes:
    """A file from outside: regular, at most ``max_bytes``, read without blocking (a FIFO never hangs the reader);
    an :class:`EvaluationError` naming it, what it is and ``fix`` otherwise."""
    try:
        return read_input_file(path, max_bytes)
    except FileRefused as e:
        raise EvaluationError(f"{path} {e}: {fix}") from e


def allow_csv_fields_of(size: int) -> None:
    """Let the csv module read fields of up to ``size`` characters: a tall photo's run-length encoding is longer than
    its 128 KiB default. The limit is one setting for the whole process, so it is only ever raised."""
    if csv.field_size_limit() < size:
        csv.field_size_limit(size)


def compare(name: str, prediction: PredictedMask, truth: Path) -> Row:
    if prediction.problem:
        return Row(name, prediction.label, str(truth), error=prediction.problem)
    try:
        expected = read_mask(truth)
        predicted = prediction.read(expected.shape)
    except MaskError as e:
        return Row(name, prediction.label, str(truth), error=str(e))
    if predicted.shape != expected.shape:
        return Row(
            name,
            prediction.label,
            str(truth),
            error=f"prediction is {predicted.shape[1]}x{predicted.shape[0]}, truth is {expected.shape[1]}x{expected.shape[0]}",
        )
    return Row(name, prediction.label, str(truth), dice=dice(predicted, expected), iou=iou(predicted, expected))


def find_predictions(pred_dir: Path) -> Predictions:
    """The mask images under PRED_DIR, else the rows of its submission.csv."""
    found = find_files(pred_dir, PREDICTION_SUFFIXES)
    files, ignored = prefer_png(found.files)
    skipped = skipped_rows(found, pred_dir, "prediction")
    if files:
        masks = {stem: PredictedMask(str(path), path=path) for stem, path in index_masks(files).items()}
        return Predictions(masks, ignored, skipped)
    submission = pred_dir / SUBMISSION_NAME
    if os.path.lexists(submission):  # a FIFO or a dangling link in its place is reported, not taken for no file
        log.info("no mask images under %s: reading %s", pred_dir, submission)
        masks, refused = read_submission(submission)
        return Predictions(masks, [], skipped + refused)
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
    found = find_files(gt_dir, TRUTH_SUFFIXES)
    truths = index_masks(found.files)
    if not truths:
        raise EvaluationError(
            f"no mask files (.png, .gif, .jpg) under {gt_dir}{first_reason(skipped_rows(found, gt_dir, 'truth'))}"
        )
    predictions = find_predictions(pred_dir)
    masks = predictions.masks
    names = sorted(masks.keys() & truths.keys())
    if not names:
        raise EvaluationError(
            f"no prediction under {pred_dir} has the name of a mask under {gt_dir} "
            f"(x.png matches x.png, x.gif or x_mask.gif); check the two folders{first_reason(predictions.refused)}"
        )
    with ThreadPoolExecutor(workers) as pool:
        rows = list(pool.map(lambda name: compare(name, masks[name], truths[name]), names))
    unmatched = sorted(masks.keys() - truths.keys())
    refused = [Row(name, masks[name].label, "", error=masks[name].problem) for name in unmatched if masks[name].problem]
    refused += predictions.refused + skipped_rows(found, gt_dir, "truth")
    return Evaluation(
        rows=sorted(rows + refused, key=lambda row: row.name),
        missing_predictions=sorted(truths.keys() - masks.keys()),
        unmatched_predictions=[name for name in unmatched if not masks[name].problem],
        ignored_predictions=[str(path) for path in predictions.ignored],
    )


def first_reason(refused: list[Row]) -> str:
    """The note ``; N entries could not be used, the first: <path>: <why>`` for a message that would hide them, or ""."""
    if not refused:
        return ""
    first = refused[0]
    return f"; {len(refused)} entries could not be used, the first: {first.prediction or first.truth}: {first.error}"


def check_outputs(csv_path: Path, errors_dir: Path | None, read_only: dict[str, Path | None]) -> None:
    """An :class:`EvaluationError` unless the CSV (and, with ``--photos``, the error pictures' folder) can be written
    without touching anything else: not into a folder of ``read_only`` (label -> folder: GT_DIR, the photos), not over
    a file that is not an earlier evaluation CSV, not through a link, and into a folder this user may write."""
    for path, option in ((csv_path, "--csv"), (errors_dir, "--photos")):
        for label, folder in read_only.items():
            if path is not None and folder is not None and path.resolve().is_relative_to(folder.resolve()):
                raise EvaluationError(
                    f"{option} would write {path} into {label} {folder}, which is never written to; "
                    "choose a PRED_DIR (or --csv) outside it"
                )
    check_replaceable(csv_path)
    check_writable(csv_path.parent, f"cannot write {csv_path}", "pass --csv with a path in a folder you can write")
    if errors_dir is not None:
        check_errors_dir(errors_dir)


def check_replaceable(csv_path: Path) -> None:
    """An :class:`EvaluationError` when ``csv_path`` exists and is not an earlier evaluation CSV (those are replaced)."""
    if not os.path.lexists(csv_path):
        return
    try:
        first_line = read_input_file(csv_path, MAX_EVALUATION_BYTES).partition(b"\n")[0]
        why = "" if first_line == ",".join(CSV_HEADER).encode() else f"its first line is not {','.join(CSV_HEADER)}"
    except FileRefused as e:
        why = str(e)
    if why:
        raise EvaluationError(
            f"--csv {csv_path} exists and is not an evaluation CSV ({why}): it is never overwritten; "
            "choose another --csv or remove the file"
        )


def check_errors_dir(errors_dir: Path) -> None:
    """An :class:`EvaluationError` unless PRED_DIR/errors is a folder (or can be made) inside PRED_DIR."""
    if errors_dir.is_symlink():
        raise EvaluationError(
            f"--photos would draw into {errors_dir}, a link to {os.readlink(errors_dir)}: error pictures are written only "
            "inside PRED_DIR; remove the link"
        )
    if os.path.lexists(errors_dir) and not errors_dir.is_dir():
        raise EvaluationError(f"--photos would draw into {errors_dir}, which is not a folder: remove or rename it")
    check_writable(errors_dir, f"cannot write the error pictures into {errors_dir}", "make PRED_DIR writable")


def check_writable(folder: Path, what: str, fix: str) -> None:
    """An :class:`EvaluationError` unless ``folder``, or the nearest of its parents that exists, is a folder this user
    may write (a read-only mount included, which ``os.access`` reports whoever the user is)."""
    existing = next(parent for parent in (folder, *folder.parents) if os.path.lexists(parent))
    if not existing.is_dir():
        raise EvaluationError(f"{what}: {existing} is not a folder; {fix}")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise EvaluationError(f"{what}: {existing} is read-only to this user; {fix}")


def write_error_maps(
    evaluation: Evaluation, pred_dir: str | Path, photos_dir: str | Path, out_dir: str | Path, worst: int
) -> Pictures:
    """Draw the ``worst`` lowest-Dice images' errors on their photos (``batch.runs.formats.render_errors``) as
    ``out_dir/<rank>_<name>_dice<score>.jpg``. A picture that cannot be drawn (its photo unreadable, of another
    size, not a photo file) is listed with why and costs only itself."""
    try:
        photos = index_by_stem(image_files(Path(photos_dir), PHOTO_SUFFIXES))
    except DuplicateNameError as e:
        raise EvaluationError(str(e)) from e
    ranked = sorted(evaluation.scored, key=lambda row: row.dice)[:worst]
    missing = [row.name for row in ranked if row.name not in photos]
    if missing:
        raise EvaluationError(
            f"no photo named {', '.join(missing[:5])} (.jpg, .jpeg, .png) under {photos_dir}: "
            "pass the folder that was segmented as --photos"
        )
    predictions = find_predictions(Path(pred_dir)).masks
    out_dir = Path(out_dir)
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise EvaluationError(f"cannot make {out_dir} for the error pictures ({e.strerror}); make PRED_DIR writable") from e
    pictures = Pictures([], [])
    for rank, row in enumerate(ranked, start=1):
        path = out_dir / picture_name(rank, row)
        try:
            draw_errors(row, predictions[row.name], photos[row.name], path)
            pictures.written.append(path)
        except (MaskError, ImageError, EvaluationError) as e:
            pictures.failed.append((row.name, str(e)))
        except OSError as e:
            pictures.failed.append((row.name, f"cannot write {path} ({e.strerror}); check the folder and the disk"))
    return pictures


def draw_errors(row: Row, prediction: PredictedMask, photo_path: Path, path: Path) -> None:
    truth = read_mask(Path(row.truth))
    predicted = prediction.read(truth.shape)
    photo = read_photo(photo_path)
    if photo.size != (truth.shape[1], truth.shape[0]):
        raise EvaluationError(
            f"photo {photo_path} is {photo.size[0]}x{photo.size[1]}, its mask {truth.shape[1]}x{truth.shape[0]}: "
            "pass the photos the masks were made from"
        )
    write_atomic(path, encode_jpeg(render_errors(photo, predicted, truth)))


def read_photo(path: Path) -> Image.Image:
    """A photo from ``--photos``, upright: a regular file of bounded size whose header is checked before decoding."""
    data = read_input(path, MAX_PHOTO_BYTES, "pass the photos that were segmented as --photos")
    probe_image(data, path)  # JPEG or PNG, not too large to decode: an ImageError that names the file and the fix
    try:
        return load_rgb(io.BytesIO(data))
    except DECODE_ERRORS as e:
        raise EvaluationError(f"cannot decode photo {path} ({pillow_message(e)}); re-save it as JPEG or PNG") from e
    except MemoryError as e:
        raise EvaluationError(f"cannot decode photo {path}: not enough memory; free memory and retry") from e


def picture_name(rank: int, row: Row) -> str:
    """``<rank>_<name>_dice<score>.jpg``, the name escaped and cut to fit the 255 bytes of a file name."""
    name = shown(row.name).encode("utf-8")[:PICTURE_NAME_BYTES].decode("utf-8", "ignore")
    return f"{rank:02d}_{name}_dice{row.dice:.4f}.jpg"


def write_csv(evaluation: Evaluation, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, evaluation.to_csv().encode("utf-8"))
