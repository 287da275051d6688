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
from batch.core.masks import MaskError, area_fraction, dice, read_mask
from batch.inference.postprocess import upsample_threshold
from benchmarks.config import BenchError, SweepConfig, check_extras, fail_unless
from benchmarks.inference import Backend, backends_for, fastest, sweep_batches
from benchmarks.machine import Hardware, machine_facts, resolve_hardware
from benchmarks.models import BenchModel, random_model
from benchmarks.report import as_json, table, write_files
from benchmarks.timing import Stats

log = logging.getLogger(__name__)

SCHEMA = "unet-bench-tradeoff/1"
LOGIT_CLIP = 1e-3  # a perfect model's probabilities are clipped to [1e-3, 1 - 1e-3] (logits within +-6.9)


@dataclass(frozen=True)
class TradeoffConfig:
    """The options of ``unet-bench tradeoff``: what is measured, and the sweep each configuration's speed comes from."""

    mask_paths: tuple[Path, ...]  # ground truth for the resolution ceiling
    sizes: tuple[tuple[int, int], ...]  # (h, w) model inputs
    widths: tuple[int, ...]
    depths: tuple[int, ...]
    run_dirs: tuple[Path, ...] = ()  # unet-train runs whose best validation Dice joins the table
    device: str = "auto"
    sweep: SweepConfig = SweepConfig((1, 2, 4, 8), warmup=1, repeats=3, max_batch_seconds=10.0)
    seed: int = 0

    def __post_init__(self) -> None:
        multiple = 2 ** max(self.depths, default=0)
        bad = ", ".join(f"{h}x{w}" for h, w in self.sizes if h % multiple or w % multiple)
        checks = {
            "no masks to measure the resolution ceiling on: pass --masks with a folder of mask files": bool(self.mask_paths),
            "sizes, widths and depths must not be empty": bool(self.sizes and self.widths and self.depths),
            f"sizes {bad} are not multiples of 2**depth = {multiple}: round them, e.g. 320x480": not bad,
        }
        fail_unless(checks, "unet-bench tradeoff")


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
    scores = np.empty((len(mask_paths), len(sizes)))
    for i, path in enumerate(tqdm(mask_paths, desc="ceiling", unit="img", disable=not progress)):
        try:
            truth = read_mask(path)
        except MaskError as e:
            raise BenchError(f"{e} (or leave it out of --masks)") from e
        scores[i] = [resolution_ceiling(truth, size) for size in sizes]
    means, worst = scores.mean(axis=0), scores.min(axis=0)
    return [Ceiling(tuple(size), float(means[j]), float(worst[j]), len(mask_paths)) for j, size in enumerate(sizes)]


def measure_speed(model: BenchModel, backend: Backend, sweep: SweepConfig, seed: int) -> SpeedPoint:
    """Best images/s over the sweep's batch sizes of a random-weight U-Net on ``backend``, on random pixels."""
    config, size = model.model_config, model.contract.input_size
    point = dict(width=config["width"], depth=config["depth"], size=size, gflop_per_image=model.gflops(size))
    images = np.random.default_rng(seed).integers(0, 256, (max(sweep.batch_sizes), *size, 3), dtype=np.uint8)  # (N, h, w, 3)
    rows = sweep_batches(model, backend, images, sweep)
    best = fastest(rows)
    if best is None:
        return SpeedPoint(**point, status=rows[0].status, reason=rows[0].reason)
    rate = best.images_per_second
    log.info("w%d d%d %dx%d: %.2f images/s at batch %d", point["width"], point["depth"], *size, rate.median, best.batch_size)
    return SpeedPoint(**point, status="ok", best_batch=best.batch_size, images_per_second=rate)


def measure_speeds(config: TradeoffConfig, hardware: Hardware, cache_dir: Path | None) -> list[SpeedPoint]:
    """Every (size, depth, width) on ``hardware``'s first provider: CPU FP32, or CUDA FP16 with device-resident buffers."""
    backend = backends_for(hardware)[0]
    fp16 = backend.graph_precision == "fp16"
    with tempfile.TemporaryDirectory(prefix="unet-bench-tradeoff-") as scratch:
        return [
            measure_speed(
                random_model(w, d, tuple(s), fp16=fp16, seed=config.seed, folder=Path(scratch), cache_dir=cache_dir),
                backend,
                config.sweep,
                config.seed,
            )
            for s in config.sizes
            for d in config.depths
            for w in config.widths
        ]


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


def run_tradeoff(config: TradeoffConfig, *, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Everything :func:`render_tradeoff` tabulates (the content of tradeoff.json)."""
    check_extras("unet-bench tradeoff")
    runs = [read_run(Path(r)) for r in config.run_dirs]  # a bad run folder fails before minutes of measuring
    ceilings = measure_ceilings(config.mask_paths, config.sizes, progress)
    facts = machine_facts()
    hardware = resolve_hardware(config.device, facts)
    speeds = measure_speeds(config, hardware, cache_dir)
    settings = {"batch_sizes": list(config.sweep.batch_sizes), "warmup": config.sweep.warmup, "repeats": config.sweep.repeats}
    settings |= {"seed": config.seed, "masks": len(config.mask_paths), "logit_clip": LOGIT_CLIP}
    results = {
        "schema": SCHEMA,
        "device": str(hardware.device),
        "machine": facts,
        "settings": settings,
        "ceilings": [asdict(c) for c in ceilings],
        "speeds": [asdict(s) for s in speeds],
        "runs": [asdict(r) for r in runs],
    }
    return json.loads(json.dumps(results))  # tuples -> lists: exactly what tradeoff.json will hold


def render_tradeoff(results: dict) -> str:
    """Markdown: one row per (size, depth, width) with its speed, the size's ceiling and any trained run's Dice."""
    settings = results["settings"]
    head = (
        f"Device: {results['device']}; resolution ceiling over {settings['masks']} masks; speed = best of batches "
        f"{', '.join(map(str, settings['batch_sizes']))} (median of {settings['repeats']}), inference only, random weights."
    )
    header = [
        "input size",
        "depth",
        "width",
        "GFLOP/img",
        "images/s (batch)",
        "ceiling Dice (mean / worst)",
        "trained Dice (epochs)",
    ]
    return f"{head}\n\n{table(header, [tradeoff_cells(point, results) for point in results['speeds']])}\n"


def tradeoff_cells(point: dict, results: dict) -> list[str]:
    size = tuple(point["size"])
    ceiling = next((c for c in results["ceilings"] if tuple(c["size"]) == size), None)
    ok = point["status"] == "ok"
    speed = (
        f"{point['images_per_second']['median']:.2f} ({point['best_batch']})" if ok else f"{point['status']}: {point['reason']}"
    )
    runs = [r for r in results["runs"] if (r["width"], r["depth"], tuple(r["size"])) == (point["width"], point["depth"], size)]
    trained = "; ".join(f"{r['val_dice']:.4f} ({r['best_epoch']} of {r['epochs']})" for r in runs) or "not trained"
    ceiling_text = f"{ceiling['mean_dice']:.5f} / {ceiling['min_dice']:.5f}" if ceiling else "-"
    shape = f"{size[0]}x{size[1]}"
    return [shape, str(point["depth"]), str(point["width"]), f"{point['gflop_per_image']:.3g}", speed, ceiling_text, trained]


def write_tradeoff(results: dict, out_dir: Path) -> dict[str, Path]:
    return write_files(out_dir, {"tradeoff.json": as_json(results), "tradeoff.md": render_tradeoff(results)})
