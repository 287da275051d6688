"""``unet-batch segment --engine ray`` on a local Ray cluster (2 CPUs), and both engines on s3:// locations
(a real S3-compatible server on 127.0.0.1): the same outputs, byte for byte, as the local engine."""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner
from conftest import REPO, write_photo

from batch.cli import main
from batch.core.devices import parse_device
from batch.core.timing import StageClock
from batch.runs._ray_reaper import remove_folder
from batch.runs.storage import open_location

ray = pytest.importorskip("ray", reason="the Ray engine needs the 'ray' extra")

from batch.runs.ray_engine import SegmentWorker, ray_session_folder  # noqa: E402  (after the skip: it imports ray)

PHOTOS = 10  # two calls of an actor at --batch-size 2 (CALL_BATCHES batches a call) and a remainder
BAD = {"bad/empty.jpg": b"", "bad/notes.png": b"shopping list"}


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray cluster for this file's tests: 2 CPUs, no dashboard; the engine joins it. Its session folder
    (Ray's logs) goes with it."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    session = ray_session_folder()
    yield
    ray.shutdown()
    remove_folder(session)


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    """PHOTOS synthetic photos of mixed sizes and formats in nested folders, and two bad files."""
    root = tmp_path / "photos"
    for i in range(PHOTOS):
        name = f"day{i % 3}/car{i:02d}" + (".png" if i % 4 == 0 else ".jpg")
        write_photo(root / name, (64 + 8 * (i % 3), 96 + 16 * (i % 2)), seed=i)
    for name, data in BAD.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def segment(*args) -> object:
    return CliRunner().invoke(main, ["segment", *map(str, args), "--no-progress"], catch_exceptions=False)


def files_under(root: Path) -> dict[str, bytes]:
    """Every output file (hidden RLE files included) but the report, by relative path."""
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != "report.json" and ".unet-batch" not in p.parts  # the runs' own records differ
    }


def temporary_files() -> set[str]:
    """What the temporary folder holds, but for pytest's folders and Ray's session folder (the test cluster's)."""
    return {name for name in os.listdir(tempfile.gettempdir()) if not name.startswith(("pytest-", "ray"))}


def test_ray_engine_writes_what_the_local_engine_writes(photos: Path, tmp_path: Path, tiny_onnx: Path, ray_cluster):
    options = ["--model", tiny_onnx, "--format", "png", "--format", "rle", "--batch-size", "2"]
    before = temporary_files()
    local = segment(photos, tmp_path / "local", *options)
    on_ray = segment(photos, tmp_path / "ray", *options, "--engine", "ray", "--workers", "2")
    assert temporary_files() <= before  # no model copy, no crash journal left in /tmp by the actors

    assert local.exit_code == on_ray.exit_code == 1, on_ray.output  # the bad files fail, the rest is done
    outputs = files_under(tmp_path / "local")
    assert len([name for name in outputs if name.endswith(".png")]) == PHOTOS
    assert files_under(tmp_path / "ray") == outputs  # masks, RLE files and submission.csv, byte for byte
    local_report, ray_report = (json.loads((tmp_path / name / "report.json").read_text()) for name in ("local", "ray"))
    assert ray_report["failed"] == local_report["failed"]
    assert [f["path"] for f in ray_report["failed"]] == [str(photos / name) for name in sorted(BAD)]
    assert (ray_report["engine"], ray_report["workers"], ray_report["processed"]) == ("ray", 2, PHOTOS)
    assert sum(worker["processed"] for worker in ray_report["per_worker"].values()) == PHOTOS
    assert set(ray_report) == set(local_report)  # the same schema


