"""``unet-batch segment --engine ray``: the same run on a Ray cluster, one :class:`~batch.inference.segmenter.Segmenter`
per actor.

    driver: the run's skeleton (batch.runs.run: discover, plan, resume, conflicts, --limit), then
      RayEngine.process:
      -> ray.data.from_items(photos to do)                         paths only
      -> map_batches(_read_photos)             Ray tasks          IN  -> each photo's bytes
      -> map_batches(SegmentWorker)            actor pool         bytes -> Segmenter.stream -> outputs in OUT
      -> the driver iterates the outcomes      (photo, error, worker) -> progress bar, report.json
    then the skeleton's end, as for the local engine: submission.csv (--format rle), report.json.

Ray Data streams: blocks flow through the stages as they are made, and its back-pressure holds the
readers back when the actors fall behind, so memory stays bounded whatever the number of photos.
Each actor loads the model once and runs the same decode -> infer -> post-process path as the local
engine (:meth:`Segmenter.stream`) and the same writers (:func:`batch.runs.outputs.write_all`), so the
outputs are the same files with the same bytes. Bad photos come back as failures and never stop the
run. An actor that dies is restarted by Ray and its batch retried (Ray Data's actor fault tolerance,
on by default); outputs are written atomically under names fixed by the photo, so a retried batch
rewrites the same files and every photo is counted once. A photo that kills its worker process
(a decoder's crash, the kernel's out-of-memory killer) is found by the actor's crash journal (batch.runs.journal)
and failed, so it costs one restart or two, not an endless retry loop.

This is the only module of the package that imports ray.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import pickle
import tempfile
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
import ray
import ray.data
from tqdm import tqdm

from batch.core.devices import parse_device
from batch.core.files import file_sha256
from batch.core.images import ImageError
from batch.core.logs import first_line, set_levels
from batch.core.timing import StageClock
from batch.inference.bundled import default_model_path
from batch.inference.config import DEFAULT_BATCH_SIZE, SegmenterConfig, segmenter_options
from batch.inference.decode import Item, ReadLimits, read_file
from batch.inference.model import read_contract
from batch.inference.segmenter import Segmenter
from batch.runs.config import ClusterConfig, RunConfig, SegmentError
from batch.runs.journal import CRASHED, CrashJournal
from batch.runs.outputs import Results, write_all
from batch.runs.plan import Job
from batch.runs.storage import Storage

log = logging.getLogger(__name__)

READ_CPUS = 0.25  # logical CPUs of a read task: reading is I/O, four of them share a core
MAX_BLOCKS = 10_000  # of the job list: a million photos make blocks of 100 rows
CALL_BATCHES = 4  # inference batches per actor call: the Segmenter's stream overlaps decoding and inference within a call
AWS_VARIABLES = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_PROFILE",
)


class ClusterError(SegmentError):
    """A Ray cluster that cannot be reached or cannot run what was asked; the message says what to do."""


@dataclass(frozen=True)
class ActorPlan:
    """How the inference actors are placed: their number, and each one's share of a node."""

    count: int
    num_gpus: float  # per actor: 1, a fraction when several share a GPU, 0 on the CPU
    num_cpus: float  # logical CPUs reserved per actor (placement; the read tasks keep the rest)
    threads: int  # each actor's decode / writer / ONNX Runtime threads: its share of a node's cores

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def plan_actors(resources: dict[str, float], nodes: int, device: str, workers: int | None) -> ActorPlan:
    """Actors for a cluster with ``resources`` (Ray's totals: CPU, GPU) on ``nodes`` nodes.

    ``device`` is ``auto``, ``cpu`` or ``cuda`` (``cuda:0``: Ray gives each actor its GPU, which it sees
    as its first, so another index makes no sense here). GPUs: one actor per GPU by default; more actors
    than GPUs share them evenly (two on one GPU get half of it each). CPU only: one actor per node by
    default, using the node's cores.
    """
    wanted = parse_device(device)
    if wanted.kind == "cuda" and wanted.index != 0:
        raise ClusterError(f"--device {device}: with --engine ray, Ray gives each worker its GPU; use --device cuda or auto")
    cpus, gpus, nodes = int(resources.get("CPU", 0)), int(resources.get("GPU", 0)), max(1, nodes)
    if wanted.kind == "cuda" and not gpus:
        raise ClusterError("--device cuda: the Ray cluster has no GPUs; use --device cpu, or a cluster with GPUs")
    if cpus < 1:
        raise ClusterError("the Ray cluster has no CPUs to run on; start its nodes with --num-cpus >= 1")
    cpus_per_node = max(1, cpus // nodes)
    for_actors = cpus_per_node - min(1.0, cpus_per_node / 2)  # the rest is the read tasks'
    if gpus and wanted.kind != "cpu":
        count = workers or gpus
        per_gpu = math.ceil(count / gpus)  # actors sharing one GPU
        per_node = math.ceil(count / nodes)
        return ActorPlan(count, 1 / per_gpu, min(1.0, for_actors / per_node), max(1, cpus_per_node // per_node))
    count = workers or nodes
    per_node = math.ceil(count / nodes)
    return ActorPlan(count, 0, for_actors / per_node, max(1, cpus_per_node // per_node))


def _aws_environment() -> dict[str, str]:
    """The standard S3 variables set here, for the workers (a remote cluster's nodes do not share this environment)."""
    return {name: os.environ[name] for name in AWS_VARIABLES if os.environ.get(name)}


# ---------------------------------------------------------------------------------------------
# The run.


class RayEngine:
    """Inference actors on a Ray cluster; the run's skeleton (:func:`batch.runs.run.run`) does the rest.

    ``config.workers`` and ``config.threads`` are per actor (default: its share of a node).
    ``worker``: the actor class, a :class:`SegmentWorker` (tests pass one that dies). An unreachable
    cluster, or one without the GPUs asked for, is a :class:`ClusterError` (a run that cannot start).
    """

    def __init__(self, config: RunConfig, cluster: ClusterConfig, clock: StageClock, worker: type[SegmentWorker] | None = None):
        self.config, self.cluster, self.clock = config, cluster, clock
        self.worker = worker or SegmentWorker
        self.actors: ActorPlan | None = None
        self.tally = Tally(clock)

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        """Nothing yet: Ray starts in :meth:`process`, only when there are photos to segment (a rerun with nothing
        to do costs no Ray start-up)."""
        yield

    def summary(self) -> str:
        return f"Ray engine ({self.cluster.workers or 'one per GPU, or per node'} worker(s)), started if there is work"

    def process(self, jobs: list[Job], source: Storage, output: Storage, results: Results, progress: bool) -> None:
        self.tally.results = results
        if not jobs:
            return
        started = time.perf_counter()
        with ray_session(self.cluster.address, verbose=log.isEnabledFor(logging.DEBUG)) as resources:
            self.actors = plan_actors(resources, len(ray.nodes()), self.config.device, self.cluster.workers)
            self.clock.add("setup", time.perf_counter() - started)
            log.info("%d worker(s) on %s, %d thread(s) each", self.actors.count, self.actors.device, self.actors.threads)
            outcomes = _run_pipeline(jobs, self.config, source, output, self.actors, self.worker)
            self.tally.collect(outcomes, len(jobs), progress)

    @property
    def device(self) -> str:
        """The actors' device; before Ray starts, the one asked for (``auto`` read as the GPU only when asked)."""
        if self.actors is not None:
            return self.actors.device
        return "cuda" if parse_device(self.config.device).kind == "cuda" else "cpu"

    def model_identity(self) -> tuple[str, str, float]:
        """The model the actors load: the driver's file, or the bundled one for the actors' device."""
        path = Path(self.config.model or default_model_path(self.device))
        threshold = self.config.threshold if self.config.threshold is not None else read_contract(path).threshold
        return str(path), file_sha256(path), threshold

    def describe(self) -> dict[str, Any]:
        """The local engine's fields (from the workers' states; the model as the user named it), plus the
        engine, the number of workers and what each did. Stage seconds are summed over the workers, like threads."""
        config, states = self.config, list(self.tally.states.values())
        first = states[0] if states else {}
        stages = self.clock.snapshot()
        for state in states:
            for stage in ("decode", "infer", "postprocess", "write"):
                stages[stage] = round(stages[stage] + state["stages"].get(stage, 0.0), 4)
        model = dict(first.get("model", {}))
        if model and config.model is not None:
            model["path"] = str(config.model)  # not the actors' copy
        return {
            "stages": stages,
            "device": first.get("device", self.device),
            "provider": first.get("provider", ""),
            "runtime": first.get("runtime", {}),
            "decoder": first.get("decoder", ""),
            "pillow_fallbacks": sum(state["pillow_fallbacks"] for state in states),
            "model": model,
            "batch_size": first.get("batch_size", config.batch_size or DEFAULT_BATCH_SIZE[self.device]),
            "threshold": first.get("threshold", config.threshold),
            "tta": config.tta,
            "engine": "ray",
            "workers": self.actors.count if self.actors is not None else 0,
            "per_worker": self.tally.workers,
        }


QUIET_RAY_LOGGERS = {  # lines Ray prints on every run that tell a user nothing to act on (-v shows them)
    "ray._private.authentication.authentication_token_setup": logging.ERROR,  # "token authentication is enabled"
}


def _quiet_ray() -> None:
    """Keep Ray's routine lines out of a run's output (set before ``ray.init``, which logs them)."""
    set_levels(QUIET_RAY_LOGGERS)


@contextlib.contextmanager
def ray_session(address: str | None, verbose: bool = False) -> Iterator[dict[str, float]]:
    """Ray for a run; yields the cluster's resources. The session this process has already opened (a
    notebook, a benchmark, the tests), else the cluster at ``address`` or ``RAY_ADDRESS``, else a local
    one started here with every core and GPU of this host, shut down at the end."""
    if ray.is_initialized():
        yield ray.cluster_resources()
        return
    address = address or os.environ.get("RAY_ADDRESS") or None
    if not verbose:
        _quiet_ray()
    try:
        ray.init(
            address=address,
            include_dashboard=False,
            log_to_driver=verbose,
            logging_level=logging.INFO if verbose else logging.WARNING,
        )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        raise ClusterError(
            f"cannot start or reach {where} ({first_line(e)}); check --address / RAY_ADDRESS, or `ray status` there"
        ) from e
    if not verbose:  # Ray Data's own lines (datasets starting and finishing, its bars turned off) only with -v
        logging.getLogger("ray.data").setLevel(logging.ERROR)
    try:
        yield ray.cluster_resources()
    finally:
        ray.shutdown()


def _run_pipeline(
    jobs: list[Job], config: RunConfig, source: Storage, output: Storage, actors: ActorPlan, worker: type[SegmentWorker]
) -> Iterator[dict[str, np.ndarray]]:
    """The dataset, streamed: jobs -> their photos' bytes (read tasks) -> outcomes (the inference actors)."""
    if not jobs:
        return iter(())
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # the run's own bar counts photos
    context.enable_auto_log_stats = False
    context.raise_original_map_exception = True  # an actor's InferenceError reaches the driver as one, not as "UDF failed"
    batch_size = config.batch_size or DEFAULT_BATCH_SIZE[actors.device]
    environment = {"env_vars": _aws_environment()}  # a remote cluster's nodes do not share this shell's variables
    blocks = max(actors.count, len(jobs) // (CALL_BATCHES * batch_size))  # at least one per actor
    rows = ray.data.from_items(
        [{"job": pickle.dumps(job)} for job in jobs], override_num_blocks=min(blocks, len(jobs), MAX_BLOCKS)
    )
    reading = {"source": source, "limits": ReadLimits(timeout=config.read_timeout)}
    photos = rows.map_batches(_read_photos, fn_kwargs=reading, batch_size=batch_size, num_cpus=READ_CPUS, runtime_env=environment)
    outcomes = photos.map_batches(
        worker,
        fn_constructor_kwargs={"config": _actor_config(config, actors), "output": output, "model": _model_bytes(config)},
        batch_size=CALL_BATCHES * batch_size,
        compute=ray.data.ActorPoolStrategy(size=actors.count),
        num_gpus=actors.num_gpus,
        num_cpus=actors.num_cpus,
        runtime_env=environment,
    )
    return outcomes.iter_batches(batch_size=None, batch_format="numpy")


def _actor_config(config: RunConfig, actors: ActorPlan) -> SegmenterConfig:
    """What each actor's Segmenter is made with: the run's options on the device Ray gave it, its share of threads."""
    options = segmenter_options(config) | {"model": None, "device": actors.device}
    options["workers"] = config.workers or actors.threads
    options["threads"] = config.threads or actors.threads
    return SegmenterConfig(**options)


def _model_bytes(config: RunConfig) -> bytes | None:
    """The model file, shipped to the actors (any node runs the driver's model); None: each node's bundled one."""
    if config.model is None:
        return None
    try:
        return Path(config.model).read_bytes()
    except OSError as e:
        raise SegmentError(f"cannot read the model {config.model} ({e.strerror or e})") from e


def _read_photos(batch: dict[str, np.ndarray], source: Storage, limits: ReadLimits) -> dict[str, list]:
    """The read stage: each job's photo bytes from IN; an empty ``data`` and the reason when they cannot be read.

    Jobs travel pickled (a binary column: Arrow has no type for them)."""
    data, errors = [], []
    for job in map(pickle.loads, batch["job"]):
        try:
            data.append(
                read_file(Item(job.source, path=source.file(job.rel)), limits)
            )  # the local engine's read, and its message
            errors.append("")
        except ImageError as e:
            data.append(b"")
            errors.append(str(e).removeprefix(f"{job.source}: "))
    return {"job": batch["job"], "data": data, "error": errors}


def _open_segmenter(config: SegmenterConfig, model: bytes | None) -> Segmenter:
    """The actor's Segmenter; the driver's model file is written to a temporary file only while it loads (ONNX Runtime
    keeps the model in memory), so that an actor killed at the end of a run leaves no file behind."""
    if model is None:
        return Segmenter.from_config(config)
    with tempfile.TemporaryDirectory(prefix="unet-batch-model-") as folder:
        path = Path(folder, "model.onnx")
        path.write_bytes(model)
        return Segmenter.from_config(replace(config, model=path))


class SegmentWorker:
    """An inference actor: one Segmenter, loaded once, feeding the local engine's writers (:func:`batch.runs.outputs.write_all`).

    ``model``: the driver's model file as bytes (None: the bundled model of this node's installation).
    Each call gets photos (their jobs and bytes) and returns, for each, the error ("" when its outputs
    are written), and this worker's name and state (device, decoder, model, stage seconds so far).
    """

    def __init__(self, config: SegmenterConfig, output: Storage, model: bytes | None):
        self.segmenter = _open_segmenter(config, model)
        self.output = output
        actor_id = ray.get_runtime_context().get_actor_id()
        self.name = f"{ray.util.get_node_ip_address()}/{actor_id[:8]}"
        self.journal = CrashJournal(output, actor_id)  # in OUTPUT_DIR: an actor restarted on another node finds it

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, list]:
        jobs = [pickle.loads(job) for job in batch["job"]]
        results = Results()
        items = []
        for job, data, error in zip(jobs, batch["data"], batch["error"]):
            if error:
                results.fail(job, str(error))
            elif job.name in self.journal.poisoned:
                results.fail(job, CRASHED)
            else:
                items.append(Item(job.source, data=bytes(data), tag=job))
        rels = [item.tag.name for item in items]
        if self.journal.suspected(rels):  # this call killed the actor before: one photo at a time finds the culprit
            for item, rel in zip(items, rels):
                with self.journal.running([rel], one_by_one=True):
                    self.segment([item], results)
        else:
            with self.journal.running(rels, one_by_one=False):
                self.segment(items, results)
        errors = {job.rel: reason for job, reason in results.failed}
        state = json.dumps(self.segmenter.describe())
        return {
            "source": [job.source for job in jobs],
            "rel": [job.rel.as_posix() for job in jobs],
            "error": [errors.get(job.rel, "") for job in jobs],
            "confidence": [results.confidence.get(job.name, math.nan) for job in jobs],
            "worker": [self.name] * len(jobs),
            "state": [state] * len(jobs),
        }

    def segment(self, items: list[Item], results: Results) -> None:
        """The local engine's decode -> infer -> write for these photos (tests override it to crash)."""
        write_all(items, self.segmenter, self.output, results)


class Tally:
    """The outcomes as they stream in: the run's results, and each worker's count and latest state."""

    def __init__(self, clock: StageClock):
        self.results = Results()
        self.clock = clock  # the driver's: discover, setup (reaching the cluster), write (submission.csv)
        self.workers: dict[str, dict] = {}
        self.states: dict[str, dict] = {}

    def collect(self, outcomes: Iterable[dict[str, np.ndarray]], total: int, progress: bool) -> None:
        with tqdm(total=total, unit="img", desc="segment", disable=not progress, dynamic_ncols=True) as bar:
            for batch in outcomes:
                columns = ("source", "rel", "error", "confidence", "worker", "state")
                for source, rel, error, confidence, worker, state in zip(*(batch[name] for name in columns)):
                    self.count(Job(str(source), PurePosixPath(rel), {}), str(error), float(confidence), str(worker), state)
                bar.update(len(batch["rel"]))

    def count(self, job: Job, error: str, confidence: float, worker: str, state: str) -> None:
        self.states[worker] = json.loads(state)
        counts = self.workers.setdefault(worker, {"device": self.states[worker]["device"], "processed": 0, "failed": 0})
        if error:
            counts["failed"] += 1
            self.results.fail(job, error)
        else:
            counts["processed"] += 1
            self.results.done(job, confidence)
