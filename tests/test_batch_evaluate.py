"""``unet-batch evaluate`` on masks with known scores."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image
from test_rle import HOSTILE, make_hostile, png_claiming, unblock_later

from batch.cli import main
from batch.core.masks import rle_encode
from batch.evaluation import EvaluationError, evaluate

REPO = Path(__file__).resolve().parents[1]


def save_png(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(mask.astype(np.uint8) * 255).save(path)


def save_kaggle_gif(path: Path, mask: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    gif = Image.fromarray(mask.astype(np.uint8), mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(path)


def block(shape: tuple[int, int], rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros(shape, dtype=bool)
    mask[rows, cols] = True
    return mask


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    """Truth: Kaggle GIFs. Predictions (nested): one perfect, one half-overlapping, one empty."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    shape = (20, 30)
    car = block(shape, slice(0, 10), slice(0, 10))  # 100 pixels
    save_kaggle_gif(truth / "car_01_mask.gif", car)
    save_kaggle_gif(truth / "car_02_mask.gif", car)
    save_kaggle_gif(truth / "car_03_mask.gif", car)
    save_kaggle_gif(truth / "car_04_mask.gif", car)  # no prediction
    save_png(pred / "car_01.png", car)
    save_png(pred / "sub" / "car_02.png", block(shape, slice(0, 10), slice(5, 15)))  # 50 shared of 100 + 100
    save_png(pred / "car_03.png", np.zeros(shape, bool))
    save_png(pred / "car_01_cutout.png", np.ones(shape, bool))  # not a mask
    save_png(pred / "stray.png", car)  # no truth
    return pred, truth


def test_scores_match_hand_computed_values(folders):
    evaluation = evaluate(*folders)
    scores = {row.name: (row.dice, row.iou) for row in evaluation.rows}
    assert scores == {"car_01": (1.0, 1.0), "car_02": (0.5, pytest.approx(1 / 3)), "car_03": (0.0, 0.0)}
    assert evaluation.mean_dice == pytest.approx(0.5)
    assert evaluation.mean_iou == pytest.approx((1 + 1 / 3) / 3)
    assert evaluation.missing_predictions == ["car_04"] and evaluation.unmatched_predictions == ["stray"]


