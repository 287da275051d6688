"""The Dice/speed trade-off of a U-Net's width, depth and input size: the model card's table.

Three measurements, each cheap enough for a 2-core CPU, joined into one table:

- **Resolution ceiling** of an input size: the full-resolution Dice of a *perfect* model at that
  size. Each ground-truth mask is shrunk to (h, w) by area (exactly the training target,
  :func:`batch.core.masks.area_fraction`), turned into logits, resized back and thresholded the way the
  batch runner treats model output (:func:`batch.inference.postprocess.upsample_threshold`). No trained model
  can beat it; the gap between a run's Dice and this ceiling is what the network, not the size, costs.
- **Speed** of every (width, depth, size): a random-weight U-Net exported by the project's exporter,
  swept over batch sizes on one ONNX Runtime provider (speed does not depend on the weights).
- **Trained Dice** of real runs, read from their run folders (``config.json`` and ``metrics.jsonl``).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from batch.core.contract import probability_to_logit
from batch.core.devices import parse_device
from batch.core.files import write_atomic
from batch.core.masks import MaskError, area_fraction, dice, read_mask
from batch.inference.postprocess import upsample_threshold
from benchmarks.config import check_extras
from benchmarks.errors import BenchError
from benchmarks.flops import unet_gflops
from benchmarks.inference import backends_for, sweep_batches
from benchmarks.machine import machine_facts
from benchmarks.models import random_model
from benchmarks.timing import Stats

log = logging.getLogger(__name__)

SCHEMA = "unet-bench-tradeoff/1"
LOGIT_CLIP = 1e-3  # a perfect model's probabilities are clipped to [1e-3, 1 - 1e-3] (logits within +-6.9)


@dataclass(frozen=True)
class Ceiling:
    size: tuple[int, int]  # (h, w) model input
    mean_dice: float  # over the masks, each at its full resolution
    min_dice: float
    masks: int


@dataclass(frozen=True)
class SpeedPoint:
    width: int
    depth: int
    size: tuple[int, int]  # (h, w)
    gflop_per_image: float
    status: str  # "ok", "skipped" or "failed"
    best_batch: int | None = None
    images_per_second: Stats | None = None  # at best_batch
    reason: str | None = None


@dataclass(frozen=True)
class TrainedRun:
    run: str  # the run folder
    width: int
    depth: int
    size: tuple[int, int]
    epochs: int  # epochs trained
    best_epoch: int
    val_dice: float  # best full-resolution validation Dice
    val_dice_min: float | None  # worst validation photo at best_epoch


def resolution_ceiling(truth: np.ndarray, size: tuple[int, int]) -> float:
    """Full-resolution Dice of the perfect model at input ``size`` for the (H, W) bool mask ``truth``."""
    fraction = np.clip(area_fraction(truth, size).astype(np.float32) / 255, LOGIT_CLIP, 1 - LOGIT_CLIP)  # (h, w)
    return dice(upsample_threshold(probability_to_logit(fraction), truth.shape, 0.0) > 0, truth)


def measure_ceilings(mask_paths: Sequence[Path], sizes: Sequence[tuple[int, int]], progress: bool = True) -> list[Ceiling]:
    """The resolution ceiling of each size, averaged over the masks (each read once)."""
    if not mask_paths:
        raise BenchError("no masks to measure the resolution ceiling on: pass --masks with a folder of mask files")
    scores = np.empty((len(mask_paths), len(sizes)))
    for i, path in enumerate(tqdm(mask_paths, desc="ceiling", unit="img", disable=not progress)):
        try:
            truth = read_mask(path)
        except MaskError as e:
            raise BenchError(f"{e} (or leave it out of --masks)") from e
        scores[i] = [resolution_ceiling(truth, size) for size in sizes]
    return [
        Ceiling(tuple(size), float(scores[:, j].mean()), float(scores[:, j].min()), len(mask_paths))
        for j, size in enumerate(sizes)
    ]


def measure_speed(
    width: int,
    depth: int,
    size: tuple[int, int],
    *,
    device: str,
    batch_sizes: tuple[int, ...],
    warmup: int,
    repeats: int,
    max_batch_seconds: float,
    seed: int,
    folder: Path,
    cache_dir: Path | None,
) -> SpeedPoint:
    """Best images/s over ``batch_sizes`` of a random-weight U-Net on ``device``'s first provider
    (CPU FP32, or CUDA FP16 with device-resident buffers)."""
    device = parse_device(device)
    backend = backends_for(device.kind, device.index if device.is_cuda else None)[0]
    gflop = unet_gflops({"width": width, "depth": depth, "in_channels": 3, "out_channels": 1}, size)
    model = random_model(
        width, depth, size, fp16=backend.graph_precision == "fp16", seed=seed, folder=folder, cache_dir=cache_dir
    )
    images = np.random.default_rng(seed).integers(0, 256, (max(batch_sizes), *size, 3), dtype=np.uint8)  # (N, h, w, 3)
    sweep = sweep_batches(
        model, backend, images, batch_sizes, warmup=warmup, repeats=repeats, max_batch_seconds=max_batch_seconds, gpu_name=None
    )
    best = sweep.best()
    if best is None:
        first = sweep.results[0]
        return SpeedPoint(width, depth, size, gflop, first.status, reason=first.reason)
    log.info("w%d d%d %dx%d: %.2f images/s at batch %d", width, depth, *size, best.images_per_second.median, best.batch_size)
    return SpeedPoint(width, depth, size, gflop, "ok", best.batch_size, best.images_per_second)


def read_run(run_dir: Path) -> TrainedRun:
    """A finished (or paused) ``unet-train`` run: its architecture, size and best validation Dice."""
    config_path, metrics_path = run_dir / "config.json", run_dir / "metrics.jsonl"
    try:
        config = json.loads(config_path.read_text())
        history = [json.loads(line) for line in metrics_path.read_text().splitlines() if line.strip()]
        model = config["model_config"]
        size = tuple(config["input_size"])
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise BenchError(f"{run_dir} is not a unet-train run folder (config.json and metrics.jsonl): {e}") from e
    scored = [h for h in history if h.get("val_dice") is not None]
    if not scored:
        raise BenchError(f"{metrics_path} has no validated epoch yet: train at least one epoch")
    best = max(scored, key=lambda h: h["val_dice"])
    return TrainedRun(
        str(run_dir),
        int(model["width"]),
        int(model["depth"]),
        size,
        int(history[-1]["epoch"]),
        int(best["epoch"]),
        float(best["val_dice"]),
        best.get("val_dice_min"),
    )


def run_tradeoff(
    *,
    mask_paths: Sequence[Path],
    sizes: Sequence[tuple[int, int]],
    widths: Sequence[int],
    depths: Sequence[int],
    run_dirs: Sequence[Path],
    device: str,
    batch_sizes: tuple[int, ...] = (1, 2, 4, 8),
    warmup: int = 1,
    repeats: int = 3,
    max_batch_seconds: float = 10.0,
    seed: int = 0,
    cache_dir: Path | None = None,
    progress: bool = True,
) -> dict:
    """Everything :func:`render_tradeoff` tabulates (the content of tradeoff.json)."""
    check_extras("unet-bench tradeoff")
    check_sizes(sizes, depths)
    runs = [read_run(Path(r)) for r in run_dirs]
    ceilings = measure_ceilings(mask_paths, sizes, progress)
    with tempfile.TemporaryDirectory(prefix="unet-bench-tradeoff-") as scratch:
        speeds = [
            measure_speed(
                w,
                d,
                tuple(s),
                device=device,
                batch_sizes=batch_sizes,
                warmup=warmup,
                repeats=repeats,
                max_batch_seconds=max_batch_seconds,
                seed=seed,
                folder=Path(scratch),
                cache_dir=cache_dir,
            )
            for s in sizes
            for d in depths
            for w in widths
        ]
    facts = machine_facts()
    return json.loads(
        json.dumps(
            {
                "schema": SCHEMA,
                "device": device,
                "machine": facts,
                "settings": {
                    "batch_sizes": list(batch_sizes),
                    "warmup": warmup,
                    "repeats": repeats,
                    "seed": seed,
                    "masks": len(mask_paths),
                    "logit_clip": LOGIT_CLIP,
                },
                "ceilings": [asdict(c) for c in ceilings],
                "speeds": [asdict(s) for s in speeds],
                "runs": [asdict(r) for r in runs],
            }
        )
    )


def check_sizes(sizes: Sequence[tuple[int, int]], depths: Sequence[int]) -> None:
    multiple = 2 ** max(depths)
    bad = [f"{h}x{w}" for h, w in sizes if h % multiple or w % multiple]
    if bad:
        raise BenchError(f"sizes {', '.join(bad)} are not multiples of 2**depth = {multiple}: round them, e.g. 320x480")


def render_tradeoff(results: dict) -> str:
    """Markdown: one row per (size, depth, width) with its speed, the size's ceiling and any trained run's Dice."""
    ceilings = {tuple(c["size"]): c for c in results["ceilings"]}
    runs: dict[tuple, list[dict]] = {}
    for run in results["runs"]:
        runs.setdefault((run["width"], run["depth"], tuple(run["size"])), []).append(run)
    lines = [
        f"Device: {results['device']}; resolution ceiling over {results['settings']['masks']} masks; speed = best of "
        f"batches {', '.join(map(str, results['settings']['batch_sizes']))} (median of {results['settings']['repeats']}), "
        "inference only, random weights.",
        "",
        "| input size | depth | width | GFLOP/img | images/s (batch) | ceiling Dice (mean / worst) | trained Dice (epochs) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for point in results["speeds"]:
        size = tuple(point["size"])
        ceiling = ceilings.get(size)
        speed = (
            f"{point['images_per_second']['median']:.2f} ({point['best_batch']})"
            if point["status"] == "ok"
            else f"{point['status']}: {point['reason']}"
        )
        trained = (
            "; ".join(
                f"{r['val_dice']:.4f} ({r['best_epoch']} of {r['epochs']})"
                for r in runs.get((point["width"], point["depth"], size), [])
            )
            or "not trained"
        )
        ceiling_text = f"{ceiling['mean_dice']:.5f} / {ceiling['min_dice']:.5f}" if ceiling else "-"
        lines.append(
            f"| {size[0]}x{size[1]} | {point['depth']} | {point['width']} | {point['gflop_per_image']:.3g} | "
            f"{speed} | {ceiling_text} | {trained} |"
        )
    return "\n".join(lines) + "\n"


def write_tradeoff(results: dict, out_dir: Path) -> dict[str, Path]:
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "tradeoff.json", "md": out_dir / "tradeoff.md"}
    write_atomic(paths["json"], (json.dumps(results, indent=2) + "\n").encode())
    write_atomic(paths["md"], render_tradeoff(results).encode())
    return paths
