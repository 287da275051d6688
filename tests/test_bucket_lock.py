"""One run at a time per bucket prefix (issue 25): a lease object written only if absent, renewed on the condition that it
is still the run's own, taken over when stale by one run only, never deleted by a run that lost it. Against the S3
server the other tests use (moto, on 127.0.0.1)."""

from __future__ import annotations

import json
import time
from datetime import timedelta
from pathlib import Path, PurePosixPath

import pytest
from click.testing import CliRunner
from conftest import write_photo

from batch.cli import main
from batch.runs import lock
from batch.runs.lock import LOCK_NAME, BucketLock, output_folder
from batch.runs.storage import StorageError, open_location

LOCK = PurePosixPath(LOCK_NAME)


def segment(photos: Path, out: str, model: Path):
    return CliRunner().invoke(main, ["segment", str(photos), out, "--model", str(model), "--no-progress"])


@pytest.fixture
def photos(tmp_path: Path) -> Path:
    for i in range(3):
        write_photo(tmp_path / "photos" / f"p{i}.jpg", (48, 64), seed=i)
    return tmp_path / "photos"


def holder(store) -> dict:
    return json.loads(store.read(LOCK))


def test_a_second_run_into_a_locked_prefix_is_refused_naming_the_holder(photos: Path, tiny_onnx: Path, s3_bucket: str):
    out = f"{s3_bucket}/masks"
    store = open_location(out)
    with output_folder(store):
        refused = segment(photos, out, tiny_onnx)
        assert holder(store)["pid"] > 0  # the first run's lock is left alone
    assert refused.exit_code == 2, refused.output
    assert f"another unet-batch run is writing to {out}" in refused.output
    assert "choose another OUTPUT_DIR" in refused.output and "taken over" in refused.output
    assert not store.list_files(hidden=True)  # the refused run wrote nothing

    assert segment(photos, out, tiny_onnx).exit_code == 0  # once the first run is done
    assert LOCK not in store.list_files(hidden=True)  # and it leaves no lock behind


def later(monkeypatch, seconds: float) -> None:
    """Move the lock's clock ``seconds`` on (S3 stamps its objects itself, to the second: no waiting in the tests)."""
    now = lock._now()
    monkeypatch.setattr(lock, "_now", lambda: now + timedelta(seconds=seconds))


def test_a_killed_runs_lock_is_taken_over_once_its_lease_expires(photos: Path, tiny_onnx: Path, s3_bucket: str,
                                                                 monkeypatch, caplog):  # fmt: skip
    out = f"{s3_bucket}/masks"
    store = open_location(out)
    BucketLock(store).take()  # a run killed right after taking its lock: nobody renews it

    assert segment(photos, out, tiny_onnx).exit_code == 2  # still fresh
    later(monkeypatch, lock.LEASE + 1)
    result = segment(photos, out, tiny_onnx)
    assert result.exit_code == 0, result.output
    assert "took over the lock" in caplog.text
    assert len([rel for rel in store.list_files() if rel.suffix == ".png"]) == 3
    assert LOCK not in store.list_files(hidden=True)


def test_of_two_runs_taking_over_a_stale_lock_one_wins(s3_bucket: str, monkeypatch):
    store = open_location(f"{s3_bucket}/masks")
    BucketLock(store).take()
    later(monkeypatch, lock.LEASE + 1)
    first, second = BucketLock(store), BucketLock(store)
    stale = first.find()
    assert stale is not None and stale.age() > lock.LEASE and second.find() == stale  # both judge it stale

    assert first.take_over(stale)
    assert not second.take_over(stale)  # the version it judged is gone: it does not share the lock
    assert holder(store)["run"] == first.record["run"]


def test_a_live_run_renews_its_lock_and_a_run_that_lost_it_says_so(s3_bucket: str, monkeypatch):
    monkeypatch.setattr(lock, "LEASE", 0.4)  # renewed every 0.1 s
    store = open_location(f"{s3_bucket}/masks")
    with BucketLock(store).held() as held:
        first = held.tag
        wait_until(lambda: held.tag != first)  # renewed: a new version, written on the condition of the last
        thief = BucketLock(store)  # a run that took it over while this one could not reach the store
        thief.tag = thief.write()
        wait_until(lambda: held.lost)
        assert "another run took over the lock" in held.lost
    assert holder(store)["run"] == thief.record["run"]  # the run that lost it leaves the other's lock alone


def wait_until(condition, seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        assert time.monotonic() < deadline, "not within 10 s"
        time.sleep(0.02)


def test_other_object_stores_refuse_a_lock_left_behind_and_say_how_to_remove_it():
    store = open_location("memory://unet-batch-lock-test/masks")
    with output_folder(store), pytest.raises(StorageError) as refused:
        BucketLock(store).take()
    assert "delete memory://unet-batch-lock-test/masks/.unet-batch.lock" in str(refused.value)
    assert not store.fs.exists(store.key(LOCK))  # released: fsspec's memory store is this process's


def test_a_run_whose_lock_was_taken_over_ends_saying_so(photos: Path, tiny_onnx: Path, s3_bucket: str, monkeypatch):
    from batch.core.timing import StageClock
    from batch.runs._local import LocalEngine
    from batch.runs.config import RunConfig
    from batch.runs.run import run

    monkeypatch.setattr(lock, "LEASE", 0.4)  # renewed every 0.1 s
    thief = None

    class CutOff(LocalEngine):  # while it segments, another run takes its lock over (it was cut off from the store)
        def process(self, jobs, source, output, results, progress):
            nonlocal thief
            super().process(jobs, source, output, results, progress)
            thief = BucketLock(output)
            thief.tag = thief.write()
            time.sleep(1.0)  # the run's next renewals find it

    config = RunConfig(photos, f"{s3_bucket}/masks", model=tiny_onnx, progress=False)
    report = run(config, CutOff(config, StageClock()))
    assert "another run took over the lock" in report.stopped and report.processed == 3
    assert holder(open_location(f"{s3_bucket}/masks"))["run"] == thief.record["run"]  # left to the other run