def test_ray_engine_resumes_after_a_killed_run(photos: Path, tmp_path: Path, tiny_onnx: Path, ray_cluster):
    out = tmp_path / "masks"
    options = ["--model", tiny_onnx, "--batch-size", "2", "--engine", "ray", "--workers", "1"]
    assert segment(photos, out, *options, "--limit", "6").exit_code == 1  # what a run killed after 6 files left: bad/* failed
    leftover = out / "day0" / ".car03.png.1234abcd.unet-batch-tmp"  # and a half-written temporary
    leftover.write_bytes(b"half")
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*.png")}

    result = segment(photos, out, *options)

    report = json.loads((out / "report.json").read_text())
    assert (report["skipped"], report["processed"], len(report["failed"])) == (4, PHOTOS - 4, len(BAD)), result.output
    assert len(before) == 4
    assert all(p.stat().st_mtime_ns == mtime for p, mtime in before.items())  # finished masks are not redone
    assert not leftover.exists()


def dies_once(marker: Path) -> type:
    """A worker whose first call writes its photos' outputs, then kills its process before answering."""

    class DiesOnce(SegmentWorker):
        def __call__(self, batch):
            outcome = super().__call__(batch)
            if not marker.exists():
                marker.touch()
                os._exit(1)
            return outcome

    return DiesOnce


def test_a_worker_that_dies_is_replaced_and_every_photo_is_done_once(photos: Path, tmp_path: Path, tiny_onnx: Path, ray_cluster):
    from batch.runs.config import ClusterConfig, RunConfig
    from batch.runs.ray_engine import RayEngine
    from batch.runs.run import run

    marker = tmp_path / "died"
    config = RunConfig(input_dir=photos, output_dir=tmp_path / "masks", model=tiny_onnx, batch_size=2,
                           formats=("png", "rle"), progress=False)  # fmt: skip
    report = run(config, RayEngine(config, ClusterConfig(workers=1), StageClock(), worker=dies_once(marker)))

    assert marker.exists()  # it did die
    assert (report.processed, len(report.failed)) == (PHOTOS, len(BAD))
    rows = (tmp_path / "masks" / "submission.csv").read_text().splitlines()[1:]
    assert len(rows) == len({row.split(",")[0] for row in rows}) == PHOTOS  # one row per photo


def crashes_on(name: str) -> type:
    """A worker whose process dies whenever it segments the photo ``name`` (as a decoder's segfault would)."""

    class CrashesOn(SegmentWorker):
        def segment(self, items, results):
            if any(item.tag.rel.as_posix() == name for item in items):
                os._exit(1)
            super().segment(items, results)

    return CrashesOn


def test_a_photo_that_kills_its_worker_is_failed_and_the_rest_is_done(photos: Path, tmp_path: Path, tiny_onnx: Path,
                                                                      ray_cluster):  # fmt: skip
    from batch.runs.config import ClusterConfig, RunConfig
    from batch.runs.journal import CRASHED
    from batch.runs.ray_engine import RayEngine
    from batch.runs.run import run

    poison = "day2/car05.jpg"
    config = RunConfig(input_dir=photos, output_dir=tmp_path / "masks", model=tiny_onnx, batch_size=2, progress=False)
    report = run(config, RayEngine(config, ClusterConfig(workers=1), StageClock(), worker=crashes_on(poison)))

    assert report.processed == PHOTOS - 1  # its call's other photos too
    assert {failure["path"]: failure["reason"] for failure in report.failed}[str(photos / poison)] == CRASHED
    assert len(report.failed) == len(BAD) + 1
    assert len(list((tmp_path / "masks").rglob("*.png"))) == PHOTOS - 1


