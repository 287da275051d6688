"""Images/s against the number of Ray workers, and of nodes: how ``unet-batch segment --engine ray`` scales.

The local engine, then the Ray engine once per worker count (on the cluster at ``--address``, or a local
Ray), then once per node count on a cluster of that many nodes simulated on this machine (Ray's
``ray.cluster_utils.Cluster``: a head without CPUs and N nodes sharing this machine's cores, one actor
per node), then the local engine again (the mean of its two runs is the baseline: the load of a shared
machine drifts); the same photos and model, each run into a fresh folder. Each Ray session starts once,
before its runs, and the seconds it took are recorded (``cluster_start``): a run's ``seconds`` include
its actors' start and model load (report.json's ``setup``), not the cluster's. The *steady* rate leaves
out ``setup`` and ``discover``. On one machine the simulated nodes share its cores: their rows show
what spreading the work over nodes costs, not what real nodes would add.
"""

from __future__ import annotations

import contextlib
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

from batch.core.devices import cpu_count
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
    node_counts: tuple[int, ...] = ()  # simulated nodes on this machine, one Ray run each (one actor per node)
    device: str = "auto"
    limit: int | None = None  # only the first N photos
    address: str | None = None  # Ray cluster; None: $RAY_ADDRESS, else a local Ray
    progress: bool = True

    def __post_init__(self) -> None:
        counts = (*self.worker_counts, *self.node_counts)
        if min(counts, default=1) < 1 or (self.limit or 1) < 1:
            raise ValueError(f"worker and node counts and --limit must be >= 1, got {counts} and {self.limit}")
        if self.node_counts and self.address:
            raise ValueError("--nodes simulates nodes on this machine: leave out --address")


@dataclass(frozen=True)
class ScalingRow:
    engine: str  # "local" or "ray"
    model: str  # the ONNX file every run used
    workers: int  # Ray inference actors (1 for the local engine)
    nodes: int  # the nodes with CPUs the Ray run had (1 for the local engine)
    device: str
    photos: int
    seconds: float
    images_per_second: float  # processed / seconds: the actors' start included
    steady_images_per_second: float  # set-up (model load, actors starting) left out
    ratio_to_local: float  # steady rate over the local engine's (the mean of its runs before and after the Ray ones)


def run_scaling(config: ScalingConfig) -> tuple[list[ScalingRow], dict[str, float]]:
    """The rows (local, Ray per worker count, Ray per node count, local again) and each cluster's start in seconds."""
    from batch.runs.run import run

    model = config.model or default_model_path(config.device)  # one file for every run, even if the bundled choice changes
    starts: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="unet-bench-scaling-") as scratch:

        def segment(name: str, engine: str = "local", workers: int | None = None) -> Report:
            chosen = dict(model=model, device=config.device, limit=config.limit, progress=config.progress)
            runs = RunConfig(input_dir=config.images, output_dir=Path(scratch, name), **chosen)
            return run(runs, engine, ClusterConfig(config.address, workers))

        reports = [("local", 1, 1, segment("local-before"))]  # (engine, workers, nodes, report)
        if config.worker_counts:
            with cluster(starts, "ray", config.address) as nodes:
                reports += [("ray", n, nodes, segment(f"ray-{n}", "ray", n)) for n in config.worker_counts]
        for count in config.node_counts:
            with cluster(starts, f"{count} simulated nodes", nodes=count):
                report = segment(f"ray-{count}-nodes", "ray")
                reports.append(("ray", report.workers, count, report))
        reports.append(("local", 1, 1, segment("local-after")))
    baseline = (steady_rate(reports[0][3]) + steady_rate(reports[-1][3])) / 2  # before and after: drift
    return [row(*entry, baseline) for entry in reports], starts


@contextlib.contextmanager
def cluster(starts: dict[str, float], name: str, address: str | None = None, nodes: int = 0) -> Iterator[int]:
    """The cluster at ``address`` (else a local Ray), or ``nodes`` nodes simulated on this machine with its cores split
    between them; yields its number of nodes with CPUs, recording in ``starts`` how long it took to start."""
    from batch.runs.ray_engine import ray_session, simulated_cluster

    started = time.perf_counter()
    if nodes:
        with simulated_cluster(nodes, cpus_per_node=max(1, cpu_count() // nodes)):
            starts[name] = round(time.perf_counter() - started, 2)
            yield nodes
        return
    with ray_session(address) as session:
        starts[name] = round(time.perf_counter() - started, 2)
        yield session.nodes


def steady_rate(report: Report) -> float:
    busy = report.seconds - report.stages.get("setup", 0.0) - report.stages.get("discover", 0.0)
    return report.processed / busy if busy > 0 else 0.0


def row(engine: str, workers: int, nodes: int, report: Report, baseline: float) -> ScalingRow:
    return ScalingRow(
        engine=engine,
        model=report.model["path"],
        workers=workers,
        nodes=nodes,
        device=report.device,
        photos=report.processed,
        seconds=report.seconds,
        images_per_second=report.images_per_second,
        steady_images_per_second=round(steady_rate(report), 3),
        ratio_to_local=round(steady_rate(report) / baseline, 3) if baseline else 0.0,
    )


def render(rows: list[ScalingRow], starts: dict[str, float]) -> str:
    if not rows:
        return "no runs\n"
    header = ["engine", "workers", "nodes", "device", "photos", "seconds", "images/s", "steady images/s", "steady vs local"]
    started = "; ".join(f"{name} {seconds:.1f} s" for name, seconds in starts.items())
    lines = [f"model: {rows[0].model}"] + ([f"cluster start: {started}"] if started else [])
    return "\n".join(lines) + f"\n\n{table(header, [cells(r) for r in rows])}\n"


def cells(r: ScalingRow) -> list[str]:
    rates = f"{r.images_per_second:.2f}", f"{r.steady_images_per_second:.2f}", f"{r.ratio_to_local:.2f}x"
    return [r.engine, str(r.workers), str(r.nodes), r.device, str(r.photos), f"{r.seconds:.1f}", *rates]


def write_scaling(rows: list[ScalingRow], starts: dict[str, float], out_dir: Path) -> dict[str, Path]:
    """``results.json`` (rows, cluster starts and the machine) and ``results.md`` (the table) in ``out_dir``."""
    document = {"machine": machine_facts(), "cluster_start_seconds": starts, "rows": [asdict(r) for r in rows]}
    return write_files(out_dir, {"results.json": as_json(document), "results.md": render(rows, starts)})
