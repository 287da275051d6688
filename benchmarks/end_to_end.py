"""End to end: the real ``unet-batch segment`` command on real (or synthetic) photos.

Each repeat is a fresh process writing PNG masks into a fresh folder, so nothing is cached in the
runner between repeats (the page cache is warm: the decode benchmark read the same files). The
headline is the steady rate from the runner's report.json: photos over its seconds less its one-time
``discover`` and ``setup`` stages (finding the photos, loading the model), which a long run
amortizes and which the inference and baseline figures leave out too. The runner's own rate
(set-up included) and the wall-clock rate (process start included) are recorded beside it.
"""

from __future__ import annotations

import json
import logging
import shutil
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.config import BenchError
from benchmarks.machine import ChildRun, Hardware, run_child
from benchmarks.models import BenchModel
from benchmarks.timing import Stats, summarize

log = logging.getLogger(__name__)

REPORT_KEYS = ("processed", "seconds", "images_per_second", "stages")
# results.json's end-to-end sections: key -> (precision, backend). Each has its ratios under the key with
# "end_to_end" replaced by "ratios". On a CPU the first two are ONNX Runtime's, the last two OpenVINO's.
CPU_END_TO_END = {
    "end_to_end": ("fp32", "cpu"),
    "end_to_end_int8": ("int8", "cpu"),  # `unet-batch` runs the bundled INT8 file on a CPU
    "end_to_end_openvino": ("fp32", "openvino"),
    "end_to_end_int8_openvino": ("int8", "openvino"),
}
GPU_END_TO_END = {"end_to_end": ("fp16", "cuda")}
ONE_TIME_STAGES = ("discover", "setup")


@dataclass(frozen=True)
class EndToEndConfig:
    """How ``unet-batch segment`` is run: on the first ``images`` photos, ``repeats`` times, at ``batch_size``, with
    ``runtime`` (``--runtime`` on the CPU: onnxruntime or openvino; None: the runner's default)."""

    batch_size: int
    images: int
    repeats: int
    runtime: str | None = None

    def __post_init__(self) -> None:
        if min(self.batch_size, self.images, self.repeats) < 1:
            raise ValueError(f"batch size, photos and repeats must be >= 1, got {self}")

    @property
    def timeout_s(self) -> float:
        """Generous: a slow CPU takes seconds per photo; a hung runner must still not stop the suite."""
        return max(600.0, 10.0 * self.images)


@dataclass(frozen=True)
class EndToEndResult:
    status: str  # "ok", "failed"
    reason: str | None = None
    command: list[str] = field(default_factory=list)  # the first repeat's command line
    model: str | None = None
    width: int | None = None
    precision: str | None = None
    batch_size: int | None = None
    images: int | None = None  # photos per run
    repeats: int = 0
    device: str | None = None  # as the runner reported it
    runtime: str | None = None  # onnxruntime or openvino, as the runner reported it
    decoder: str | None = None
    images_per_second: Stats | None = None  # steady rate: the runner's seconds less discover + setup
    runner_images_per_second: Stats | None = None  # the report's own figure, set-up included
    wall_images_per_second: Stats | None = None  # including process start
    setup_seconds: Stats | None = None  # the runner's discover + setup stages
    stage_ms_per_image: dict[str, float] = field(default_factory=dict)  # median repeat's stages
    peak_rss_mib: float | None = None  # of the runner process, highest over repeats
    gpu_memory_mib: float | None = None
    gpu_memory_method: str | None = None
    report: dict = field(default_factory=dict)  # the median repeat's report.json


def batch_command() -> list[str]:
    """The installed ``unet-batch`` console script (beside this interpreter first)."""
    beside = Path(sys.executable).with_name("unet-batch")
    found = str(beside) if beside.is_file() else shutil.which("unet-batch")
    if found is None:
        raise BenchError("the unet-batch command is not installed: run `pip install -e .` in the repository")
    return [found]


def segment_command(images_dir: Path, model: BenchModel, hardware: Hardware, config: EndToEndConfig, out: Path) -> list[str]:
    """``unet-batch segment`` on the first photos of ``images_dir``, masks into ``out/masks``, report in ``out``."""
    options = {"--model": model.path, "--device": hardware.device, "--batch-size": config.batch_size, "--limit": config.images}
    options["--report"] = out / "report.json"
    if config.runtime:
        options["--runtime"] = config.runtime
    flags = [str(part) for pair in options.items() for part in pair]
    return [*batch_command(), "segment", str(images_dir), str(out / "masks"), *flags, "--overwrite", "--no-progress"]


