"""``unet-batch segment --engine ray``: the same run on a Ray cluster, one :class:`~batch.inference.segmenter.Segmenter`
per actor.

    driver: the run's skeleton (batch.runs.run: discover, lock OUTPUT_DIR, plan, resume), then RayEngine:
      open     reach the cluster (or start a local one), start the actors, wait until each holds the model
      process  the photos to do, in calls of up to 32 batches; each actor has at most two calls at a time
               call -> SegmentWorker: IN -> Segmenter.stream -> writers -> OUT; back: each photo's outcome
               outcomes -> progress bar, report.json; a call whose actor died goes back in the queue
    then the skeleton's end, as for the local engine: submission.csv (--format rle), report.json.

Each actor runs the local engine's own code on its calls (:func:`batch.runs.outputs.write_all`: decode
in a thread, inference overlapping it, the writer pool), reading the photos from IN itself, so the
outputs are the same files with the same bytes and nothing but the photo lists and the outcomes
travels through Ray. The driver keeps two calls queued per actor: an actor never waits for work,
and memory stays bounded whatever the number of photos.

Faults. Outputs are written atomically under names fixed by the photo, so a call done twice rewrites
the same files, and the driver counts each call's outcomes once. An actor that dies (its process
killed, its node lost) fails its calls: the driver puts them back in the queue for the actors still
alive, and Ray restarts the actor wherever the cluster has room (it rejoins when it answers again).
A photo that kills the process segmenting it (a decoder's crash, the out-of-memory killer) is found
by the call's crash journal (:mod:`batch.runs.journal`), kept in OUTPUT_DIR where every node sees it:
the retry of a call that killed its actor segments its photos one at a time, and a photo that kills
the process again, alone, is failed. So it costs two crashes, on whatever nodes, not an endless loop.

A local Ray started for the run stops with it; if the run is killed (SIGKILL), a small reaper process
(:mod:`batch.runs._ray_reaper`) stops what Ray would leave running.

This module and the reaper are the only ones of the package that know about Ray.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import ray
from tqdm import tqdm

from batch.core.devices import parse_device
from batch.core.files import file_sha256
from batch.core.logs import first_line, quiet_loggers
from batch.core.timing import StageClock
from batch.inference.bundled import default_model_path, device_kind
from batch.inference.config import DEFAULT_BATCH_SIZE, SegmenterConfig, segmenter_options
from batch.inference.decode import Item
from batch.inference.model import read_contract
from batch.inference.segmenter import InferenceError, Segmenter
from batch.runs import _ray_reaper
from batch.runs.config import RAY_PAYS_OFF, ClusterConfig, RunConfig, SegmentError, resolve_ray_address
from batch.runs.journal import CRASHED, CrashJournal, journal_path
from batch.runs.outputs import Results, write_all
from batch.runs.plan import Job
from batch.runs.storage import Storage, open_location

log = logging.getLogger(__name__)

CALL_BATCHES = 32  # most inference batches in one call: the local engine's chunk (its start and end cost ~1 % of it)
CALLS_PER_ACTOR = 4  # at least this many calls per actor when the photos allow it: the last ones are spread out
IN_FLIGHT = 2  # calls given to an actor at a time: the next one is there when one ends
START_TIMEOUT = 600.0  # seconds the actors may take to start (an autoscaler adding nodes) before the run gives up
NO_WORKER_TIMEOUT = 600.0  # seconds a run waits with every actor gone (nodes lost) before it stops with a report
# Ray's notice that a new local cluster uses token authentication (its default, and what a run started here wants)
QUIET_START = {"ray._private.authentication.authentication_token_setup": logging.ERROR}
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
    num_cpus: float  # logical CPUs reserved per actor (placement; the rest is the driver's and Ray's)
    threads: int  # each actor's decode / writer / ONNX Runtime threads: its share of a node's cores

    @property
    def device(self) -> str:
        return "cuda" if self.num_gpus else "cpu"


def plan_actors(resources: dict[str, float], nodes: int, device: str, workers: int | None) -> ActorPlan:
    """Actors for a cluster with ``resources`` (Ray's totals: CPU, GPU) on ``nodes`` nodes that have CPUs.

    ``device`` is ``auto``, ``cpu`` or ``cuda`` (``cuda:0``: Ray gives each actor its GPU, which it sees
    as its first, so another index makes no sense here). GPUs: one actor per GPU by default; more actors
    than GPUs share them evenly (two on one GPU get half of it each). CPU only: one actor per node by
    default, using the node's cores. An actor reserves at most half of a node's logical CPUs beyond the
    first (a 2-CPU node: 1), so that an actor whose node is lost can be restarted beside another one.
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
    for_actors = cpus_per_node - min(1.0, cpus_per_node / 2)  # the rest: the driver, Ray's daemons, a restarted actor
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
    ``worker``: the actor class, a :class:`SegmentWorker` (tests pass ones that die). ``photos``: how many
    photos the run has to segment, when the skeleton knows it: with none, Ray is not started at all
    (unless the cluster must say which bundled model its actors would load). An unreachable cluster, or
    one without the GPUs asked for, or actors that cannot load the model, is a :class:`ClusterError`
    (a run that cannot start).
    """

    def __init__(
        self,
        config: RunConfig,
        cluster: ClusterConfig,
        clock: StageClock,
        worker: type[SegmentWorker] | None = None,
        photos: int | None = None,
    ):
        self.config, self.cluster, self.clock = config, cluster, clock
        self.worker = worker or SegmentWorker
        self.photos = photos
        self.needs_ray = photos != 0 or self._cluster_decides_model()
        self.actors: ActorPlan | None = None
        self.pool: _Pool | None = None
        self.tally = Tally()
        self._model_identity: tuple[str, str, float] | None = None

    def _cluster_decides_model(self) -> bool:
        """Whether only the cluster knows the model of the run: the bundled one, for GPUs that a named cluster may
        have (a local Ray has this host's, which the driver sees too)."""
        named = self.cluster.named_address or ray.is_initialized()
        return bool(named) and self.config.model is None and parse_device(self.config.device).kind == "auto"

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        if not self.needs_ray:
            yield
            return
        started = time.perf_counter()
        with ray_session(self.cluster.address, verbose=log.isEnabledFor(logging.DEBUG)) as session:
            reached = time.perf_counter()
            self.actors = plan_actors(session.resources, session.nodes, self.config.device, self.cluster.workers)
            with _Pool.start(self.worker, self.config, self.actors) as pool:
                self.pool = pool
                session.remember_processes()
                ready = time.perf_counter()
                self.clock.add("setup", ready - started)
                log.info(
                    "Ray ready in %.1f s: cluster %.1f s, %d worker(s) started with the model %.1f s",
                    ready - started, reached - started, self.actors.count, ready - reached,
                )  # fmt: skip
                self._advise(session, ready - started)
                yield

    def _advise(self, session: RaySession, startup: float) -> None:
        """Say so when Ray cannot pay off: on one host with at most one GPU (the local engine does the same work without
        Ray's start-up and daemons), or for few photos."""
        if session.started_here and session.resources.get("GPU", 0) <= 1:
            log.info(
                "a local Ray on one host adds its start-up (%.1f s) and daemons to the work of the local engine, which "
                "would do it alone (--engine local, or --engine auto); Ray pays off on a cluster or with several GPUs",
                startup,
            )
        elif self.photos is not None and self.photos < RAY_PAYS_OFF:
            log.info(
                "%d photos to do: Ray's start-up (%.1f s) is a large part of a run this small (--engine auto uses Ray "
                "from %d photos)", self.photos, startup, RAY_PAYS_OFF,
            )  # fmt: skip

    def summary(self) -> str:
        if self.actors is None:
            return "nothing to segment: Ray not started"
        return f"{self.actors.count} worker(s) on {self.actors.device}, {self.actors.threads} thread(s) each"

    def process(self, jobs: list[Job], source: Storage, output: Storage, results: Results, progress: bool) -> None:
        if not jobs:
            return
        self.tally.results = results
        batch_size = self.config.batch_size or DEFAULT_BATCH_SIZE[self.actors.device]
        calls = split_calls(jobs, batch_size, self.actors.count)
        with tqdm(total=len(jobs), unit="img", desc="segment", disable=not progress, dynamic_ncols=True) as bar:
            try:
                self.pool.run(calls, lambda outcome: self.tally.count(outcome, bar))
            finally:
                _forget_journals(output, self.pool.retried)

    @property
    def device(self) -> str:
        """``cpu`` or ``cuda``: the actors', or without them what this host would give them (a local Ray has its GPUs)."""
        if self.actors is not None:
            return self.actors.device
        return device_kind(parse_device(self.config.device))

    def model_identity(self) -> tuple[str, str, float]:
        """The model the actors load: the driver's file, or the bundled one for the actors' device (hashed once: the
        run records it and the report names it)."""
        if self._model_identity is None:
            path = Path(self.config.model or default_model_path(self.device))
            threshold = self.config.threshold if self.config.threshold is not None else read_contract(path).threshold
            self._model_identity = (str(path), file_sha256(path), threshold)
        return self._model_identity

    def describe(self) -> dict[str, Any]:
        """The local engine's fields (from the workers' states; the model as the user named it), plus the
        engine, the number of workers and what each did. Stage seconds are summed over the workers, like threads.
        Without workers (nothing to segment) the fields say what was asked."""
        config, states = self.config, list(self.tally.states.values())
        first = states[0] if states else {}
        stages = self.clock.snapshot()
        for state in states:
            for stage in ("decode", "infer", "postprocess", "write"):
                stages[stage] = round(stages[stage] + state["stages"].get(stage, 0.0), 4)
        model = dict(first.get("model", {}))
        if model and config.model is not None:
            model["path"] = str(config.model)  # not the actors' copy
        if not model:
            path, _, threshold = self.model_identity()
            model = {"path": path, "threshold": threshold}
        return {
            "stages": stages,
            "device": first.get("device", self.device),
            "provider": first.get("provider", ""),
            "runtime": first.get("runtime", {}),
            "decoder": first.get("decoder", ""),  # nothing decoded: the summary line leaves it out
            "pillow_fallbacks": sum(state["pillow_fallbacks"] for state in states),
            "model": model,
            "batch_size": first.get("batch_size", config.batch_size or DEFAULT_BATCH_SIZE[self.device]),
            "threshold": first.get("threshold", model.get("threshold", config.threshold)),
            "tta": config.tta,
            "engine": "ray",
            "workers": self.actors.count if self.actors else 0,
            "per_worker": self.tally.workers,
        }


@dataclass
class RaySession:
    """The cluster a run uses: its CPUs and GPUs, its nodes with CPUs, and for a local Ray started by the run, the
    reaper that stops it if the run is killed."""

    resources: dict[str, float]  # CPU, GPU totals of the nodes alive
    nodes: int  # nodes alive with CPUs (a head started with none runs no actor)
    started_here: bool = False  # a local Ray started for the run (not a cluster it joined)
    reaper: subprocess.Popen | None = None

    def remember_processes(self) -> None:
        """Tell the reaper about the processes Ray has started since (the actors' workers); the session's folder, to
        remove or to keep (``-v``), it was told when it started."""
        if self.reaper is not None:
            _ray_reaper.watch(self.reaper.stdin, "", exclude=self.reaper.pid)


@contextlib.contextmanager
def ray_session(address: str | None, verbose: bool = False) -> Iterator[RaySession]:
    """Ray for a run. The session this process has already opened (a notebook, a benchmark, the tests), else the
    cluster at ``address`` or ``RAY_ADDRESS`` (or the one ``ray start`` made on this host), else a local one started
    here with every core and GPU of this host, stopped at the end with its folder of logs (kept with ``verbose``),
    and by the reaper if this process is killed."""
    if ray.is_initialized():
        yield RaySession(*_resources())
        return
    address = resolve_ray_address(address)
    try:
        with quiet_loggers({} if verbose else QUIET_START):
            ray.init(
                address=address,
                include_dashboard=False,
                log_to_driver=verbose,
                logging_level=logging.INFO if verbose else logging.WARNING,
            )
    except (ConnectionError, RuntimeError, ValueError) as e:
        where = f"the Ray cluster at {address}" if address else "a local Ray instance"
        auth = "; a cluster with token authentication also needs RAY_AUTH_MODE=token and its token here" if address else ""
        raise ClusterError(
            f"cannot start or reach {where} ({first_line(e)}); check --address / RAY_ADDRESS, or `ray status` there{auth}"
        ) from e
    session = RaySession(*_resources(), started_here=ray._private.worker.global_worker.node.is_head())
    if session.started_here:  # (not a cluster the run joined, one `ray start` made on this host included)
        session.reaper = _start_reaper(keep=ray_session_folder() if verbose else "")
    try:
        yield session
    finally:
        ray.shutdown()
        if session.reaper is not None:
            session.reaper.stdin.close()  # the reaper stops whatever the shutdown left behind, then exits


def ray_session_folder() -> str:
    """The folder of this process's Ray session (its sockets and logs)."""
    return ray._private.worker.global_worker.node.get_session_dir_path()


def _resources() -> tuple[dict[str, float], int]:
    """The CPUs and GPUs of the nodes alive, and how many of them have CPUs."""
    nodes = [node["Resources"] for node in ray.nodes() if node["Alive"] and node["Resources"].get("CPU", 0) >= 1]
    totals = {kind: sum(node.get(kind, 0.0) for node in nodes) for kind in ("CPU", "GPU")}
    return totals, len(nodes)


def _start_reaper(keep: str) -> subprocess.Popen | None:
    """A process that outlives this one and, when this one ends however it ends, stops the local Ray's processes and
    removes its session folder unless told to ``keep`` it (:mod:`batch.runs._ray_reaper`); None where there is no
    ``/proc`` to find them in."""
    if not _ray_reaper.supported():
        log.debug("no /proc here: a killed run's local Ray processes are left to Ray")
        return None
    reaper = subprocess.Popen(
        [sys.executable, "-m", "batch.runs._ray_reaper"],
        stdin=subprocess.PIPE,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # not stopped with this process by Ctrl-C or a group's kill: it must run after it
        text=True,
    )
    _ray_reaper.watch(reaper.stdin, "" if keep else ray_session_folder(), exclude=reaper.pid)
    if keep:
        log.info("Ray's logs of this run are kept in %s", keep)
    return reaper


@contextlib.contextmanager
def simulated_cluster(nodes: int, cpus_per_node: int, system_config: dict | None = None) -> Iterator[Any]:
    """A Ray cluster of ``nodes`` nodes on this machine (Ray's ``ray.cluster_utils.Cluster``), joined by this process:
    a head without CPUs (the driver's, as on a real cluster) and ``nodes`` nodes of ``cpus_per_node`` logical CPUs.
    For the tests and ``unet-bench scaling``: the nodes share this machine's cores. Yields the ``Cluster`` (its
    ``add_node`` / ``remove_node`` simulate nodes joining and lost); on the way out it stops, and its session
    folder and the address file ``Cluster`` writes go with it."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "_system_config": system_config or {}})
    session = ""
    try:
        for _ in range(nodes):
            cluster.add_node(num_cpus=cpus_per_node)
        with quiet_loggers(QUIET_START):
            ray.init(address=cluster.address, log_to_driver=False, configure_logging=False)
        session = ray_session_folder()
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()
        if session:
            _forget_cluster(Path(session).parent / "ray_current_cluster", cluster.address)
            _ray_reaper.remove_folder(session)


def _forget_cluster(address_file: Path, address: str) -> None:
    """Remove the file through which a later plain ``ray.init()`` would join a cluster now gone."""
    with contextlib.suppress(OSError):
        if address_file.read_text().strip() == address:
            address_file.unlink()


# ---------------------------------------------------------------------------------------------
# Calls: lists of photos for an actor.


@dataclass(frozen=True)
class Call:
    """Photos for one actor call; ``key`` names its crash journal (the same for every attempt, on any node)."""

    key: str
    jobs: tuple[Job, ...]


@dataclass(frozen=True)
class Outcome:
    """What an actor did with a call: each photo's error ("" when its outputs are written) and confidence, and the
    actor's name, node and state (device, decoder, model, stage seconds so far)."""

    worker: str
    node: str
    state: dict
    jobs: tuple[Job, ...]
    errors: tuple[str, ...]
    confidences: tuple[float, ...]


def split_calls(jobs: list[Job], batch_size: int, actors: int) -> list[Call]:
    """``jobs`` in calls of whole batches: at most CALL_BATCHES batches, and at least CALLS_PER_ACTOR calls per actor
    when there are enough photos (so that no actor is left with a long last call while the others wait)."""
    spread = math.ceil(len(jobs) / (actors * CALLS_PER_ACTOR))
    size = batch_size * max(1, min(CALL_BATCHES, math.ceil(spread / batch_size)))
    return [Call(f"ray-call-{i // size:06d}", tuple(jobs[i : i + size])) for i in range(0, len(jobs), size)]


def _forget_journals(output: Storage, keys: set[str]) -> None:
    """The journals of the calls retried (crashes, lost nodes): their photos are counted now, and the next run splits
    its photos otherwise. The journals of calls that never crashed are gone already."""
    for key in sorted(keys):
        with contextlib.suppress(OSError):
            output.remove(journal_path(key))


# ---------------------------------------------------------------------------------------------
# The actors.


def _actor_config(config: RunConfig, actors: ActorPlan) -> SegmenterConfig:
    """What each actor's Segmenter is made with: the run's options on the device Ray gave it, its share of threads."""
    options = segmenter_options(config) | {"model": None, "device": actors.device}
    options["workers"] = config.workers or actors.threads
    options["threads"] = config.threads or actors.threads
    return SegmenterConfig(**options)


def _model_bytes(config: RunConfig) -> bytes:
    """The model file, shipped to the actors once (any node runs the driver's model)."""
    try:
        return Path(config.model).read_bytes()
    except OSError as e:
        raise SegmentError(f"cannot read the model {config.model} ({e.strerror or e})") from e


def _open_segmenter(config: SegmenterConfig, model: bytes | None) -> Segmenter:
    """An actor's Segmenter: ``model`` is the driver's file (None: this node's bundled model), written to a temporary
    file only while it loads (ONNX Runtime keeps the model in memory), so that an actor killed at the end of a run
    leaves no file behind."""
    if model is None:
        return Segmenter.from_config(config)
    with tempfile.TemporaryDirectory(prefix="unet-batch-model-") as folder:
        path = Path(folder, "model.onnx")
        path.write_bytes(model)
        return Segmenter.from_config(replace(config, model=path))


class SegmentWorker:
    """An inference actor: one Segmenter, loaded once, feeding the local engine's writers (:func:`batch.runs.outputs.write_all`).

    Made with small arguments only (its Segmenter options, IN, OUT); the model comes with :meth:`ready`, the driver's
    first call, and again after Ray restarts the actor, so that a restart never depends on an object Ray may have
    dropped (ray-project/ray#53727). Each call gets photos (a :class:`Call`), reads them from ``source`` and writes
    their outputs to ``output``, with the call's crash journal around the work; it returns an :class:`Outcome`.
    """

    def __init__(self, config: SegmenterConfig, source: Storage, output: Storage):
        self.config, self.source, self.output = config, source, output
        self.segmenter: Segmenter | None = None
        context = ray.get_runtime_context()
        self.node = context.get_node_id()
        self.name = f"{ray.util.get_node_ip_address()}/{context.get_actor_id()[:8]}"

    def ready(self, model: bytes | None) -> str:
        """Load the model (the driver's file, or None: this node's bundled one) unless loaded; answer the node."""
        if self.segmenter is None:
            self.segmenter = _open_segmenter(self.config, model)
        return self.node

    def __call__(self, call: Call) -> Outcome:
        journal = CrashJournal(self.output, call.key)  # in OUTPUT_DIR: the retry finds it on any node
        results = Results()
        items = []
        for job in call.jobs:
            if job.name in journal.poisoned:
                results.fail(job, CRASHED)
            else:
                items.append(Item(job.source, path=self.source.file(job.rel), tag=job))
        names = [item.tag.name for item in items]
        if journal.suspected(names):  # this call killed an actor before: one photo at a time finds the culprit
            for item, name in zip(items, names):
                with journal.running([name], one_by_one=True):
                    self.segment([item], results)
        else:
            with journal.running(names, one_by_one=False):
                self.segment(items, results)
        errors = {job.rel: reason for job, reason in results.failed}
        return Outcome(
            worker=self.name,
            node=self.node,
            state=self.segmenter.describe(),
            jobs=call.jobs,
            errors=tuple(errors.get(job.rel, "") for job in call.jobs),
            confidences=tuple(results.confidence.get(job.name, math.nan) for job in call.jobs),
        )

    def segment(self, items: list[Item], results: Results) -> None:
        """The local engine's decode -> infer -> write for these photos (tests override it to crash)."""
        write_all(items, self.segmenter, self.output, results)


class _Pool:
    """The inference actors: started spread over the nodes, restarted by Ray wherever there is room when they die."""

    def __init__(self, actors: list[Any], model: ray.ObjectRef | None):
        self.actors = actors  # handles
        self.model = model  # the driver's model file in Ray's object store; None: each node's bundled model
        self.retried: set[str] = set()  # keys of the calls that had to be done again

    @classmethod
    @contextlib.contextmanager
    def start(cls, worker: type, config: RunConfig, plan: ActorPlan) -> Iterator[_Pool]:
        """``plan.count`` actors of ``worker``; yields once each has loaded the model; kills them on the way out (also in
        a session this process shares: their CPUs come back)."""
        remote = ray.remote(worker).options(
            num_cpus=plan.num_cpus,
            num_gpus=plan.num_gpus,
            max_restarts=-1,  # a dead actor comes back wherever there is room, and rejoins the run
            max_task_retries=0,  # its calls are handed out again by the driver, to any actor alive
            scheduling_strategy="SPREAD",
            runtime_env={"env_vars": _aws_environment()},  # a remote cluster's nodes do not share this shell's variables
        )
        source, output = open_location(config.input_dir), open_location(config.output_dir)  # checked by the skeleton
        actors = [remote.remote(_actor_config(config, plan), source, output) for _ in range(plan.count)]
        pool = cls(actors, ray.put(_model_bytes(config)) if config.model else None)
        try:
            _wait_until_ready([actor.ready.remote(pool.model) for actor in actors])
            yield pool
        finally:
            for actor in actors:
                ray.kill(actor, no_restart=True)

    def run(self, calls: list[Call], collect: Callable[[Outcome], None]) -> None:
        """Every call done once, its outcome given to ``collect`` (:class:`_Dispatch`)."""
        dispatch = _Dispatch(self.actors, calls, collect, lambda actor: actor.ready.remote(self.model))
        try:
            dispatch.run()
        finally:
            self.retried |= dispatch.retried


class _Dispatch:
    """The driver's side of the work: each actor alive has up to IN_FLIGHT calls; a call whose actor died goes back to
    the front of the queue, and the actor rejoins once it answers ``ready`` again (Ray restarted it). A run whose
    actors are all gone for NO_WORKER_TIMEOUT stops (:class:`InferenceError`: the skeleton writes the report)."""

    def __init__(
        self, actors: list[Any], calls: list[Call], collect: Callable[[Outcome], None], ready: Callable[[Any], ray.ObjectRef]
    ):
        self.queue = deque(calls)
        self.collect = collect
        self.ready = ready  # asks an actor to load the model if it has not (restarted) and answer
        self.alive = list(actors)
        self.load = dict.fromkeys(actors, 0)
        self.running: dict[ray.ObjectRef, tuple[Any, Call]] = {}
        self.probes: dict[ray.ObjectRef, Any] = {}  # ready() asked of a lost actor
        self.later: list[tuple[float, Any]] = []  # (when, actor): probes to ask again (the actor is still restarting)
        self.none_since: float | None = None  # when the last actor alive was lost
        self.retried: set[str] = set()

    def run(self) -> None:
        while self.queue or self.running:
            self.hand_out()
            self.check_workers()
            for ref in self.wait():
                if ref in self.probes:
                    self.probed(ref)
                else:
                    self.returned(ref)

    def hand_out(self) -> None:
        for actor in sorted(self.alive, key=self.load.get):
            while self.queue and self.load[actor] < IN_FLIGHT:
                call = self.queue.popleft()
                self.running[actor.__call__.remote(call)] = (actor, call)
                self.load[actor] += 1

    def check_workers(self) -> None:
        if self.alive:
            self.none_since = None
            return
        if not (self.running or self.probes or self.later):
            raise InferenceError("every worker is gone and Ray cannot restart them; see `ray status`")
        self.none_since = self.none_since or time.monotonic()
        if time.monotonic() - self.none_since > NO_WORKER_TIMEOUT:
            raise InferenceError(f"every worker was lost and none came back within {NO_WORKER_TIMEOUT:.0f} s")

    def wait(self) -> list[ray.ObjectRef]:
        """The calls and probes answered within a few seconds (probes due are asked first)."""
        now = time.monotonic()
        for when, actor in [entry for entry in self.later if entry[0] <= now]:
            self.later.remove((when, actor))
            self.probes[self.ready(actor)] = actor
        timeout = max(0.1, min([5.0] + [when - now for when, _ in self.later]))
        waiting = [*self.running, *self.probes]
        if not waiting:  # only probes not yet due: ray.wait([]) returns at once, whatever its timeout
            time.sleep(timeout)
            return []
        done, _ = ray.wait(waiting, num_returns=1, timeout=timeout)
        return done

    def returned(self, ref: ray.ObjectRef) -> None:
        actor, call = self.running.pop(ref)
        self.load[actor] -= 1
        try:
            outcome = ray.get(ref)
        except ray.exceptions.RayTaskError as e:  # raised by the worker's code: the run stops, with its report
            if isinstance(e, InferenceError):
                raise  # the model or device unusable: the skeleton reports the worker's own message
            raise InferenceError(f"a worker failed: {first_line(e.cause)}") from e
        except ray.exceptions.RayActorError as e:  # the actor died: its process, or its node
            log.warning("a worker died (its process or its node): its %d photo(s) go to another one", len(call.jobs))
            log.debug("the worker's end: %s", e)
            self.retried.add(call.key)
            self.queue.appendleft(call)
            if actor in self.alive:
                self.alive.remove(actor)
                self.probes[self.ready(actor)] = actor
            return
        self.collect(outcome)

    def probed(self, ref: ray.ObjectRef) -> None:
        actor = self.probes.pop(ref)
        try:
            ray.get(ref)
        except (ray.exceptions.ActorDiedError, ray.exceptions.RayTaskError) as e:
            log.warning("a worker is gone for good: %s", first_line(e))
        except ray.exceptions.RayActorError:  # still restarting
            self.later.append((time.monotonic() + 1.0, actor))
        else:
            self.alive.append(actor)


def _wait_until_ready(answers: list[ray.ObjectRef]) -> None:
    """Until every actor has loaded the model; a :class:`ClusterError` when one cannot (its own message), or when the
    cluster cannot place them in time."""
    try:
        ray.get(answers, timeout=START_TIMEOUT)
    except ray.exceptions.GetTimeoutError as e:
        raise ClusterError(
            f"the workers did not start within {START_TIMEOUT:.0f} s: the cluster lacks the CPUs or GPUs they ask for "
            "(`ray status` shows what is free); lower --workers, or add nodes"
        ) from e
    except ray.exceptions.RayTaskError as e:  # the model did not load: the actor's own error
        raise ClusterError(f"a worker could not load the model: {first_line(e.cause)}") from e
    except ray.exceptions.RayActorError as e:
        raise ClusterError(f"a worker could not start: {first_line(e)}") from e


class Tally:
    """The outcomes as they come in: the run's results, and each worker's count, node and latest state."""

    def __init__(self) -> None:
        self.results = Results()
        self.workers: dict[str, dict] = {}
        self.states: dict[str, dict] = {}

    def count(self, outcome: Outcome, bar: tqdm) -> None:
        self.states[outcome.worker] = outcome.state
        counts = self.workers.setdefault(outcome.worker, {"device": outcome.state["device"], "processed": 0, "failed": 0})
        counts["node"] = outcome.node
        for job, error, confidence in zip(outcome.jobs, outcome.errors, outcome.confidences):
            if error:
                counts["failed"] += 1
                self.results.fail(job, error)
            else:
                counts["processed"] += 1
                self.results.done(job, confidence)
        bar.update(len(outcome.jobs))
