"""The whole benchmark: decode, the host's cost of a photo, inference sweep, end to end and the peers, then the
three files. On a CPU, inference alone and end to end run under both runtimes, ONNX Runtime and OpenVINO, side by side.

:func:`run_suite` measures and returns the results as a JSON-ready dict; :func:`write_outputs`
writes ``results.json``, ``results.md`` and ``results.png``. The CLI (``benchmarks/cli.py``) is a
thin layer over both. Each stage is one function of the :class:`Run` it measures in, in the order
they run: the inference sweep picks the end-to-end batch size, which the PyTorch peer uses too.
"""

from __future__ import annotations

import json
import logging
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from batch.core.images import is_image_file
from benchmarks.config import BenchError, RunConfig, SuiteConfig, check_extras
from benchmarks.decode import bench_decoders
from benchmarks.end_to_end import CPU_END_TO_END, GPU_END_TO_END, EndToEndConfig, EndToEndResult, run_end_to_end
from benchmarks.host import measure_host_cost
from benchmarks.inference import CPU_BACKENDS, Backend, InferenceResult, backends_for, fastest, sweep_batches
from benchmarks.machine import Hardware, cpu_facts, machine_facts, machine_slug, peak_rss_mib, resolve_hardware
from benchmarks.models import BenchModel, Models
from benchmarks.peers import BASELINES, BaselineResult, run_baseline, run_torch_peer
from benchmarks.synthetic import CARVANA_SIZE, write_synthetic_photos

log = logging.getLogger(__name__)

SCHEMA = "unet-bench/1"
SYNTHETIC_DISTINCT = 64  # synthetic photos drawn one by one; more are copies (decode costs the same)


@dataclass(frozen=True)
class Photos:
    folder: Path  # what `unet-batch segment` reads
    paths: list[Path]  # the photos every stage draws from, in name order
    info: dict  # how results.json describes them


@dataclass(frozen=True)
class Run:
    """What every stage of one run shares."""

    config: RunConfig
    suite: SuiteConfig  # the preset for the device
    hardware: Hardware
    photos: Photos
    models: Models


@dataclass(frozen=True)
class EndToEnd:
    model: BenchModel
    result: EndToEndResult
    reference: InferenceResult | None  # inference alone of the same model, provider and precision, its fastest batch


def run_suite(config: RunConfig, *, cache_dir: Path | None = None, progress: bool = True) -> dict:
    """Measure everything ``config`` asks for; return the results (the content of results.json)."""
    check_extras("unet-bench run", plots=True)
    started = time.perf_counter()
    facts = machine_facts()
    hardware = resolve_hardware(config.device, facts)
    suite = config.preset(hardware.kind)
    with tempfile.TemporaryDirectory(prefix="unet-bench-") as scratch:
        photos = prepare_photos(config, suite, Path(scratch), progress)
        run = Run(config, suite, hardware, photos, Models(config, Path(scratch), cache_dir, photos.paths[: suite.images]))
        decode, decoded = bench_decoders(photos.paths[: suite.images], run.models.size, suite, hardware)
        host = measure_host_cost(photos.paths[: suite.images], run.models.size)
        inference = measure_inference(run, decoded)
        plan = CPU_END_TO_END if hardware.kind == "cpu" else GPU_END_TO_END
        e2e_runs = {key: measure_end_to_end(run, inference, *what) for key, what in plan.items()}
        e2e = e2e_runs["end_to_end"]
        baselines = measure_peers(run, e2e)
    load = facts["cpu"]["load_average_1min"], cpu_facts()["load_average_1min"]  # at the start and at the end
    results = {
        "schema": SCHEMA,
        "suite": suite.name,
        "suite_config": asdict(suite),
        "device": str(hardware.device),
        "machine_slug": machine_slug(facts, str(hardware.device)),
        "machine": facts | {"load_average_1min_at_end": load[1]},
        "settings": settings(run, inference, e2e.model),
        "decode": [asdict(r) for r in decode],
        "host_cost": asdict(host),
        "inference": [asdict(r) for r in inference],
        **end_to_end_sections(e2e_runs, baselines),
        "memory": memory_summary(inference, e2e.result),
        "notes": run_notes(run, *load),
        "duration_seconds": round(time.perf_counter() - started, 1),
    }
    return json.loads(json.dumps(results))  # tuples -> lists: exactly what results.json will hold


def prepare_photos(config: RunConfig, suite: SuiteConfig, scratch: Path, progress: bool) -> Photos:
    """The photos every stage draws from: the first of --images, else synthetic ones written into ``scratch``."""
    needed = max(suite.images, suite.e2e_images, suite.baseline_images + 1)
    if config.images_dir:
        folder = Path(config.images_dir)
        paths = list_photos(folder, needed)
        return Photos(folder, paths, {"kind": "real", "dir": str(folder.resolve()), "count": len(paths)})
    folder = scratch / "photos"
    log.info("synthesizing %d Carvana-like %dx%d JPEGs (no --images given)", needed, CARVANA_SIZE[1], CARVANA_SIZE[0])
    paths = write_synthetic_photos(folder, needed, distinct=SYNTHETIC_DISTINCT, seed=config.seed, progress=progress)
    distinct = min(needed, SYNTHETIC_DISTINCT)
    return Photos(
        folder, paths, {"kind": "synthetic", "dir": None, "count": len(paths), "distinct": distinct, "size": list(CARVANA_SIZE)}
    )


