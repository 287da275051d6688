"""The model card's frontier: mean Dice against photos/s end to end, one point per model and option.

    python scripts/frontier_plot.py benchmarks/results/frontier-cpu-amd-epyc-2-cores.json docs/images/frontier.png

Reads the points (label, dice, photos_per_second; label_below to move a label under its point) and the
machine from the JSON file, draws them with matplotlib (the ``bench`` extra). Up and to the right is better.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def main(results: Path, picture: Path) -> None:
    data = json.loads(results.read_text())
    figure, axes = plt.subplots(figsize=(7.5, 4.5), dpi=110)
    for point in data["points"]:
        where = (point["photos_per_second"], point["dice"])
        axes.scatter(*where, s=40, color="tab:red" if "(bundled)" in point["label"] else "tab:blue")
        offset = (6, -12) if point.get("label_below") else (6, 4)
        axes.annotate(point["label"], where, xytext=offset, textcoords="offset points", fontsize=8)
    axes.set_xlabel("photos/s end to end (unet-batch segment, full-size PNG masks)")
    axes.set_ylabel("mean Dice, 160 validation photos")
    axes.set_title(f"{data['machine'].split(',')[0]}, {data['date']}", fontsize=9)
    axes.set_xlim(0, max(p["photos_per_second"] for p in data["points"]) * 1.6)
    axes.margins(y=0.15)
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(picture)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    main(Path(sys.argv[1]), Path(sys.argv[2]))