def run_end_to_end(images_dir: Path, model: BenchModel, hardware: Hardware, config: EndToEndConfig) -> EndToEndResult:
    """Run ``unet-batch segment`` ``config.repeats`` times; a run that fails is the result's reason."""
    base = dict(model=model.name, width=model.width, precision=model.precision, images=config.images)
    base["batch_size"] = config.batch_size
    runs: list[tuple[dict, ChildRun]] = []
    command: list[str] = []
    try:
        with tempfile.TemporaryDirectory(prefix="unet-bench-e2e-") as scratch:
            for repeat in range(config.repeats):
                out = Path(scratch) / f"run{repeat}"
                out.mkdir()
                command = segment_command(images_dir, model, hardware, config, out)
                log.info("end to end %d/%d: %s", repeat + 1, config.repeats, " ".join(command))
                runs.append(run_once(command, out, hardware, config))
    except BenchError as e:
        return EndToEndResult(status="failed", reason=str(e), command=command, **base)
    return summarize_runs(runs, command, config, base)


def run_once(command: list[str], out: Path, hardware: Hardware, config: EndToEndConfig) -> tuple[dict, ChildRun]:
    """One fresh ``unet-batch`` process: its checked report and how the process ran; BenchError saying why not."""
    with open(out / "stderr", "w") as stderr:
        child = run_child(command, stdout=stderr, stderr=stderr, timeout_s=config.timeout_s, gpu_index=hardware.device_id)
    if child.returncode != 0:
        tail = " | ".join((out / "stderr").read_text(errors="replace").strip().splitlines()[-3:])
        raise BenchError(f"unet-batch exited with {child.returncode}: {tail}"[:1000])
    report = read_report(out / "report.json")
    if report["processed"] != config.images:
        raise BenchError(
            f"unet-batch processed {report['processed']} of {config.images} photos "
            f"(failed: {report.get('failed')}, skipped: {report.get('skipped')})"
        )
    steady_rate(report)  # a report that is all set-up is an error now, not a division by zero later
    return report, child


def read_report(path: Path) -> dict:
    try:
        report = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise BenchError(f"unet-batch wrote no readable report at {path} ({e})") from e
    missing = [key for key in REPORT_KEYS if key not in report]
    if missing:
        raise BenchError(f"unet-batch's report {path} lacks {', '.join(missing)}: is unet-batch older than unet-bench?")
    return report


def setup_seconds(report: dict) -> float:
    return sum(float(report["stages"].get(stage, 0.0)) for stage in ONE_TIME_STAGES)


def steady_rate(report: dict) -> float:
    """Photos per second once the runner is set up."""
    working = float(report["seconds"]) - setup_seconds(report)
    if working <= 0:
        raise BenchError(f"unet-batch reported {report['seconds']} s in all but {setup_seconds(report)} s of set-up")
    return report["processed"] / working


def summarize_runs(runs: list[tuple[dict, ChildRun]], command: list[str], config: EndToEndConfig, base: dict) -> EndToEndResult:
    """The rates over repeats, and the stages and report of the repeat closest to the median."""
    reports = [report for report, _ in runs]
    steady = [steady_rate(r) for r in reports]
    rate = summarize(steady)
    median_report = reports[min(range(len(reports)), key=lambda i: abs(steady[i] - rate.median))]
    processed = median_report["processed"]
    gpu = [child.gpu_memory for _, child in runs if child.gpu_memory is not None]
    peak_gpu = max((g for g in gpu if g.mib is not None), key=lambda g: g.mib, default=gpu[0] if gpu else None)
    return EndToEndResult(
        status="ok",
        command=command,
        repeats=len(reports),
        device=median_report.get("device"),
        runtime=(median_report.get("runtime") or {}).get("name"),
        decoder=median_report.get("decoder"),
        images_per_second=rate,
        runner_images_per_second=summarize([r["images_per_second"] for r in reports]),
        wall_images_per_second=summarize([config.images / child.seconds for _, child in runs]),
        setup_seconds=summarize([setup_seconds(r) for r in reports]),
        stage_ms_per_image={name: 1e3 * float(seconds) / processed for name, seconds in median_report["stages"].items()},
        peak_rss_mib=max(child.peak_rss_mib for _, child in runs),
        report=median_report,
        gpu_memory_mib=peak_gpu.mib if peak_gpu else None,
        gpu_memory_method=peak_gpu.method if peak_gpu else None,
        **base,
    )
