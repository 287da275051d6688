"""``--engine ray`` on a cluster of several nodes on this machine (issue 25): Ray's own ``ray.cluster_utils.Cluster``,
a head without CPUs for the driver and NODES worker nodes of 2 logical CPUs each; the photos in a folder every node
sees and in an S3 bucket (the moto server on 127.0.0.1). Shown: the actors spread over the nodes as ``plan_actors``
says; a node lost mid-run, after some photos are written, costs nothing (every photo done once, the local engine's
outputs, each photo counted once); a photo that kills its worker is failed even when its actor comes back on
another node (the crash journal lives beside the outputs). Every run here is bounded in time."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path, PurePosixPath

import pytest
from conftest import REPO, write_photo

from batch.core.timing import StageClock
from batch.runs.config import ClusterConfig, RunConfig
from batch.runs.report import Report
from batch.runs.run import run
from batch.runs.storage import open_location

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra")

from batch.runs.journal import CRASHED  # noqa: E402
from batch.runs.ray_engine import RayEngine, SegmentWorker, simulated_cluster  # noqa: E402  (after the skip)

NODES = 3
PHOTOS = 24
RUN_SECONDS = 120  # a run that takes longer fails the test (the cluster's teardown then ends it)
FAST_HEALTH_CHECKS = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500, "health_check_failure_threshold": 4}


@pytest.fixture(scope="module")
def cluster():
    """The head (no CPUs: the driver only, as a cluster's head often is) and NODES worker nodes of 2 logical CPUs; a lost
    node is noticed within ~2 s."""
    with simulated_cluster(NODES, cpus_per_node=2, system_config=FAST_HEALTH_CHECKS) as cluster:
        yield cluster


@pytest.fixture
def nodes(cluster) -> list:
    """The worker nodes, NODES of them alive (a test that removed one gets a new one)."""
    while len(cluster.worker_nodes) < NODES:
        cluster.add_node(num_cpus=2)
    cluster.wait_for_nodes()
    return sorted(cluster.worker_nodes, key=lambda node: node.node_id)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """PHOTOS synthetic photos in a folder every node sees."""
    for i in range(PHOTOS):
        write_photo(tmp_path / "photos" / f"lot{i % 2}" / f"car{i:02d}.jpg", (64, 96), seed=i)
    return tmp_path / "photos"


def local_outputs(photos: Path, out: Path, tiny_onnx: Path) -> dict[str, bytes]:
    """What the local engine writes for these photos (the reference every Ray run must equal)."""
    report = run(RunConfig(photos, out, model=tiny_onnx, formats=("png", "rle"), progress=False))
    assert report.processed == PHOTOS
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
            and p.name != "report.json" and ".unet-batch" not in p.parts}  # fmt: skip


def run_bounded(config: RunConfig, worker: type, workers: int | None, during=None) -> Report:
    """The Ray engine's run in a thread, ``during()`` meanwhile in this one; the report, or a failure after RUN_SECONDS."""
    outcome: dict = {}

    def go() -> None:
        try:
            outcome["report"] = run(config, RayEngine(config, ClusterConfig(workers=workers), StageClock(), worker=worker))
        except BaseException as e:  # handed to the test
            outcome["error"] = e

    thread = threading.Thread(target=go, daemon=True)
    thread.start()
    if during is not None:
        during()
    thread.join(RUN_SECONDS)
    assert not thread.is_alive(), f"the run took more than {RUN_SECONDS} s"
    if "error" in outcome:
        raise outcome["error"]
    return outcome["report"]


def wait_for(path: Path, seconds: float = 60) -> str:
    deadline = time.monotonic() + seconds
    while not path.exists():
        assert time.monotonic() < deadline, f"{path.name} did not appear within {seconds:.0f} s"
        time.sleep(0.05)
    time.sleep(0.05)  # its content, written just after
    return path.read_text()


def node_of(nodes: list, node_id: str):
    return next(node for node in nodes if node.node_id == node_id)


def counted_once(report: Report) -> None:
    """Every photo processed once: the run's count, the workers' counts and submission.csv agree."""
    assert sum(worker["processed"] for worker in report.per_worker.values()) == report.processed


def test_the_documented_command_on_a_cluster_with_a_bucket(cluster, nodes, photos: Path, tmp_path: Path, tiny_onnx: Path,
                                                          s3_bucket: str):  # fmt: skip
    """docs/scale-out.md's command, from another process, against the cluster's head address and S3 in and out (the
    nodes get the bucket's AWS_* variables from the command's environment)."""
    expected = local_outputs(photos, tmp_path / "local", tiny_onnx)
    store_in = open_location(f"{s3_bucket}/photos")
    for path in sorted(photos.rglob("*.jpg")):
        store_in.write(PurePosixPath(path.relative_to(photos).as_posix()), path.read_bytes())
    command = [sys.executable, "-m", "batch.cli", "segment", f"{s3_bucket}/photos", f"{s3_bucket}/masks", "--model",
               str(tiny_onnx), "--format", "png", "--format", "rle", "--engine", "ray", "--address", cluster.address,
               "--no-progress"]  # fmt: skip
    env = os.environ | {"PYTHONPATH": str(REPO)}
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=RUN_SECONDS)

    assert result.returncode == 0, result.stderr
    assert f"{PHOTOS} segmented" in result.stdout
    store_out = open_location(f"{s3_bucket}/masks")
    assert bucket_outputs(store_out) == expected
    report = json.loads(store_out.read(PurePosixPath("report.json")))
    assert (report["engine"], report["workers"]) == ("ray", NODES)  # one per node; none on the head without CPUs