def list_photos(folder: Path, count: int) -> list[Path]:
    """The first ``count`` photos of ``folder`` in name order (what ``unet-batch --limit`` takes too)."""
    photos = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not photos:
        raise BenchError(f"--images {folder} holds no .jpg, .jpeg or .png photos: point it at a folder of photos")
    if len(photos) < count:
        log.warning("--images %s has %d photos; this suite wants %d, using all of them", folder, len(photos), count)
    return photos[:count]


def measure_inference(run: Run, decoded) -> list[InferenceResult]:
    """The sweep of batch sizes for every (model, provider) pair of :func:`sweep_plan`."""
    rows: list[InferenceResult] = []
    for model, backend in sweep_plan(run.config, run.suite, run.hardware, run.models):
        log.info("inference: %s on %s", model.name, backend.label)
        rows += sweep_batches(model, backend, decoded, run.suite.sweep)
    return rows


def sweep_plan(config: RunConfig, suite: SuiteConfig, hardware: Hardware, models: Models) -> list[tuple[BenchModel, Backend]]:
    """(model, backend) pairs of the inference sweep: every width on every provider, plus the end-to-end model."""
    plan = []
    e2e_width = None if config.model else config.width
    widths = sorted(set(suite.widths) | ({e2e_width} if e2e_width else set()))
    for backend in backends_for(hardware):
        if config.model:
            model = models.user(backend.graph_precision)
            fits = model.precision == backend.graph_precision or backend.name in CPU_BACKENDS
            # a user's INT8 file fits both precisions of a CPU runtime: it runs once per runtime
            if fits and not any(planned.path == model.path and b.runtime == backend.runtime for planned, b in plan):
                plan.append((model, labelled(backend, model.precision)))
        chosen = widths if backend.name != "tensorrt" or suite.tensorrt_all_widths else [e2e_width]
        plan += [(models.random(w, backend.graph_precision), backend) for w in chosen if w is not None]
    return plan


def labelled(backend: Backend, precision: str) -> Backend:
    """A CPU runtime running a user's FP16 graph is labelled FP16."""
    if backend.name not in CPU_BACKENDS or precision == backend.precision:
        return backend
    return Backend(backend.name, backend.provider, precision, backend.device_id, precision)


def best_row(inference: list[InferenceResult], model: BenchModel, backend: str) -> InferenceResult | None:
    """The fastest measured batch size of ``model`` (at its precision) on ``backend``."""
    return fastest([r for r in inference if (r.model, r.backend, r.precision) == (model.name, backend, model.precision)])


def measure_end_to_end(run: Run, inference: list[InferenceResult], precision: str, backend: str) -> EndToEnd:
    """``unet-batch segment`` with the run's model at ``precision`` on ``backend`` (its ``--runtime`` on a CPU), at the
    fastest batch the sweep found for that model on that backend."""
    model = run.models.for_e2e(precision)
    reference = best_row(inference, model, backend)
    batch = reference.batch_size if reference else run.suite.batch_sizes[0]
    runtime = ("openvino" if backend == "openvino" else "onnxruntime") if backend in CPU_BACKENDS else None
    config = EndToEndConfig(batch, min(run.suite.e2e_images, len(run.photos.paths)), run.suite.e2e_repeats, runtime)
    log.info(
        "end to end: %s %s%s, batch %d, %d photos x %d runs",
        model.name, precision, f" with {runtime}" if runtime else "", batch, config.images, config.repeats,
    )  # fmt: skip
    return EndToEnd(model, run_end_to_end(run.photos.folder, model, run.hardware, config), reference)


def measure_peers(run: Run, e2e: EndToEnd) -> list[BaselineResult]:
    """The naive loops with the end-to-end model, and on a GPU the PyTorch peer at the end-to-end batch size."""
    paths = run.photos.paths
    found = [run_baseline(name, paths[: run.suite.baseline_images + 1], e2e.model, run.hardware) for name in BASELINES]
    if run.hardware.kind == "cuda":
        images, batch = e2e.result.images, e2e.result.batch_size
        log.info("the PyTorch peer: %d photos, batch %d", images, batch)
        found.append(run_torch_peer(paths[:images], e2e.model, run.hardware, batch))
    return found


def settings(run: Run, inference: list[InferenceResult], e2e_model: BenchModel) -> dict:
    return {
        "input_size": list(run.models.size),
        "photos": run.photos.info,
        "threads": run.hardware.threads,
        "widths": sorted({r.width for r in inference if r.width is not None}),
        "batch_sizes": list(run.suite.batch_sizes),
        "end_to_end_model": e2e_model.name,
        "user_model": str(run.config.model) if run.config.model else None,
    }