def test_s3_to_s3_gives_the_local_engines_masks(photos: Path, tmp_path: Path, tiny_onnx: Path, s3_bucket: str, ray_cluster):
    bucket_in = open_location(f"{s3_bucket}/photos")
    for path in sorted(photos.rglob("*")):
        if path.is_file():
            bucket_in.write(PurePosixPath(path.relative_to(photos).as_posix()), path.read_bytes())
    options = ["--model", tiny_onnx, "--format", "png", "--format", "rle", "--batch-size", "2"]
    assert segment(photos, tmp_path / "local", *options).exit_code == 1

    for engine in ("local", "ray"):
        out = f"{s3_bucket}/masks-{engine}"
        result = segment(f"{s3_bucket}/photos", out, *options, "--engine", engine)
        assert result.exit_code == 1, result.output
        store = open_location(out)
        written = store.read_many(store.list_files(hidden=True))
        report = json.loads(written.pop(PurePosixPath("report.json")))
        outputs = {rel.as_posix(): data for rel, data in written.items() if ".unet-batch" not in rel.parts}
        assert outputs == files_under(tmp_path / "local")
        assert [f["path"] for f in report["failed"]] == [f"{s3_bucket}/photos/{name}" for name in sorted(BAD)]


@pytest.mark.parametrize("engine", ["local", "ray"])
def test_s3_problems_exit_2_saying_what_to_do(engine: str, photos: Path, tmp_path: Path, tiny_onnx: Path, s3_bucket: str,
                                              monkeypatch):  # fmt: skip
    missing = segment("s3://no-such-bucket/photos", tmp_path / "out", "--model", tiny_onnx, "--engine", engine)
    assert missing.exit_code == 2
    assert "bucket 'no-such-bucket' does not exist" in missing.output and "create it" in missing.output

    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    no_credentials = segment(photos, f"{s3_bucket}/masks", "--model", tiny_onnx, "--engine", engine)
    assert no_credentials.exit_code == 2
    assert "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY" in no_credentials.output


@pytest.mark.parametrize(
    ("resources", "nodes", "device", "workers", "expected"),
    [
        ({"CPU": 2}, 1, "auto", None, (1, 0, 1.0, 2)),  # this machine: one actor on both cores, a core's worth for reading
        ({"CPU": 2}, 1, "cpu", 2, (2, 0, 0.5, 1)),
        ({"CPU": 16, "GPU": 1}, 1, "auto", 2, (2, 0.5, 1.0, 8)),  # two actors share the GPU
        ({"CPU": 64, "GPU": 8}, 2, "cuda:0", None, (8, 1.0, 1.0, 8)),  # one per GPU over two nodes
        ({"CPU": 64, "GPU": 8}, 2, "cpu", None, (2, 0, 31.0, 32)),  # GPUs left alone when the CPU is asked for
    ],
)
def test_actors_are_placed_by_the_cluster_resources(resources, nodes, device, workers, expected):
    from batch.runs.ray_engine import plan_actors

    plan = plan_actors(resources, nodes, device, workers)
    assert (plan.count, plan.num_gpus, plan.num_cpus, plan.threads) == expected


@pytest.mark.parametrize(
    ("resources", "device", "message"),
    [({"CPU": 2}, "cuda", "has no GPUs"), ({"CPU": 8, "GPU": 2}, "cuda:1", "use --device cuda")],
)
def test_gpus_that_the_cluster_cannot_give_are_an_error(resources, device, message):
    from batch.runs.config import SegmentError
    from batch.runs.ray_engine import ClusterError, plan_actors

    with pytest.raises(ClusterError, match=message) as error:
        plan_actors(resources, 1, str(parse_device(device)), None)
    assert isinstance(error.value, SegmentError)  # the CLI's exit 2


def test_bench_scaling_measures_each_worker_count_beside_the_local_engine(photos: Path, tmp_path: Path, tiny_onnx: Path,
                                                                           ray_cluster):  # fmt: skip
    from benchmarks.cli import main as bench

    out = tmp_path / "bench"
    args = ["scaling", "--images", photos, "--model", tiny_onnx, "--workers", "1", "--out", out, "--no-progress"]
    result = CliRunner().invoke(bench, list(map(str, args)), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(row["engine"], row["workers"], row["nodes"], row["photos"]) for row in rows] == [
        ("local", 1, 1, PHOTOS),
        ("ray", 1, 1, PHOTOS),
        ("local", 1, 1, PHOTOS),
    ]
    assert "| ray | 1 | 1 |" in (out / "results.md").read_text()


