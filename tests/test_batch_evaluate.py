"""``unet-batch evaluate`` on masks with known scores."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from PIL import Image

from batch.cli import main
from batch.core.masks import rle_encode
from batch.evaluation import EvaluationError, evaluate


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