def test_cli_prints_the_means_and_writes_the_csv(folders):
    pred, truth = folders
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth)])
    assert result.exit_code == 0, result.output
    assert "mean Dice 0.50000, mean IoU 0.44444 over 3 images" in result.output
    assert "1 truths have no prediction" in result.output
    with open(pred / "evaluation.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [(r["name"], r["dice"]) for r in rows] == [("car_01", "1.000000"), ("car_02", "0.500000"), ("car_03", "0.000000")]
    assert rows[1]["prediction"].endswith("sub/car_02.png") and rows[1]["truth"].endswith("car_02_mask.gif")


def test_size_mismatch_is_reported_and_exits_1(folders, tmp_path: Path):
    pred, truth = folders
    save_png(pred / "car_01.png", np.ones((10, 10), bool))
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--csv", str(tmp_path / "scores.csv")])
    assert result.exit_code == 1
    assert "car_01: prediction is 10x10, truth is 30x20" in result.output
    assert "over 2 images" in result.output and (tmp_path / "scores.csv").exists()


def test_submission_csv_is_read_when_there_are_no_mask_images(folders, tmp_path: Path):
    _, truth = folders
    pred = tmp_path / "rle_only"
    pred.mkdir()
    car = block((20, 30), slice(0, 10), slice(0, 10))
    (pred / "submission.csv").write_text(f"img,rle_mask\ncar_01.jpg,{rle_encode(car)}\ncar_02.jpg,\n")
    evaluation = evaluate(pred, truth)
    assert {row.name: row.dice for row in evaluation.rows} == {"car_01": 1.0, "car_02": 0.0}


def test_nothing_to_compare_exits_2(folders, tmp_path: Path):
    pred, truth = folders
    other = tmp_path / "other"
    save_png(other / "unrelated.png", np.ones((2, 2), bool))
    result = CliRunner().invoke(main, ["evaluate", str(other), str(truth)])
    assert result.exit_code == 2 and "no prediction" in result.output
    empty = tmp_path / "empty"
    empty.mkdir()
    assert CliRunner().invoke(main, ["evaluate", str(empty), str(truth)]).exit_code == 2


def test_two_predictions_for_one_photo_are_an_error(folders):
    pred, truth = folders
    save_png(pred / "other" / "car_01.png", np.ones((20, 30), bool))
    with pytest.raises(EvaluationError, match="both have the name 'car_01'"):
        evaluate(pred, truth)


def test_error_pictures_show_the_worst_images_misses_and_extras(tmp_path: Path):
    pred, truth, photos = tmp_path / "pred", tmp_path / "truth", tmp_path / "photos"
    shape = (40, 60)
    car = block(shape, slice(10, 30), slice(10, 50))
    for name, predicted in (("good", car), ("bad", block(shape, slice(10, 30), slice(20, 60)))):
        save_png(pred / f"{name}.png", predicted)
        save_kaggle_gif(truth / f"{name}_mask.gif", car)
        photos.mkdir(exist_ok=True)
        Image.new("RGB", (60, 40), (128, 128, 128)).save(photos / f"{name}.jpg", quality=95)
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--photos", str(photos), "--worst", "1"])
    assert result.exit_code == 0, result.output
    [picture] = sorted((pred / "errors").iterdir())
    assert picture.name == "01_bad_dice0.7500.jpg"
    pixels = np.asarray(Image.open(picture)).astype(int)  # (40, 60, 3)
    missed, extra, found = pixels[20, 15], pixels[20, 55], pixels[20, 35]
    assert missed[0] > 200 and missed[1] < 90  # red
    assert extra[2] > 200 and extra[0] < 90  # blue
    assert found[1] > found[0] and found[1] > found[2]  # tinted green
    assert evaluate(pred, truth).mean_dice == pytest.approx((1 + 0.75) / 2)  # the pictures are not read as masks


def test_error_pictures_need_the_segmented_photos(folders, tmp_path: Path):
    pred, truth = folders
    (tmp_path / "elsewhere").mkdir()
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--photos", str(tmp_path / "elsewhere")])
    assert result.exit_code == 2
    assert "no photo named" in result.output and "--photos" in result.output


def test_folders_may_be_given_as_strings(folders):
    pred, truth = folders
    assert evaluate(str(pred), str(truth)).mean_dice == pytest.approx(0.5)


def test_swapped_arguments_are_refused_and_nothing_is_written(folders, tmp_path: Path):
    pred, truth = folders
    before = sorted(truth.rglob("*"))
    result = CliRunner().invoke(main, ["evaluate", str(truth), str(pred)])  # Kaggle truths given as predictions
    assert result.exit_code == 2
    assert "holds only Kaggle ground-truth masks (*_mask.gif): the arguments look swapped" in result.output
    assert sorted(truth.rglob("*")) == before  # no evaluation.csv among the truths

    (pred / "report.json").write_text("{}")  # the runner's output folder given as the truth
    other = tmp_path / "other_truth"
    save_png(other / "car_01.png", block((20, 30), slice(0, 10), slice(0, 10)))
    result = CliRunner().invoke(main, ["evaluate", str(other), str(pred)])
    assert result.exit_code == 2 and "holds unet-batch segment's report.json" in result.output
    assert not (other / "evaluation.csv").exists()

    with pytest.raises(EvaluationError, match="are the same folder"):
        evaluate(pred, pred)


def test_two_runs_can_be_compared(folders, tmp_path: Path):
    """One run's masks as the reference for another's (DALI against Pillow, GPU against CPU): both hold a report."""
    pred, _ = folders
    reference = tmp_path / "reference"
    save_png(reference / "car_01.png", block((20, 30), slice(0, 10), slice(0, 10)))
    (reference / "report.json").write_text("{}")
    (pred / "report.json").write_text("{}")
    assert evaluate(pred, reference).mean_dice == 1.0


def test_nothing_is_ever_written_into_the_truth_folder(folders):
    pred, truth = folders
    nested = truth / "predictions"  # PRED_DIR inside GT_DIR: the default CSV would land among the truths
    save_png(nested / "car_01.png", block((20, 30), slice(0, 10), slice(0, 10)))
    result = CliRunner().invoke(main, ["evaluate", str(nested), str(truth)])
    assert result.exit_code == 2 and "into GT_DIR" in result.output and not (nested / "evaluation.csv").exists()
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth), "--csv", str(truth / "scores.csv")])
    assert result.exit_code == 2 and "--csv would write" in result.output and not (truth / "scores.csv").exists()