def bucket_outputs(store) -> dict[str, bytes]:
    return {rel.as_posix(): data for rel, data in store.read_many(store.list_files(hidden=True)).items()
            if rel.name != "report.json" and ".unet-batch" not in rel.parts}  # fmt: skip


def test_actors_spread_over_the_nodes_as_planned(cluster, nodes, photos: Path, tmp_path: Path, tiny_onnx: Path):
    expected = local_outputs(photos, tmp_path / "local", tiny_onnx)
    config = RunConfig(photos, tmp_path / "ray", model=tiny_onnx, formats=("png", "rle"), batch_size=2, progress=False)
    report = run_bounded(config, SegmentWorker, workers=None)

    assert (report.processed, report.failed, report.workers) == (PHOTOS, [], NODES)  # plan_actors: one per node
    assert {worker["node"] for worker in report.per_worker.values()} == {node.node_id for node in nodes}
    assert all(worker["processed"] > 0 for worker in report.per_worker.values())
    counted_once(report)
    assert local_outputs_equal(tmp_path / "ray", expected)


def local_outputs_equal(out: Path, expected: dict[str, bytes]) -> bool:
    written = {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()
               and p.name != "report.json" and ".unet-batch" not in p.parts}  # fmt: skip
    return written == expected


def loses_its_node(marker: Path) -> type:
    """A worker whose actor that first finishes a call (any node) writes that call's outputs, says so, and hangs until
    its node is removed: the node dies after the outputs are written and before the driver hears of them."""

    class LosesItsNode(SegmentWorker):
        def __call__(self, call):
            outcome = super().__call__(call)
            try:
                claim = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                return outcome  # another actor is the one whose node dies
            os.write(claim, json.dumps({"node": self.node, "written": [job.name for job in call.jobs]}).encode())
            os.close(claim)
            time.sleep(RUN_SECONDS)
            return outcome

    return LosesItsNode


def test_a_node_lost_mid_run_costs_nothing(cluster, nodes, photos: Path, tmp_path: Path, tiny_onnx: Path, s3_bucket: str):
    expected = local_outputs(photos, tmp_path / "local", tiny_onnx)
    store_in = open_location(f"{s3_bucket}/photos")
    for path in sorted(photos.rglob("*.jpg")):
        store_in.write(PurePosixPath(path.relative_to(photos).as_posix()), path.read_bytes())
    marker = tmp_path / "written-then-lost"
    config = RunConfig(f"{s3_bucket}/photos", f"{s3_bucket}/masks", model=tiny_onnx, formats=("png", "rle"), batch_size=2,
                       progress=False)  # fmt: skip
    lost = {}

    def lose_the_node() -> None:
        lost.update(json.loads(wait_for(marker)))
        cluster.remove_node(node_of(nodes, lost["node"]), allow_graceful=False)

    report = run_bounded(config, loses_its_node(marker), workers=None, during=lose_the_node)

    assert lost["written"]  # the node was lost with outputs written and not yet reported
    assert (report.processed, report.failed, report.stopped) == (PHOTOS, [], "")
    counted_once(report)
    store_out = open_location(f"{s3_bucket}/masks")
    assert bucket_outputs(store_out) == expected  # masks, RLE files and submission.csv (one row per photo), byte for byte
    assert not [rel for rel in store_out.list_files(hidden=True) if "journal" in rel.parts]


