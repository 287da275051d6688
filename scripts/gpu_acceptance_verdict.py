#!/usr/bin/env python3
"""``python scripts/gpu_acceptance_verdict.py OUT_DIR``: the verdict of benchmarks/gpu-acceptance.sh's run.

Reads what the script left in OUT_DIR (steps.tsv, the runner's reports, the evaluation CSVs, the
benchmark results) and writes ``summary.json`` and ``summary.md``: each target of the GPU issue
with its measured figure and whether it is met. A figure that is missing (its step did not run or
failed) is reported as such, never as met.

The targets are this project's acceptance criteria for a GPU host, not a library's, so this is a
script outside the installed packages, and it needs the standard library alone.
"""

from __future__ import annotations

import csv
import json
import os
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

AGREEMENT_MIN = 0.999  # mean Dice of the GPU masks against the CPU/Pillow masks
TRUTH_TOLERANCE = 0.0005  # GPU path's Dice against the truth, within this of the Pillow path's
AGREEMENT_PHOTOS = 1000  # photos the agreement must cover
E2E_BUNDLED_MIN = 1000.0  # images/s, the bundled model, JPEG in -> full-size PNG on disk
E2E_CLASSIC_MIN = 500.0  # images/s, width-64 U-Net at 640x960, FP16
E2E_OVER_INFERENCE_MIN = 0.9
PEAK_FRACTION_AIM = 0.5


@dataclass(frozen=True)
class Target:
    name: str
    figure: str  # the measured value, as shown
    met: bool | None  # None: not measured


def read_steps(out: Path) -> dict[str, int]:
    """Step name -> exit status, from steps.tsv (the last run of a step wins)."""
    path = out / "steps.tsv"
    if not path.is_file():
        return {}
    rows = (line.split() for line in path.read_text().splitlines() if line.strip())
    return {name: int(rc) for name, rc, *_ in rows}


def mean_dice(path: Path) -> tuple[float, int] | None:
    """(mean Dice, images scored) of an evaluation CSV; None when it is missing."""
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        scores = [float(row["dice"]) for row in csv.DictReader(f) if row["dice"]]
    return (sum(scores) / len(scores), len(scores)) if scores else None