def test_png_and_gif_of_the_same_photos_score_the_png(folders):
    """What `unet-batch segment --format png --format gif` writes: both masks of every photo, side by side."""
    pred, truth = folders
    save_kaggle_gif(pred / "car_01.gif", np.zeros((20, 30), bool))  # a different mask: proves which one is read
    save_kaggle_gif(pred / "sub" / "car_02.gif", np.zeros((20, 30), bool))
    evaluation = evaluate(pred, truth)
    assert {row.name: row.dice for row in evaluation.rows} == {"car_01": 1.0, "car_02": 0.5, "car_03": 0.0}
    assert evaluation.ignored_predictions == [str(pred / "car_01.gif"), str(pred / "sub" / "car_02.gif")]
    result = CliRunner().invoke(main, ["evaluate", str(pred), str(truth)])
    assert result.exit_code == 0 and "both a .png and a .gif mask of 2 photos: scored the .png ones" in result.output
    save_kaggle_gif(pred / "elsewhere" / "car_03.gif", np.zeros((20, 30), bool))  # another folder: still ambiguous
    with pytest.raises(EvaluationError, match="both have the name 'car_03'"):
        evaluate(pred, truth)


# -- hostile input (issue 23): a bad file or row costs its own row, never a traceback, a hang or a write elsewhere --


def evaluate_in_child(*args: str | Path) -> subprocess.CompletedProcess:
    """The command in its own interpreter with a time limit: code that waits on a FIFO fails the test, never hangs it."""
    command = [sys.executable, "-m", "batch.cli", "evaluate", *map(str, args)]
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr, done.stderr
    return done


def invoke(*args: str | Path) -> tuple[int, str]:
    """The command in this process; its exit status and output, after checking that it ended without a traceback."""
    result = CliRunner().invoke(main, ["evaluate", *map(str, args)])
    assert result.exception is None or isinstance(result.exception, SystemExit), result.output
    return result.exit_code, result.output


def rows_of(csv_path: Path) -> dict[str, dict[str, str]]:
    with open(csv_path, newline="", encoding="utf-8") as f:
        return {row["name"]: row for row in csv.DictReader(f)}


CAR = block((20, 30), slice(0, 10), slice(0, 10))


def test_hostile_truth_and_prediction_files_cost_only_their_own_row(tmp_path: Path):
    """FIFOs, devices, dangling links, folders, truncated files, decompression bombs in a mask's place: each an error
    row saying what to do, read without blocking, the rest scored; exit 1."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    save_png(pred / "car_01.png", CAR)
    save_kaggle_gif(truth / "car_01_mask.gif", CAR)
    for kind in HOSTILE:
        name = kind.replace(" ", "_")
        save_png(pred / f"{name}.png", CAR)
        make_hostile(kind, truth / f"{name}.png")
    os.mkfifo(pred / "pred_fifo.png")  # and a prediction that is a FIFO
    save_kaggle_gif(truth / "pred_fifo_mask.gif", CAR)
    save_kaggle_gif(truth / "small.gif", CAR)  # and a prediction of another size
    save_png(pred / "small.png", CAR[:10])
    done = evaluate_in_child(pred, truth)
    assert done.returncode == 1, done.stderr
    rows = rows_of(pred / "evaluation.csv")
    assert rows["car_01"]["dice"] == "1.000000" and "over 1 images" in done.stdout
    expected = {kind.replace(" ", "_"): reason for kind, reason in HOSTILE.items() if kind != "folder"}
    expected["folder.png"] = "is a folder named like an image file; rename it (its files are read)"  # listed, not read
    for name, reason in expected.items():
        assert reason in rows[name]["error"], (name, rows[name])
    assert "FIFO (named pipe), not a file" in rows["pred_fifo"]["error"]
    assert "prediction is 30x10, truth is 30x20" in rows["small"]["error"]


def test_submission_rows_are_untrusted(tmp_path: Path):
    """Rows naming paths outside any folder, control characters, no name, one photo twice, numbers past int64,
    missing fields or bytes that are not UTF-8: each row an error row saying what to do; the good rows scored."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    for i in range(1, 9):
        save_kaggle_gif(truth / f"car_0{i}_mask.gif", CAR)
    good = rle_encode(CAR)
    lines = [
        "img,rle_mask",
        f"car_01.jpg,{good}",
        f"../../etc/car_02.jpg,{good}",
        f"/abs/car_03.jpg,{good}",
        f'"car\n_04.jpg",{good}',
        f",{good}",
        f"car_05.jpg,{good}",
        f"sub/car_05.jpg,{good}",
        "car_06.jpg,1 99999999999999999999",
        "car_07.jpg",
    ]
    pred.mkdir()
    data = "\ufeff" + "\n".join(lines) + "\n"  # a byte-order mark before the header, as Excel writes
    (pred / "submission.csv").write_bytes(data.encode("utf-8") + b"car_\xff08.jpg," + good.encode() + b"\n")
    code, output = invoke(pred, truth)
    assert code == 1, output
    rows = rows_of(pred / "evaluation.csv")
    assert rows["car_01"]["dice"] == "1.000000"
    errors = {name: row["error"] for name, row in rows.items() if row["error"]}
    assert "'..' part" in errors["submission.csv line 3"] and "fix or remove the row" in errors["submission.csv line 3"]
    assert "empty part" in errors["submission.csv line 4"]
    assert "control character" in errors["submission.csv line 5"]
    assert "empty part" in errors["submission.csv line 7"]
    assert "2 rows name it (lines 8, 9): keep one" in errors["car_05"]
    assert "more than 18 digits" in errors["car_06"]
    assert "has 1 fields" in errors["submission.csv line 11"]
    assert "not valid UTF-8" in errors["submission.csv line 12"]
    assert len(errors) == 8 and "over 1 images" in output
    assert not (tmp_path.parent / "etc").exists()


