"""The whole benchmark: decode, inference sweep, end to end and naive baselines, then the three files.

:func:`run_suite` measures and returns the results as a JSON-ready dict; :func:`write_outputs`
writes ``results.json``, ``results.md`` and ``results.png``. The CLI (``benchmarks/cli.py``) is a
thin layer over both.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from batch.core.devices import Device, parse_device
from batch.core.images import is_image_file
from batch.inference.runtime import check_device, provider_missing
from benchmarks.baselines import BASELINES, run_baseline
from benchmarks.config import DEFAULT_INPUT_SIZE, RunConfig, SuiteConfig, check_extras
from benchmarks.decode import bench_decoders
from benchmarks.end_to_end import EndToEndResult, run_end_to_end
from benchmarks.errors import BenchError
from benchmarks.inference import CUDA, Backend, InferenceResult, backends_for, sweep_batches
from benchmarks.machine import cpu_facts, machine_facts, machine_slug
from benchmarks.memory import peak_rss_mib
from benchmarks.models import BenchModel, int8_model, random_model, user_model
from benchmarks.synthetic import CARVANA_SIZE, write_synthetic_photos
from benchmarks.torch_peer import run_torch_peer

log = logging.getLogger(__name__)

SCHEMA = "unet-bench/1"
SYNTHETIC_DISTINCT = 64  # synthetic photos drawn one by one; more are copies (decode costs the same)


def resolve_device(requested: str, gpus: list[dict]) -> Device:
    """``auto`` -> ``cuda:0`` when ONNX Runtime has CUDA and a GPU is present, else ``cpu``; check ``cuda[:N]``."""
    device = parse_device(requested)
    if device.kind == "auto":
        chosen = parse_device("cuda:0" if gpus and provider_missing(CUDA) is None else "cpu")
        log.info("--device auto: benchmarking %s", chosen)
        return chosen
    if device.kind == "cpu":
        return device
    check_device(device)
    if device.index not in {g["index"] for g in gpus}:
        raise BenchError(
            f"--device {device}: nvidia-smi lists GPUs {[g['index'] for g in gpus] or 'none'}; "
            "check the driver or choose another index"
        )
    return device


def list_photos(folder: Path, count: int) -> list[Path]:
    """The first ``count`` photos of ``folder`` in name order (what ``unet-batch --limit`` takes too)."""
    photos = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not photos:
        raise BenchError(f"--images {folder} holds no .jpg, .jpeg or .png photos: point it at a folder of photos")
    if len(photos) < count:
        log.warning("--images %s has %d photos; this suite wants %d, using all of them", folder, len(photos), count)
    return photos[:count]


def input_size_for(config: RunConfig, model: Path | None) -> tuple[int, int]:
    if config.input_size is not None:
        return config.input_size
    if model is not None and model.suffix == ".onnx":
        from benchmarks.models import read_model

        return read_model(model).contract.input_size
    if model is not None:
        from unet.checkpoint import load_checkpoint

        return tuple(load_checkpoint(model)["input_size"])
    return DEFAULT_INPUT_SIZE


class Models:
    """Exported models by (name, graph precision), made on first use; INT8 ones are quantized from the FP32 ones."""

    def __init__(self, config: RunConfig, size: tuple[int, int], folder: Path, cache_dir: Path | None, photos: list[Path]):
        self.config, self.size, self.folder, self.cache_dir = config, size, folder, cache_dir
        self.photos = photos  # INT8 calibration
        self._made: dict[tuple[str, str], BenchModel] = {}

    def random(self, width: int, precision: str) -> BenchModel:
        key = (f"w{width}", precision)
        if key in self._made:
            return self._made[key]
        if precision == "int8":
            self._made[key] = self.int8(self.random(width, "fp32"))
        else:
            self._made[key] = random_model(
                width,
                self.config.depth,
                self.size,
                fp16=precision == "fp16",
                seed=self.config.seed,
                folder=self.folder,
                cache_dir=self.cache_dir,
            )
        return self._made[key]

    def user(self, precision: str) -> BenchModel:
        path = self.config.model
        key = ("user", precision if path.suffix == ".pt" or precision == "int8" else "as-is")
        if key in self._made:
            return self._made[key]
        if precision == "int8":
            self._made[key] = self.int8(self.user("fp32"))
        else:
            self._made[key] = user_model(path, fp16=precision == "fp16", input_size=self.size, folder=self.folder)
        return self._made[key]

    def int8(self, model: BenchModel) -> BenchModel:
        """``model`` quantized to INT8; a user's INT8 or FP16 file as it is (only FP32 graphs are quantized)."""
        if model.precision != "fp32":
            return model
        return int8_model(model, self.photos, folder=self.folder, cache_dir=self.cache_dir)

    def for_e2e(self, precision: str) -> BenchModel:
        return self.user(precision) if self.config.model else self.random(self.config.width, precision)