def read_json(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def step_target(steps: dict[str, int], name: str, label: str) -> Target:
    rc = steps.get(name)
    return Target(label, "not run" if rc is None else f"exit {rc}", None if rc is None else rc == 0)


def agreement_targets(out: Path) -> list[Target]:
    targets = []
    for name in ("gpu-dali", "gpu-pillow"):
        found = mean_dice(out / f"agreement-{name}-vs-cpu-pillow.csv")
        label = f"{name} masks vs CPU/Pillow masks: mean Dice >= {AGREEMENT_MIN} on >= {AGREEMENT_PHOTOS} photos"
        if found is None:
            targets.append(Target(label, "not measured", None))
            continue
        value, count = found
        targets.append(Target(label, f"{value:.6f} on {count} photos", value >= AGREEMENT_MIN and count >= AGREEMENT_PHOTOS))
    return targets


# (GPU path, CPU path) on the validation photos: each GPU path is scored against the CPU's masks and the truth.
VAL_PAIRS = (
    ("val-gpu-pillow", "val-cpu"),
    ("val-gpu-pillow-tta", "val-cpu-tta"),
    ("val-dali", "val-cpu"),
    ("val-dali-tta", "val-cpu-tta"),
)


def truth_targets(out: Path) -> list[Target]:
    targets = []
    for gpu, cpu in VAL_PAIRS:
        label = f"{gpu} Dice vs truth within {TRUTH_TOLERANCE} of {cpu}'s"
        scores = mean_dice(out / f"truth-{gpu}.csv"), mean_dice(out / f"truth-{cpu}.csv")
        if None in scores:
            targets.append(Target(label, "not measured", None))
            continue
        (value, count), (reference, _) = scores
        gap = value - reference
        figure = f"{value:.5f} vs {reference:.5f} ({count} photos, difference {gap:+.5f})"
        targets.append(Target(label, figure, abs(gap) <= TRUTH_TOLERANCE))
    return targets


def val_agreement_targets(out: Path) -> list[Target]:
    """Each GPU path's masks of the validation photos against the CPU's, made with the same model file."""
    targets = []
    for gpu, cpu in VAL_PAIRS:
        label = f"{gpu} masks vs {cpu}'s (validation photos): mean Dice >= {AGREEMENT_MIN}"
        found = mean_dice(out / f"agreement-{gpu}-vs-{cpu}.csv")
        figure = "not measured" if found is None else f"{found[0]:.6f} on {found[1]} photos"
        targets.append(Target(label, figure, None if found is None else found[0] >= AGREEMENT_MIN))
    return targets


def e2e_rate(results: dict | None) -> float | None:
    if not results or results["end_to_end"]["status"] != "ok":
        return None
    return results["end_to_end"]["images_per_second"]["median"]


def at_least(label: str, value: float | None, minimum: float, shown: str) -> Target:
    """``value`` (shown with the format ``shown``) against ``minimum``; None is "not measured", never met."""
    return Target(label, "not measured", None) if value is None else Target(label, shown.format(value), value >= minimum)


def above(label: str, value: float | None, bound: float, shown: str) -> Target:
    """Like :func:`at_least`, for a value that must beat ``bound``."""
    return Target(label, "not measured", None) if value is None else Target(label, shown.format(value), value > bound)


def bench_targets(out: Path) -> list[Target]:
    full, classic = read_json(out / "bench-full" / "results.json"), read_json(out / "bench-classic" / "results.json")
    ratio = classic["ratios"]["end_to_end_over_inference"] if classic else None
    targets = [
        at_least(
            f"bundled model end to end >= {E2E_BUNDLED_MIN:.0f} images/s", e2e_rate(full), E2E_BUNDLED_MIN, "{:.0f} images/s"
        ),
        at_least(
            f"classic w64 640x960 FP16 end to end >= {E2E_CLASSIC_MIN:.0f} images/s",
            e2e_rate(classic),
            E2E_CLASSIC_MIN,
            "{:.0f} images/s",
        ),
        at_least(f"classic end to end / inference alone >= {E2E_OVER_INFERENCE_MIN}", ratio, E2E_OVER_INFERENCE_MIN, "{:.3f}"),
    ]
    for label, results in (("full", full), ("classic", classic)):
        best = best_fraction_of_peak(results) or (None, "")
        name = f"{label}: inference at the best batch, fraction of the dense FP16 peak (aim {PEAK_FRACTION_AIM:.0%})"
        targets.append(at_least(name, best[0], PEAK_FRACTION_AIM, "{:.1%} " + f"({best[1]})"))
    for label, results in (("full", full), ("classic", classic)):
        over = (results or {}).get("ratios", {}).get("end_to_end_over_baseline", {}).get("torch-peer")
        targets.append(above(f"{label}: unet-batch end to end beats the torch peer pipeline", over, 1.0, "{:.2f}x"))
    return targets


def best_fraction_of_peak(results: dict | None) -> tuple[float, str] | None:
    rows = [r for r in (results or {}).get("inference", []) if r.get("fraction_of_peak") is not None]
    if not rows:
        return None
    best = max(rows, key=lambda r: r["fraction_of_peak"])
    return best[
        "fraction_of_peak"
    ], f"{best['label']}, {best['model']}, batch {best['batch_size']}, {best['achieved_tflops']:.0f} TFLOP/s"


STEPS = {  # step -> what its exit status 0 says
    "install": "offline install, CUDA provider present (and DALI, where the phase tests it)",
    "cuda-check": "the CUDA provider starts and runs a batch in a fresh process without torch",
    "pytest-gpu": "the gpu tests pass, none skipped (--gpu-host)",
    "pytest-dali": "the DALI tests pass, none skipped (--gpu-host)",
    "pytest-all": "the whole suite passes on the GPU host",
    "pytest-rest": "the rest of the suite passes",
    "segment-gpu-pillow": "--decoder pillow on the GPU works",
    "segment-val-dali-tta": "--tta on the GPU works",
    "peer": "the PyTorch peer runs",
}


def summarize(out: Path) -> list[Target]:
    steps = read_steps(out)
    targets = [step_target(steps, name, label) for name, label in STEPS.items() if name in steps or name in ("install",)]
    return targets + agreement_targets(out) + val_agreement_targets(out) + truth_targets(out) + bench_targets(out)


def bound_stage(report: dict, writers: int) -> str:
    """Which stage sets the pace of a ``unet-batch segment`` run, from its stage times.

    Stages overlap: decoding has one thread, inference one, the writers (post-processing and
    writing) ``writers``; each stage's busy time over the time its threads had is its load, and
    the most loaded stage is the bound one.
    """
    stages = report["stages"]
    running = report["seconds"] - stages.get("setup", 0.0) - stages.get("discover", 0.0)
    loads = {
        "decode": stages.get("decode", 0.0) / running,
        "infer": stages.get("infer", 0.0) / running,
        "postprocess + write": (stages.get("postprocess", 0.0) + stages.get("write", 0.0)) / (running * writers),
    }
    shown = ", ".join(f"{stage} {load:.0%}" for stage, load in loads.items())
    return f"bound by {max(loads, key=loads.get)} (busy: {shown} of {running:.1f} s; {writers} writer threads)"


def observations(out: Path, machine: str) -> list[str]:
    """Figures without a target: each throughput run's rate and bound stage, the peer's rate."""
    found = re.search(r"^cpu: (\d+) cores", machine, re.MULTILINE)
    writers = int(found[1]) if found else os.cpu_count() or 1
    lines = []
    for path in sorted(out.glob("throughput-*.report.json")):
        report = json.loads(path.read_text())
        name = path.name.removesuffix(".report.json")
        lines.append(
            f"{name}: {report['processed']} photos, {report['images_per_second']:.0f} images/s "
            f"({report['decoder']}, batch {report['batch_size']}); {bound_stage(report, writers)}"
        )
    peer = read_json(out / "peer.json")
    if peer:
        rate = (peer.get("images_per_second") or {}).get("median")
        lines.append(f"PyTorch peer: {peer['status']}" + (f", {rate:.0f} images/s" if rate else f" ({peer.get('reason')})"))
    return lines


def to_markdown(targets: list[Target], machine: str, notes: list[str]) -> str:
    verdict = {True: "met", False: "**missed**", None: "not measured"}
    lines = [
        "# GPU acceptance run",
        "",
        "```",
        machine.strip(),
        "```",
        "",
        "| target | measured | verdict |",
        "| --- | --- | --- |",
    ]
    lines += [f"| {t.name} | {t.figure} | {verdict[t.met]} |" for t in targets]
    if notes:
        lines += ["", "## Observations", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` whole or not at all: a reader never sees half a summary."""
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)


def main(argv: list[str]) -> int:
    if len(argv) != 1 or not Path(argv[0]).is_dir():
        sys.stderr.write("usage: python scripts/gpu_acceptance_verdict.py OUT_DIR (the folder gpu-acceptance.sh wrote)\n")
        return 2
    out = Path(argv[0])
    targets = summarize(out)
    machine = (out / "machine.txt").read_text() if (out / "machine.txt").is_file() else "machine.txt missing"
    write_atomic(out / "summary.json", json.dumps([asdict(t) for t in targets], indent=2) + "\n")
    write_atomic(out / "summary.md", to_markdown(targets, machine, observations(out, machine)))
    return 0 if all(t.met is not False for t in targets) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