def test_a_submission_row_longer_than_the_csv_modules_limit_is_read(tmp_path: Path):
    """What `segment --format rle` writes for a tall photo: one field of more than 128 KiB."""
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    stripes = np.zeros((40_000, 1), bool)
    stripes[::2] = True  # 20,000 runs: a field of ~240 KB
    save_png(truth / "tall.png", stripes)
    pred.mkdir()
    (pred / "submission.csv").write_text(f"img,rle_mask\ntall.jpg,{rle_encode(stripes)}\n")
    assert len(rle_encode(stripes)) > csv.field_size_limit()
    assert evaluate(pred, truth).mean_dice == 1.0


def test_a_submission_csv_that_is_not_a_file_is_refused_without_blocking(tmp_path: Path):
    pred, truth = tmp_path / "pred", tmp_path / "truth"
    save_kaggle_gif(truth / "car_01_mask.gif", CAR)
    pred.mkdir()
    os.mkfifo(pred / "submission.csv")
    unblock_later(pred / "submission.csv", 5)
    started = time.monotonic()
    with pytest.raises(EvaluationError, match=r"submission.csv is a FIFO \(named pipe\), not a file"):
        evaluate(pred, truth)
    assert time.monotonic() - started < 4


def test_a_read_only_prediction_folder_is_refused_before_the_work(folders, monkeypatch):
    """The default CSV goes into PRED_DIR: a folder that cannot take it is refused with the fix, before scoring."""
    pred, truth = folders
    real_access = os.access

    def access(path, mode, *args, **kwargs):  # as root, a chmod does not stop writing: answer as a read-only mount does
        return False if Path(path) == pred and mode & os.W_OK else real_access(path, mode, *args, **kwargs)

    monkeypatch.setattr(os, "access", access)
    code, output = invoke(pred, truth)
    assert code == 2 and "cannot write" in output and "--csv" in output, output
    assert "mean Dice" not in output and not (pred / "evaluation.csv").exists()


def test_a_csv_that_cannot_be_written_at_the_end_keeps_the_scores_on_screen(folders, monkeypatch):
    import batch.evaluation as evaluation

    pred, truth = folders

    def read_only(path, data, durable=False):
        raise OSError(30, "Read-only file system", str(path))

    monkeypatch.setattr(evaluation, "write_atomic", read_only)
    code, output = invoke(pred, truth)
    assert code == 1 and "mean Dice 0.50000" in output and "Read-only file system" in output and "--csv" in output, output


def test_csv_never_overwrites_a_file_that_is_not_an_earlier_evaluation(folders, tmp_path: Path):
    pred, truth = folders
    photos = tmp_path / "photos"
    photos.mkdir()
    Image.new("RGB", (30, 20)).save(photos / "car_01.jpg")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "submission.csv").write_text("img,rle_mask\n")
    os.mkfifo(tmp_path / "fifo.csv")
    targets = [pred / "car_01.png", tmp_path / "other" / "submission.csv", photos / "car_01.jpg", tmp_path / "fifo.csv"]
    before = {path: path.read_bytes() for path in targets[:3]}
    for target in targets:
        code, output = invoke(pred, truth, "--csv", target)
        assert code == 2 and "--csv" in output and "not an evaluation CSV" in output, output
    assert {path: path.read_bytes() for path in targets[:3]} == before
    for _ in range(2):  # an earlier evaluation is replaced
        assert invoke(pred, truth)[0] == 0


