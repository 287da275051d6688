"""Images/s against the number of Ray workers: how ``unet-batch segment --engine ray`` scales on a host or cluster.

A run of the local engine, one run of the Ray engine per worker count, and the local engine again (its
mean is the baseline: the load of a shared machine drifts), on the same photos and model, each into a
fresh output folder (nothing skipped). The Ray session is started once, before the first Ray run, so
that its start-up is not charged to the first worker count. The *steady* rate leaves out what
report.json counts as set-up and discovery:

    steady images/s = processed / (seconds - stages.setup - stages.discover)

For the local engine set-up is loading the model; for the Ray engine it is reaching the cluster,
while starting the actors and loading the model in each stay in (their cost, a few seconds, is
part of the Ray engine's overhead that the comparison is about).

On a host with GPUs, ``--workers 1 --workers 2`` also shows whether two actors sharing one GPU beat one
(fractional GPUs); on a CPU-only host, whether splitting the cores between actors helps.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

from batch.core.files import write_atomic
from batch.inference.bundled import default_model_path
from batch.runs.config import ClusterConfig, RunConfig
from batch.runs.report import Report
from benchmarks.machine import machine_facts


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


def run_scaling(images: str, model: Path | None, worker_counts: tuple[int, ...], device: str, limit: int | None,
                address: str | None, progress: bool) -> list[ScalingRow]:  # fmt: skip
    """The local engine, then the Ray engine with each of ``worker_counts`` actors, over the same photos with the
    same model (``model``, or the bundled one for ``device``)."""
    from batch.runs.ray_engine import ray_session
    from batch.runs.run import run

    model = model or default_model_path(device)  # one file for every run, even if the bundled choice changes meanwhile
    with tempfile.TemporaryDirectory(prefix="unet-bench-scaling-") as scratch:

        def config(name: str) -> RunConfig:
            return RunConfig(input_dir=images, output_dir=Path(scratch, name), model=model, device=device,
                                 limit=limit, progress=progress)  # fmt: skip

        reports = [("local", 1, run(config("local-before")))]
        with ray_session(address, verbose=False):
            for count in worker_counts:
                reports.append(("ray", count, run(config(f"ray-{count}"), "ray", ClusterConfig(address, count))))
        reports.append(("local", 1, run(config("local-after"))))
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
    lines = [
        f"model: {rows[0].model}" if rows else "no runs",
        "",
        "| engine | workers | device | photos | seconds | images/s | steady images/s | steady vs local |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        lines.append(f"| {r.engine} | {r.workers} | {r.device} | {r.photos} | {r.seconds:.1f} | {r.images_per_second:.2f} "
                     f"| {r.steady_images_per_second:.2f} | {r.ratio_to_local:.2f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def write_scaling(rows: list[ScalingRow], out_dir: Path) -> dict[str, Path]:
    """``results.json`` (rows and the machine) and ``results.md`` (the table) in ``out_dir``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {"json": out_dir / "results.json", "md": out_dir / "results.md"}
    document = {"machine": machine_facts(), "rows": [asdict(r) for r in rows]}
    write_atomic(paths["json"], (json.dumps(document, indent=2) + "\n").encode())
    write_atomic(paths["md"], render(rows).encode())
    return paths