def poison_kills_its_node_then_its_worker(poison: str, marker: Path) -> type:
    """A worker that cannot survive ``poison``: the first time, its node dies while it segments the photo's call (the
    test removes the node); after that, the photo kills the worker's process, as a decoder's crash would."""

    class PoisonKills(SegmentWorker):
        def segment(self, items, results):
            if any(item.tag.name == poison for item in items):
                if not marker.exists():
                    marker.write_text(self.node)
                    time.sleep(RUN_SECONDS)
                os._exit(1)
            super().segment(items, results)

    return PoisonKills


def test_a_poison_photo_is_failed_when_its_actor_comes_back_on_another_node(cluster, nodes, photos: Path, tmp_path: Path,
                                                                           tiny_onnx: Path):  # fmt: skip
    poison, marker = "lot1/car05.jpg", tmp_path / "poison-node"
    config = RunConfig(photos, tmp_path / "masks", model=tiny_onnx, batch_size=2, progress=False)
    lost = []
    before = temporary_files()

    def lose_the_poisoned_node() -> None:
        lost.append(wait_for(marker))
        cluster.remove_node(node_of(nodes, lost[0]), allow_graceful=False)

    report = run_bounded(config, poison_kills_its_node_then_its_worker(poison, marker), workers=1, during=lose_the_poisoned_node)

    assert report.failed == [{"path": str(photos / poison), "reason": CRASHED}]
    assert report.processed == PHOTOS - 1  # the photos of its call too
    counted_once(report)
    assert {worker["node"] for worker in report.per_worker.values()} - set(lost)  # the actor came back elsewhere
    assert len(list((tmp_path / "masks").rglob("*.png"))) == PHOTOS - 1
    assert not list((tmp_path / "masks" / ".unet-batch" / "journal").glob("*"))  # the run's journals are gone
    assert temporary_files() <= before  # no journal, no model copy left in /tmp by the actors (issue 22 item 9)


def temporary_files() -> set[str]:
    """What the temporary folder holds, but for pytest's folders and Ray's (the test cluster's session)."""
    return {name for name in os.listdir(tempfile.gettempdir()) if not name.startswith(("pytest-", "ray"))}


def test_bench_scaling_runs_over_actors_and_simulated_nodes(cluster, nodes, photos: Path, tmp_path: Path, tiny_onnx: Path,
                                                           monkeypatch):  # fmt: skip
    from click.testing import CliRunner

    from batch.runs import ray_engine
    from benchmarks.cli import main as bench

    @contextlib.contextmanager
    def this_cluster(count: int, cpus_per_node: int) -> Iterator[object]:  # the module's nodes stand for the simulated ones
        assert count == NODES
        yield cluster

    monkeypatch.setattr(ray_engine, "simulated_cluster", this_cluster)
    out = tmp_path / "bench"
    args = ["scaling", "--images", photos, "--model", tiny_onnx, "--workers", "1", "--nodes", NODES, "--out", out,
            "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(bench, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    document = json.loads((out / "results.json").read_text())
    rows = [(row["engine"], row["workers"], row["nodes"], row["photos"]) for row in document["rows"]]
    assert rows == [("local", 1, 1, PHOTOS), ("ray", 1, NODES, PHOTOS), ("ray", NODES, NODES, PHOTOS), ("local", 1, 1, PHOTOS)]
    assert set(document["cluster_start_seconds"]) == {"ray", f"{NODES} simulated nodes"}
    assert f"| ray | {NODES} | {NODES} |" in (out / "results.md").read_text()