def fails_with(error: Exception) -> type:
    """A worker whose every call raises ``error``: a broken engine (the stream gives up with an InferenceError after three
    failed batches in a row), or a bug."""

    class Fails(SegmentWorker):
        def __call__(self, call):
            raise error

    return Fails


@pytest.mark.parametrize(
    ("error", "stopped"),
    [("inference failed on 3 batches in a row", "inference failed on 3 batches in a row"), ("a bug", "a worker failed: a bug")],
)
def test_a_broken_engine_stops_the_run_with_a_report(error: str, stopped: str, photos: Path, tmp_path: Path, tiny_onnx: Path,
                                                     ray_cluster):  # fmt: skip
    from batch.inference.segmenter import InferenceError
    from batch.runs.config import ClusterConfig, RunConfig
    from batch.runs.ray_engine import RayEngine
    from batch.runs.run import run

    raised = InferenceError(error) if error.startswith("inference") else ValueError(error)
    config = RunConfig(input_dir=photos, output_dir=tmp_path / "masks", model=tiny_onnx, progress=False)
    report = run(config, RayEngine(config, ClusterConfig(workers=1), StageClock(), worker=fails_with(raised)))

    assert report.stopped == stopped
    assert report.processed == 0
    assert json.loads((tmp_path / "masks" / "report.json").read_text())["stopped"] == report.stopped


