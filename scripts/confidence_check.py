"""How well confidence.csv ranks the masks by their true Dice: the figure and picture of docs/model.md.

    unet-batch segment VAL OUT                     # masks + confidence.csv
    unet-batch evaluate OUT TRUTH                  # OUT/evaluation.csv: the true Dice per photo
    python scripts/confidence_check.py VAL OUT docs/images

Prints how many of the photos with Dice below 0.99 are among the 10 % least confident; draws confidence
against Dice (confidence-vs-dice.png) and the least confident photo with its unsure pixels in yellow
(confidence-least.jpg). Needs matplotlib (the ``bench`` extra).
"""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from batch.core.images import load_rgb  # noqa: E402
from batch.inference.decode import Item  # noqa: E402
from batch.inference.postprocess import bilinear_resize  # noqa: E402
from batch.inference.segmenter import Segmenter  # noqa: E402

GOOD_DICE = 0.99
REVIEWED = 0.10  # the share of photos a person looks at


def read_scores(out: Path) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Photo stems, their confidence and their true Dice, for the photos in both CSV files."""
    confidence = {Path(photo).stem: float(value) for photo, value in list(csv.reader((out / "confidence.csv").open()))[1:]}
    dice = {row["name"]: float(row["dice"]) for row in csv.DictReader((out / "evaluation.csv").open()) if row["dice"]}
    names = sorted(confidence.keys() & dice.keys())
    return names, np.array([confidence[n] for n in names]), np.array([dice[n] for n in names])


def draw_ranking(confidence: np.ndarray, dice: np.ndarray, path: Path) -> str:
    reviewed = max(1, round(REVIEWED * len(confidence)))
    cut = np.sort(confidence)[reviewed - 1]
    bad = dice < GOOD_DICE
    caught = int(np.count_nonzero(bad & (confidence <= cut)))
    summary = f"{caught} of the {bad.sum()} photos with Dice < {GOOD_DICE} are among the {reviewed} least confident"
    figure, axes = plt.subplots(figsize=(6.4, 4.2), dpi=150)
    axes.scatter(confidence[~bad], dice[~bad], s=12, color="tab:blue", label=f"Dice >= {GOOD_DICE}")
    axes.scatter(confidence[bad], dice[bad], s=18, color="tab:red", label=f"Dice < {GOOD_DICE}")
    axes.axvline(cut, color="gray", linestyle="--", linewidth=1)
    axes.text(cut, dice.max(), f" {REVIEWED:.0%} least confident", color="gray", va="top", fontsize=8)
    axes.set(xlabel="confidence (confidence.csv)", ylabel="true Dice at full resolution", title=summary)
    axes.title.set_fontsize(8)
    axes.legend(fontsize=8, loc="lower right")
    figure.tight_layout()
    figure.savefig(path)
    plt.close(figure)
    return summary


def draw_unsure_pixels(photo: Path, path: Path) -> None:
    """The photo with the pixels the model is unsure of (probability 0.25..0.75) in yellow."""
    with Segmenter(device="cpu") as segmenter:
        [(_, prediction)] = list(segmenter.stream([Item.from_path(photo)]))
    scores = bilinear_resize(prediction.scores, prediction.size)
    unsure = (scores > prediction.band[0]) & (scores < prediction.band[1])
    picture = np.asarray(load_rgb(photo)).copy()
    picture[unsure] = (255, 220, 0)
    Image.fromarray(picture).save(path, quality=90)


def main(photos: Path, out: Path, images: Path) -> None:
    names, confidence, dice = read_scores(out)
    print(draw_ranking(confidence, dice, images / "confidence-vs-dice.png"))
    print(f"Spearman rank correlation: {np.corrcoef(np.argsort(np.argsort(confidence)), np.argsort(np.argsort(dice)))[0, 1]:.3f}")
    least = names[int(np.argmin(confidence))]
    draw_unsure_pixels(next(photos.glob(f"{least}.*")), images / "confidence-least.jpg")
    print(f"least confident: {least} (confidence {confidence.min():.4f}, Dice {dice[int(np.argmin(confidence))]:.4f})")


if __name__ == "__main__":
    main(*(Path(arg) for arg in sys.argv[1:4]))