def end_to_end_sections(runs: dict[str, EndToEnd], baselines: list[BaselineResult]) -> dict:
    """The end-to-end runs, the peers, and the ratios between them, inference alone and each other (INT8 over FP32,
    OpenVINO over ONNX Runtime); on a GPU the CPU's sections are None."""
    sections: dict = {key: None for key in CPU_END_TO_END} | {key.replace("end_to_end", "ratios"): None for key in CPU_END_TO_END}
    sections["baselines"] = [asdict(r) for r in baselines]
    for key, e2e in runs.items():
        sections[key] = asdict(e2e.result)
        found = ratios(e2e.result, baselines, e2e.reference)
        found |= relative_to(e2e, runs.get(key.replace("_int8", "")), "fp32")
        found |= relative_to(e2e, runs.get(key.replace("_openvino", "")), "onnxruntime")
        sections[key.replace("end_to_end", "ratios")] = found
    return sections


def relative_to(e2e: EndToEnd, other: EndToEnd | None, name: str) -> dict:
    """``e2e`` over ``other`` (the FP32 run of an INT8 one, ONNX Runtime's run of OpenVINO's), end to end and in
    inference alone; nothing when there is no such other run."""
    if other is None or other is e2e:
        return {}
    return {
        f"end_to_end_over_{name}": speedup(e2e.result, other.result),
        f"inference_over_{name}": speedup(e2e.reference, other.reference),
    }


def ratios(e2e: EndToEndResult, baselines: list[BaselineResult], reference: InferenceResult | None) -> dict:
    """End-to-end speed over each naive baseline and over inference alone (same model, provider, batch)."""
    out: dict = {"end_to_end_over_baseline": {}, "end_to_end_over_inference": None, "inference_reference": None}
    if e2e.status != "ok":
        return out
    speed = e2e.images_per_second.median
    for b in baselines:
        if b.status == "ok":
            out["end_to_end_over_baseline"][b.baseline] = speed / b.images_per_second.median
    if reference is not None:
        rate = reference.images_per_second.median
        out["end_to_end_over_inference"] = speed / rate
        out["inference_reference"] = dict(label=reference.label, model=reference.model, batch_size=reference.batch_size)
        out["inference_reference"]["images_per_second"] = rate
    return out


def speedup(new, old) -> float | None:
    """``new``'s median images/s over ``old``'s (results of any stage), when both were measured."""
    measured = new is not None and old is not None and new.status == old.status == "ok"
    return new.images_per_second.median / old.images_per_second.median if measured else None


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


def run_notes(run: Run, load_start: float | None, load_end: float | None) -> list[str]:
    """What a reader of the figures must know: synthetic photos, random weights, a busy machine."""
    notes = [
        "The inference sweep's width-N models have random weights (speed does not depend on them)"
        + ("; the end-to-end model is the one given with --model." if run.config.model else ", the end-to-end one too.")
    ]
    info = run.photos.info
    if info["kind"] == "synthetic":
        notes.append(
            f"Photos: {info['count']} synthetic {CARVANA_SIZE[1]}x{CARVANA_SIZE[0]} JPEGs "
            f"({info['distinct']} distinct, the rest copies) made by unet-bench: studio-car imitations with "
            "realistic JPEG content, so decode speed is realistic. Pass --images for real photos."
        )
    cores = run.hardware.threads
    if load_start is not None and load_end is not None and max(load_start, load_end) > 0.5 * cores:
        notes.append(
            f"The machine was shared: 1-minute load average {load_start:.1f} at the start and {load_end:.1f} at the end "
            f"on {cores} cores (the benchmark itself adds up to {cores}). CPU figures are lower than on an idle machine."
        )
    return notes


def write_outputs(results: dict, out_dir: Path) -> dict[str, Path]:
    """Write results.json, results.md and results.png into ``out_dir``; return their paths."""
    from benchmarks.report import as_json, draw_results, render_markdown, write_files

    paths = write_files(out_dir, {"results.json": as_json(results), "results.md": render_markdown(results)})
    paths["png"] = out_dir / "results.png"
    draw_results(results).savefig(paths["png"])
    return paths


def failures(results: dict) -> list[str]:
    """Human-readable list of the benchmarks that failed (skips are not failures)."""
    found = [f"decode {r['label']}: {r['reason']}" for r in results["decode"] if r["status"] == "failed"]
    found += [
        f"inference {r['label']} {r['model']} batch {r['batch_size']}: {r['reason']}"
        for r in results["inference"]
        if r["status"] == "failed"
    ]
    for key in CPU_END_TO_END:
        if (results.get(key) or {}).get("status") == "failed":
            found.append(f"{key.replace('_', ' ')}: {results[key]['reason']}")
    found += [f"baseline {r['label']}: {r['reason']}" for r in results["baselines"] if r["status"] == "failed"]
    return found