def test_a_rerun_with_nothing_to_do_starts_no_ray(photos: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    from batch.runs import ray_engine

    out = tmp_path / "masks"
    shutil.rmtree(photos / "bad")  # (a rerun retries failed photos)
    assert segment(photos, out, "--model", tiny_onnx).exit_code == 0

    def no_ray(*args, **kwargs):
        raise AssertionError("Ray was started for a run with nothing to do")

    monkeypatch.setattr(ray_engine, "ray_session", no_ray)
    monkeypatch.setattr(ray_engine.ray, "init", no_ray)
    rerun = segment(photos, out, "--model", tiny_onnx, "--engine", "ray")
    assert rerun.exit_code == 0, rerun.output
    assert f"0 segmented, {PHOTOS} already done" in rerun.output
    assert "decoder )" not in rerun.output
    last = json.loads((out / ".unet-batch" / "history.jsonl").read_text().splitlines()[-1])
    assert (last["engine"], last["workers"], last["processed"], last["skipped"]) == ("ray", 0, 0, PHOTOS)
    assert last["model"]["path"] == str(tiny_onnx)


def run_python(code: str, **options) -> subprocess.Popen:
    """``code`` in a fresh Python, this repository importable (Ray's workers inherit PYTHONPATH)."""
    env = os.environ | {"PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            **options)  # fmt: skip


def session_folder(pid: int) -> list[Path]:
    """The Ray session folder a driver of this pid started (Ray names it after the driver's pid)."""
    return list(Path(tempfile.gettempdir(), "ray").glob(f"session_*_{pid}"))


def test_a_ray_run_prints_only_its_own_lines_and_leaves_no_ray_behind(photos: Path, tmp_path: Path, tiny_onnx: Path):
    command = f"from batch.cli import main; main(['segment', {str(photos)!r}, {str(tmp_path / 'masks')!r}, '--model', " \
              f"{str(tiny_onnx)!r}, '--engine', 'ray', '--no-progress'])"  # fmt: skip
    driver = run_python(command)
    out, err = driver.communicate(timeout=120)
    assert driver.returncode == 1, err  # the bad files
    lines = [line for line in err.splitlines() if line.strip()]
    ours = [line for line in lines if line.startswith("INFO batch.") or line.startswith("  ") or "photo(s) failed" in line]
    assert lines == ours, err  # no token-auth warning, no core_worker.cc error, no Ray notice
    assert any(line.startswith("INFO batch.runs.ray_engine: Ray ready in") for line in lines)
    assert any("a local Ray on one host adds its start-up" in line for line in lines)  # where --engine local is faster
    assert f"{PHOTOS} segmented" in out
    assert not session_folder(driver.pid)  # Ray's session folder (its logs) goes with the run


SLEEPER = """
import pathlib, time
from batch.core.timing import StageClock
from batch.runs.config import ClusterConfig, RunConfig
from batch.runs.ray_engine import RayEngine, SegmentWorker
from batch.runs.run import run

class Sleeper(SegmentWorker):  # segments nothing: tells the test it has started, then waits to be killed
    def segment(self, items, results):
        pathlib.Path({marker!r}).touch()
        time.sleep(600)

config = RunConfig({photos!r}, {out!r}, model={model!r}, progress=False)
run(config, RayEngine(config, ClusterConfig(workers=1), StageClock(), worker=Sleeper))
"""


def test_a_killed_drivers_local_ray_does_not_outlive_it(photos: Path, tmp_path: Path, tiny_onnx: Path):
    from batch.runs._ray_reaper import descendants

    marker = tmp_path / "segmenting"
    driver = run_python(SLEEPER.format(marker=str(marker), photos=str(photos), out=str(tmp_path / "masks"), model=str(tiny_onnx)))
    deadline = time.monotonic() + 90
    while not marker.exists() and driver.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    assert marker.exists(), driver.communicate(timeout=10)[1] if driver.poll() is not None else "no call within 90 s"
    ray_processes = descendants(driver.pid)  # the GCS, the raylet, their agents, the actor: all started by the driver
    assert len(ray_processes) >= 4

    driver.kill()  # SIGKILL: no chance to stop anything
    driver.communicate(timeout=10)
    deadline = time.monotonic() + 20
    while any(is_running(*process) for process in ray_processes) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [process for process in ray_processes if is_running(*process)]
    assert not session_folder(driver.pid)


def is_running(pid: int, started: str) -> bool:
    """Whether the process ``pid`` that started at ``started`` (a /proc stat field) is still there (a zombie is not)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return False
    return fields[19] == started and fields[0] != "Z"


@pytest.mark.parametrize(
    ("address", "photos", "engine"),
    [(None, 5000, "local"), ("head:6379", 10, "local"), ("head:6379", 5000, "ray")],
)
def test_engine_auto_uses_ray_for_a_named_cluster_and_enough_photos(address, photos, engine, monkeypatch, caplog):
    from batch.runs.config import ClusterConfig
    from batch.runs.run import choose_engine

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    caplog.set_level(logging.INFO, logger="batch.runs.run")
    assert choose_engine(ClusterConfig(address=address), photos) == engine
    assert f"--engine auto: {engine}" in caplog.text


def test_engine_auto_without_a_cluster_runs_the_local_engine(photos: Path, tmp_path: Path, tiny_onnx: Path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    result = segment(photos, tmp_path / "masks", "--model", tiny_onnx, "--engine", "auto")
    assert result.exit_code == 1, result.output  # the bad files
    assert json.loads((tmp_path / "masks" / "report.json").read_text())["engine"] == "local"


def test_removing_a_session_folder_removes_the_link_ray_left_to_it_and_no_other(tmp_path: Path):
    ours, other = tmp_path / "session_2026_1", tmp_path / "session_2026_2"
    for folder in (ours, other):
        (folder / "logs").mkdir(parents=True)
    latest = tmp_path / "session_latest"
    latest.symlink_to(other)
    remove_folder(ours)
    assert not ours.exists() and latest.is_symlink()  # another session's link stays
    latest.unlink()
    latest.symlink_to(ours)
    remove_folder(other)
    assert latest.is_symlink()
    remove_folder(ours)
    assert not latest.is_symlink() and not latest.exists()
