"""Images/s against the number of Ray workers: how ``unet-batch segment --engine ray`` scales on a host or cluster.

The local engine, then the Ray engine once per worker count, then the local engine again (the mean of
its two runs is the baseline: the load of a shared machine drifts), on the same photos and model, each
into a fresh folder. The Ray session starts once, before the first Ray run, so that its start-up is not
charged to the first worker count. The *steady* rate leaves out report.json's ``setup`` and
``discover`` stages: loading the model for the local engine, reaching the cluster for Ray (whose
actors still start and load the model inside the timed span: that overhead is what is compared).
With GPUs, ``--workers 1 --workers 2`` also shows whether two actors sharing one GPU beat one; on a
CPU-only host, whether splitting the cores between actors helps.
"""

from __future__ import annotations

import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from batch.inference.bundled import default_model_path
from batch.runs.config import ClusterConfig, RunConfig
from batch.runs.report import Report
from benchmarks.machine import machine_facts
from benchmarks.report import as_json, table, write_files


@dataclass(frozen=True)
class ScalingConfig:
    """The options of ``unet-bench scaling``."""

    images: str  # a folder or a URI (s3://bucket/prefix)
    model: Path | None = None  # None: the bundled model for the device
    worker_counts: tuple[int, ...] = (1, 2)  # Ray inference actors of each Ray run
    device: str = "auto"
    limit: int | None = None  # only the first N photos
    address: str | None = None  # Ray cluster; None: $RAY_ADDRESS, else a local Ray
    progress: bool = True

    def __post_init__(self) -> None:
        if min(self.worker_counts, default=0) < 1 or (self.limit or 1) < 1:
            raise ValueError(f"worker counts and --limit must be >= 1, got {self.worker_counts} and {self.limit}")


@dataclass(frozen=True)
class ScalingRow:
    engine: str  # "local" or "ray"
    model: str  # the ONNX file every run used
    workers: int  # Ray inference actors (1 for the local engine)
    device: str
    photos: int
    seconds: float
    images_per_second: float  # processed / seconds: everything included
    steady_images_per_second: float  # set-up (model load, actors starting) left out
    ratio_to_local: float  # steady rate over the local engine's (the mean of its runs before and after the Ray ones)


def run_scaling(config: ScalingConfig) -> list[ScalingRow]:
    """The local engine, then the Ray engine with each worker count, then the local engine again: the same photos
    and model (``config.model``, or the bundled one for the device) each time."""
    from batch.runs.ray_engine import ray_session
    from batch.runs.run import run

    model = config.model or default_model_path(config.device)  # one file for every run, even if the bundled choice changes
    with tempfile.TemporaryDirectory(prefix="unet-bench-scaling-") as scratch:

        def segment_config(name: str) -> RunConfig:
            chosen = dict(model=model, device=config.device, limit=config.limit, progress=config.progress)
            return RunConfig(input_dir=config.images, output_dir=Path(scratch, name), **chosen)

        reports = [("local", 1, run(segment_config("local-before")))]
        with ray_session(config.address, verbose=False):
            for count in config.worker_counts:
                cluster = ClusterConfig(config.address, count)
                reports.append(("ray", count, run(segment_config(f"ray-{count}"), "ray", cluster)))
        reports.append(("local", 1, run(segment_config("local-after"))))
    baseline = (steady_rate(reports[0][2]) + steady_rate(reports[-1][2])) / 2  # before and after: drift on a shared machine
    return [row(engine, workers, report, baseline) for engine, workers, report in reports]


def steady_rate(report: Report) -> float:
    busy = report.seconds - report.stages.get("setup", 0.0) - report.stages.get("discover", 0.0)
    return report.processed / busy if busy > 0 else 0.0


def row(engine: str, workers: int, report: Report, baseline: float) -> ScalingRow:
    return ScalingRow(
        engine=engine,
        model=report.model["path"],
        workers=workers,
        device=report.device,
        photos=report.processed,
        seconds=report.seconds,
        images_per_second=report.images_per_second,
        steady_images_per_second=round(steady_rate(report), 3),
        ratio_to_local=round(steady_rate(report) / baseline, 3) if baseline else 0.0,
    )


def render(rows: list[ScalingRow]) -> str:
    header = ["engine", "workers", "device", "photos", "seconds", "images/s", "steady images/s", "steady vs local"]
    return f"model: {rows[0].model}\n\n{table(header, [cells(r) for r in rows])}\n" if rows else "no runs\n"


def cells(r: ScalingRow) -> list[str]:
    rates = f"{r.images_per_second:.2f}", f"{r.steady_images_per_second:.2f}", f"{r.ratio_to_local:.2f}x"
    return [r.engine, str(r.workers), r.device, str(r.photos), f"{r.seconds:.1f}", *rates]


def write_scaling(rows: list[ScalingRow], out_dir: Path) -> dict[str, Path]:
    """``results.json`` (rows and the machine) and ``results.md`` (the table) in ``out_dir``."""
    document = {"machine": machine_facts(), "rows": [asdict(r) for r in rows]}
    return write_files(out_dir, {"results.json": as_json(document), "results.md": render(rows)})