def sweep_plan(
    config: RunConfig, suite: SuiteConfig, device: str, device_id: int | None, models: Models
) -> list[tuple[BenchModel, Backend]]:
    """(model, backend) pairs of the inference sweep: every width on every provider, plus the end-to-end model."""
    plan = []
    e2e_width = None if config.model else config.width
    widths = sorted(set(suite.widths) | ({e2e_width} if e2e_width else set()))
    for backend in backends_for(device, device_id):
        if config.model:
            model = models.user(backend.graph_precision)
            fits = model.precision == backend.graph_precision or (device == "cpu" and backend.name == "cpu")
            if fits and not any(planned.path == model.path for planned, _ in plan):  # a user's INT8 file fits both CPU backends
                plan.append((model, with_precision(backend, model.precision)))
        chosen = widths if backend.name != "tensorrt" or suite.tensorrt_all_widths else [e2e_width]
        plan += [(models.random(w, backend.graph_precision), backend) for w in chosen if w is not None]
    return plan


def with_precision(backend: Backend, precision: str) -> Backend:
    """The CPU provider running a user's FP16 graph is labelled FP16."""
    if backend.name != "cpu" or precision == backend.precision:
        return backend
    return Backend(backend.name, backend.provider, precision, backend.device_id, precision)


def run_suite(config: RunConfig, *, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Measure everything ``config`` asks for; return the results (the content of results.json)."""
    check_extras("unet-bench run")
    started = time.perf_counter()
    facts = machine_facts()
    chosen = resolve_device(config.device, facts["gpus"])
    device, kind, device_id = str(chosen), chosen.kind, chosen.index if chosen.is_cuda else None
    gpu_name = next((g["name"] for g in facts["gpus"] if g["index"] == device_id), None) if kind == "cuda" else None
    threads = facts["cpu"]["usable_cores"] or 1
    suite = config.preset(kind)
    size = input_size_for(config, config.model)

    with tempfile.TemporaryDirectory(prefix="unet-bench-") as scratch:
        scratch = Path(scratch)
        images_dir, photos, image_info = prepare_photos(config, suite, scratch, progress)

        log.info("decode: %d photos to %dx%d, %d threads", len(photos[: suite.images]), *size, threads)
        decode, decoded = bench_decoders(
            photos[: suite.images],
            size,
            device_id=device_id,
            threads=threads,
            warmup=suite.warmup,
            repeats=suite.repeats,
            dali_batch=min(suite.dali_batch, len(photos[: suite.images])),
        )

        models = Models(config, size, scratch, cache_dir, photos[: suite.images])
        inference: list[InferenceResult] = []
        for model, backend in sweep_plan(config, suite, kind, device_id, models):
            log.info("inference: %s on %s", model.name, backend.label)
            inference += sweep_batches(
                model,
                backend,
                decoded,
                suite.batch_sizes,
                warmup=suite.warmup,
                repeats=suite.repeats,
                max_batch_seconds=suite.max_batch_seconds,
                gpu_name=gpu_name,
            ).results

        e2e_model = models.for_e2e("fp32" if kind == "cpu" else "fp16")
        reference = best_row(inference, e2e_model.name, "cpu" if kind == "cpu" else "cuda", e2e_model.precision)
        e2e_batch = reference.batch_size if reference else suite.batch_sizes[0]
        e2e_images = min(suite.e2e_images, len(photos))
        log.info("end to end: %s, batch %d, %d photos x %d runs", e2e_model.name, e2e_batch, e2e_images, suite.e2e_repeats)
        e2e = run_end_to_end(
            images_dir,
            e2e_model,
            device=device,
            gpu_index=device_id,
            batch_size=e2e_batch,
            images=e2e_images,
            repeats=suite.e2e_repeats,
            timeout_s=max(600.0, 10.0 * e2e_images),
        )
        e2e_int8, int8_reference = None, None
        if kind == "cpu":  # the same model quantized, as `unet-batch` runs the bundled INT8 file on a CPU
            int8 = models.for_e2e("int8")
            int8_reference = best_row(inference, int8.name, "cpu", "int8")
            log.info("end to end, INT8: %s, %d photos x %d runs", int8.name, e2e_images, suite.e2e_repeats)
            e2e_int8 = run_end_to_end(
                images_dir,
                int8,
                device=device,
                gpu_index=None,
                batch_size=int8_reference.batch_size if int8_reference else e2e_batch,
                images=e2e_images,
                repeats=suite.e2e_repeats,
                timeout_s=max(600.0, 10.0 * e2e_images),
            )

        checkpoint = config.model if config.model and config.model.suffix == ".pt" else None
        baselines = [
            run_baseline(
                name,
                photos[: suite.baseline_images + 1],
                e2e_model,
                device=kind,
                device_id=device_id,
                checkpoint=checkpoint,
                seed=config.seed,
            )
            for name in BASELINES
        ]
        if kind == "cuda":
            log.info("the PyTorch peer: %d photos, batch %d", e2e_images, e2e_batch)
            baselines.append(
                run_torch_peer(
                    photos[:e2e_images],
                    e2e_model,
                    device_id=device_id,
                    batch_size=e2e_batch,
                    checkpoint=checkpoint,
                    seed=config.seed,
                    threads=threads,
                )
            )

    load_end = cpu_facts()["load_average_1min"]
    return json.loads(
        json.dumps(
            {  # tuples -> lists: exactly what results.json will hold
                "schema": SCHEMA,
                "suite": suite.name,
                "suite_config": asdict(suite),
                "device": device,
                "machine_slug": machine_slug(facts, device),
                "machine": facts | {"load_average_1min_at_end": load_end},
                "settings": {
                    "input_size": list(size),
                    "photos": image_info,
                    "threads": threads,
                    "widths": sorted({r.width for r in inference if r.width is not None}),
                    "batch_sizes": list(suite.batch_sizes),
                    "end_to_end_model": e2e_model.name,
                    "user_model": str(config.model) if config.model else None,
                },
                "decode": [asdict(r) for r in decode],
                "inference": [asdict(r) for r in inference],
                "end_to_end": asdict(e2e),
                "end_to_end_int8": asdict(e2e_int8) if e2e_int8 else None,
                "baselines": [asdict(r) for r in baselines],
                "ratios": ratios(e2e, baselines, reference),
                "ratios_int8": int8_ratios(e2e_int8, e2e, baselines, int8_reference, reference) if e2e_int8 else None,
                "memory": memory_summary(inference, e2e),
                "notes": run_notes(image_info, config, facts["cpu"], load_end),
                "duration_seconds": round(time.perf_counter() - started, 1),
            }
        )
    )


def prepare_photos(config: RunConfig, suite: SuiteConfig, scratch: Path, progress: bool) -> tuple[Path, list[Path], dict]:
    """The photo folder, the photos every stage draws from, and how results.json describes them."""
    needed = max(suite.images, suite.e2e_images, suite.baseline_images + 1)
    if config.images_dir:
        images_dir = Path(config.images_dir)
        photos = list_photos(images_dir, needed)
        return images_dir, photos, {"kind": "real", "dir": str(images_dir.resolve()), "count": len(photos)}
    images_dir = scratch / "photos"
    log.info("synthesizing %d Carvana-like %dx%d JPEGs (no --images given)", needed, CARVANA_SIZE[1], CARVANA_SIZE[0])
    photos = write_synthetic_photos(images_dir, needed, distinct=SYNTHETIC_DISTINCT, seed=config.seed, progress=progress)
    info = {
        "kind": "synthetic",
        "dir": None,
        "count": len(photos),
        "distinct": min(needed, SYNTHETIC_DISTINCT),
        "size": list(CARVANA_SIZE),
    }
    return images_dir, photos, info


def run_notes(image_info: dict, config: RunConfig, cpu: dict, load_end: float | None) -> list[str]:
    """What a reader of the figures must know: synthetic photos, random weights, a busy machine."""
    notes = [
        "The inference sweep's width-N models have random weights (speed does not depend on them)"
        + ("; the end-to-end model is the one given with --model." if config.model else ", the end-to-end one too.")
    ]
    if image_info["kind"] == "synthetic":
        notes.append(
            f"Photos: {image_info['count']} synthetic {CARVANA_SIZE[1]}x{CARVANA_SIZE[0]} JPEGs "
            f"({image_info['distinct']} distinct, the rest copies) made by unet-bench: studio-car imitations with "
            "realistic JPEG content, so decode speed is realistic. Pass --images for real photos."
        )
    return notes + load_notes(cpu, load_end)


def best_row(inference: list[InferenceResult], model: str, backend: str, precision: str) -> InferenceResult | None:
    """The fastest measured batch size of ``model`` on ``backend`` at ``precision``."""
    rows = [r for r in inference if r.status == "ok" and r.model == model and r.backend == backend and r.precision == precision]
    return max(rows, key=lambda r: r.images_per_second.median) if rows else None


def ratios(e2e: EndToEndResult, baselines: list, reference: InferenceResult | None) -> dict:
    """End-to-end speed over each naive baseline and over inference alone (same model, provider, batch)."""
    out: dict = {"end_to_end_over_baseline": {}, "end_to_end_over_inference": None, "inference_reference": None}
    if e2e.status != "ok":
        return out
    speed = e2e.images_per_second.median
    for b in baselines:
        if b.status == "ok":
            out["end_to_end_over_baseline"][b.baseline] = speed / b.images_per_second.median
    if reference is not None:
        out["end_to_end_over_inference"] = speed / reference.images_per_second.median
        out["inference_reference"] = {
            "label": reference.label,
            "model": reference.model,
            "batch_size": reference.batch_size,
            "images_per_second": reference.images_per_second.median,
        }
    return out


def int8_ratios(
    e2e_int8: EndToEndResult,
    e2e: EndToEndResult,
    baselines: list,
    int8_reference: InferenceResult | None,
    reference: InferenceResult | None,
) -> dict:
    """:func:`ratios` of the INT8 end-to-end run, and INT8 over FP32 end to end and in inference alone."""
    out = ratios(e2e_int8, baselines, int8_reference)
    both = e2e_int8.status == "ok" and e2e.status == "ok"
    out["end_to_end_over_fp32"] = e2e_int8.images_per_second.median / e2e.images_per_second.median if both else None
    out["inference_over_fp32"] = (
        int8_reference.images_per_second.median / reference.images_per_second.median if int8_reference and reference else None
    )
    return out


def memory_summary(inference: list[InferenceResult], e2e: EndToEndResult) -> dict:
    gpu = [(r.gpu_memory_mib, r.gpu_memory_method) for r in inference if r.gpu_memory_mib is not None]
    peak_gpu = max(gpu, default=(None, None))
    return {
        "benchmark_peak_rss_mib": round(peak_rss_mib(), 1),  # this process: decoders, sessions, torch baseline
        "end_to_end_peak_rss_mib": e2e.peak_rss_mib,  # the unet-batch process alone
        "inference_gpu_peak_mib": peak_gpu[0],
        "inference_gpu_method": peak_gpu[1],
        "end_to_end_gpu_peak_mib": e2e.gpu_memory_mib,
        "end_to_end_gpu_method": e2e.gpu_memory_method,
    }


def load_notes(cpu: dict, load_end: float | None) -> list[str]:
    """A warning when other work shared the CPU: figures are then lower bounds."""
    cores, start = cpu.get("usable_cores") or 1, cpu.get("load_average_1min")
    if start is None or load_end is None:
        return []
    if max(start, load_end) > 0.5 * cores:
        return [
            f"The machine was shared: 1-minute load average {start:.1f} at the start and {load_end:.1f} at the end "
            f"on {cores} cores (the benchmark itself adds up to {cores}). CPU figures are lower than on an idle machine."
        ]
    return []


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``; return their paths."""
    from benchmarks.plot import draw_results
    from benchmarks.report import render_markdown

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md", "png": out_dir / "results.png"}
    paths["json"].write_text(json.dumps(results, indent=2) + "\n")
    paths["md"].write_text(render_markdown(results))
    draw_results(results).save(paths["png"])
    return paths


def failures(results: dict) -> list[str]:
    """Human-readable list of the benchmarks that failed (skips are not failures)."""
    found = [f"decode {r['label']}: {r['reason']}" for r in results["decode"] if r["status"] == "failed"]
    found += [
        f"inference {r['label']} {r['model']} batch {r['batch_size']}: {r['reason']}"
        for r in results["inference"]
        if r["status"] == "failed"
    ]
    if results["end_to_end"]["status"] == "failed":
        found.append(f"end to end: {results['end_to_end']['reason']}")
    if (results.get("end_to_end_int8") or {}).get("status") == "failed":
        found.append(f"end to end, INT8: {results['end_to_end_int8']['reason']}")
    found += [f"baseline {r['label']}: {r['reason']}" for r in results["baselines"] if r["status"] == "failed"]
    return found
