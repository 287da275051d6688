"""Where a model's wrong pixels are: how far from the true outline (the model card's error anatomy).

    unet-batch segment VAL OUT                     # masks
    python scripts/error_anatomy.py OUT TRUTH      # TRUTH: the true masks (NAME.png, NAME.gif or NAME_mask.gif)

For every PNG mask in OUT with a true mask in TRUTH (matched by name as `unet-batch evaluate` matches them),
the pixels where the two disagree are binned by their
distance to the true outline: within 1 px, within 3 px, within 10 px, farther (a shadow taken for car, a
missed antenna). The distance is the chessboard one (a pixel is within r px of the outline when its
(2r + 1)-square holds both car and background in the truth). Prints a markdown table of the shares of all
wrong pixels, pooled over the photos, and the wrong pixels per photo.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from batch.core.masks import read_mask
from batch.evaluation import TRUTH_SUFFIXES, image_files, index_masks
from batch.runs.formats import outline

RADII = (1, 3, 10)  # px from the true outline


def wrong_by_distance(predicted: np.ndarray, true: np.ndarray) -> np.ndarray:
    """How many of the wrong pixels lie within each of :data:`RADII` of the true outline, then how many in all."""
    wrong = predicted != true
    near = [int(np.count_nonzero(wrong & outline(true, radius))) for radius in RADII]
    return np.array([*near, int(np.count_nonzero(wrong))])


def main(out: Path, truth: Path) -> None:
    masks, truths = index_masks(image_files(out, (".png",))), index_masks(image_files(truth, TRUTH_SUFFIXES))
    names = sorted(masks.keys() & truths.keys())  # matched as `unet-batch evaluate` matches them
    totals = sum(
        (wrong_by_distance(read_mask(masks[name]), read_mask(truths[name])) for name in names), np.zeros(len(RADII) + 1, np.int64)
    )
    photos = len(names)
    if not photos:
        raise SystemExit(f"no mask in {out} has a true mask in {truth}")
    share = totals[:-1] / max(totals[-1], 1)
    print(f"{photos} photos, {totals[-1] / photos:.0f} wrong pixels a photo\n")
    print("| where the wrong pixels are | share |\n| --- | --- |")
    for radius, value in zip(RADII, share):
        print(f"| within {radius} px of the true outline | {100 * value:.0f} % |")
    print(f"| farther than {RADII[-1]} px | {100 * (1 - share[-1]):.0f} % |")


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