def test_error_pictures_are_never_written_outside_pred_dir(folders, tmp_path: Path):
    pred, truth = folders
    photos = tmp_path / "photos"
    photos.mkdir()
    for name in ("car_01", "car_02", "car_03"):
        Image.new("RGB", (30, 20)).save(photos / f"{name}.jpg")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (pred / "errors").symlink_to(elsewhere)
    code, output = invoke(pred, truth, "--photos", photos)
    assert code == 2 and "errors" in output and "link" in output, output
    assert list(elsewhere.iterdir()) == []
    (pred / "errors").unlink()
    (pred / "errors").write_text("a file")
    code, output = invoke(pred, truth, "--photos", photos)
    assert code == 2 and "is not a folder" in output, output


def test_hostile_photos_cost_only_their_own_picture(tmp_path: Path):
    """A FIFO, a decompression bomb, a photo of another size under --photos: those pictures are listed, the others drawn."""
    pred, truth, photos = tmp_path / "pred", tmp_path / "truth", tmp_path / "photos"
    photos.mkdir()
    for name, dice_of in (("good", 9), ("fifo", 8), ("bomb", 7), ("small", 6)):
        save_kaggle_gif(truth / f"{name}_mask.gif", CAR)
        save_png(pred / f"{name}.png", block((20, 30), slice(0, 10), slice(0, dice_of)))
    Image.new("RGB", (30, 20)).save(photos / "good.jpg")
    os.mkfifo(photos / "fifo.jpg")
    (photos / "bomb.png").write_bytes(png_claiming(100_000, 100_000))
    Image.new("RGB", (15, 10)).save(photos / "small.jpg")
    done = evaluate_in_child(pred, truth, "--photos", photos, "--worst", "4")
    assert done.returncode == 1, done.stderr
    assert [p.name.split("_dice")[0] for p in sorted((pred / "errors").iterdir())] == ["04_good"]
    assert "FIFO" in done.stderr and "too large" in done.stderr and "photo" in done.stderr
    assert "is 15x10, its mask 30x20" in done.stderr
    assert rows_of(pred / "evaluation.csv")["good"]["dice"]  # the scores were written first


def test_names_that_are_not_text_are_written_escaped(tmp_path: Path):
    """File names with bytes that are not UTF-8, newlines or 240 bytes: scored, written to the CSV escaped, their error
    pictures named within the 255 bytes a file name may have."""
    pred, truth, photos = tmp_path / "pred", tmp_path / "truth", tmp_path / "photos"
    photos.mkdir()
    names = [os.fsdecode(b"car_\xff"), "car\n_nl", "c" * 240]
    for name in names:
        save_kaggle_gif(truth / f"{name}.gif", CAR)
        save_png(pred / f"{name}.png", block((20, 30), slice(0, 10), slice(0, 5)))
        Image.new("RGB", (30, 20)).save(photos / f"{name}.jpg")
    code, output = invoke(pred, truth, "--photos", photos, "--worst", "3")
    assert code == 0, output
    assert set(rows_of(pred / "evaluation.csv")) == {"car_\\xff", "car\\x0a_nl", "c" * 240}
    pictures = sorted(p.name for p in (pred / "errors").iterdir())
    assert len(pictures) == 3 and all(len(os.fsencode(p)) <= 255 and "\n" not in p for p in pictures)


def test_folders_that_cannot_be_listed_and_folders_named_like_masks_are_reported(folders, monkeypatch):
    pred, truth = folders
    (truth / "locked").mkdir()
    (pred / "folder.png").mkdir()
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod 000 does not stop listing: refuse the way the kernel would
        if Path(path) == truth / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    evaluation = evaluate(pred, truth)
    errors = {row.name: row.error for row in evaluation.errors}
    assert "cannot list this folder: Permission denied; check its permissions" in errors["locked"]
    assert "is a folder named like an image file" in errors["folder.png"]
    assert evaluation.mean_dice == pytest.approx(0.5)
