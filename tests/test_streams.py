"""A CPU runtime's streams: its threads split into batches that run at once, and the runner keeping that many in flight."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from batch.core.contract import prepare_input
from batch.inference.decode import TimedCalls
from batch.inference.model import load_model
from batch.inference.runtime import MAX_CPU_STREAMS, Lanes, cpu_streams, open_cpu_network
from batch.inference.segmenter import Segmenter

SPLITS = [(1, (1, 1)), (2, (2, 1)), (3, (3, 1)), (4, (4, 1)), (6, (4, 1)), (8, (4, 2)), (16, (4, 4)), (64, (4, 16))]


@pytest.mark.parametrize("threads, expected", SPLITS)
def test_threads_are_split_into_at_most_four_streams(threads: int, expected: tuple[int, int]):
    assert cpu_streams(threads) == expected
    assert expected[0] <= MAX_CPU_STREAMS and expected[0] * expected[1] <= threads


def test_lanes_lend_each_member_to_one_caller_at_a_time():
    lanes, busy, overlaps = Lanes(["a", "b"]), set(), []
    guard = threading.Lock()

    def use(_: int) -> str:
        with lanes.take() as member:
            with guard:
                overlaps.append(member in busy)
                busy.add(member)
            time.sleep(0.002)
            with guard:
                busy.discard(member)
            return member

    with ThreadPoolExecutor(6) as pool:
        used = list(pool.map(use, range(60)))
    assert not any(overlaps) and set(used) == {"a", "b"}


def batch_of(model, n: int, seed: int = 0) -> np.ndarray:
    height, width = model.contract.input_size
    pixels = np.random.default_rng(seed).integers(0, 256, (n, height, width, 3), dtype=np.uint8)
    return prepare_input(pixels, model.contract)


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_streams_run_at_once_give_each_batch_its_own_scores(tiny_onnx: Path, runtime: str):
    if runtime == "openvino":
        pytest.importorskip("openvino")
    network = load_model(tiny_onnx, "cpu", threads=2, runtime=runtime).network
    assert network.streams >= 1
    batches = [batch_of(load_model(tiny_onnx, "cpu", runtime="onnxruntime"), 3, seed) for seed in range(8)]
    alone = [network.run(x) for x in batches]
    with ThreadPoolExecutor(4) as pool:  # more callers than streams: they wait for a free one
        together = list(pool.map(network.run, batches))
    for a, b in zip(alone, together):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(alone[0], alone[1])


def test_onnxruntime_shares_one_session_between_single_thread_streams(tiny_onnx: Path):
    two = open_cpu_network(tiny_onnx, threads=2)
    assert two.streams == 2 and two.session.get_session_options().intra_op_num_threads == 1
    assert two.sessions.free.get() is two.sessions.free.get() is two.session
    eight = open_cpu_network(tiny_onnx, threads=8)  # four streams of two threads: a session each
    assert eight.streams == 4
    sessions = [eight.sessions.free.get() for _ in range(4)]
    assert len({id(s) for s in sessions}) == 4 and sessions[0].get_session_options().intra_op_num_threads == 2


def test_the_segmenter_keeps_its_streams_in_flight_and_its_results_in_order(photo_tree: Path, tiny_onnx: Path, monkeypatch):
    photos = sorted(p for p in photo_tree.rglob("*") if p.is_file())
    with Segmenter(tiny_onnx, device="cpu", threads=1, batch_size=2) as one:
        assert one.predictor.streams == 1
        expected = one(photos)
    with Segmenter(tiny_onnx, device="cpu", threads=2, batch_size=2) as two:
        assert two.predictor.streams == 2
        running, most = [], [0]
        real_run = two.predictor.model.network.run

        def counted(x):
            running.append(1)
            most[0] = max(most[0], len(running))
            time.sleep(0.05)  # long enough for the next batch to start beside it
            running.pop()
            return real_run(x)

        monkeypatch.setattr(two.predictor.model.network, "run", counted)
        got = two(photos)
    assert most[0] == 2
    assert len(got) == len(expected) == len(photos)
    for a, b in zip(expected, got):
        np.testing.assert_array_equal(a, b)


def test_timed_calls_reuse_their_threads_and_leave_a_stuck_one_behind():
    calls = TimedCalls()
    for n in range(20):
        assert calls.call(lambda n=n: n * 2, 5) == n * 2
    assert calls.idle == 1  # one thread served every call in turn
    release = threading.Event()
    with pytest.raises(TimeoutError):
        calls.call(release.wait, 0.2)  # stuck: its thread is left behind
    assert calls.call(lambda: "next", 5) == "next"  # a new thread serves the next call
    with pytest.raises(ZeroDivisionError):
        calls.call(lambda: 1 / 0, 5)
    release.set()


def test_a_batch_is_shared_evenly_among_the_streams():
    from batch.inference.decode import Batch, Item

    items = [Item(f"{i}.jpg", data=b"x") for i in range(5)]
    pixels = np.arange(5 * 2 * 3 * 3, dtype=np.uint8).reshape(5, 2, 3, 3)
    batch = Batch(items, [10, 11, 12, 13, 14], [(4, 6)] * 5, "pillow", pixels=pixels, contents=[(2, 3)] * 5)
    shares = batch.split(2)
    assert [len(share) for share in shares] == [2, 3]
    assert [p for share in shares for p in share.positions] == batch.positions
    np.testing.assert_array_equal(np.concatenate([share.pixels for share in shares]), pixels)
    assert [len(share) for share in batch.split(8)] == [1] * 5 and batch.split(1) == [batch]
    on_device = Batch(items, list(range(5)), [(4, 6)] * 5, "dali-mixed", model_input=object())
    assert on_device.split(2) == [on_device]  # a device buffer is not cut


def test_a_call_of_two_photos_keeps_both_streams_busy(photo_tree: Path, tiny_onnx: Path, monkeypatch):
    photos = sorted(p for p in photo_tree.rglob("*.jpg"))[:2]
    with Segmenter(tiny_onnx, device="cpu", threads=2) as segmenter:
        running, most = [], [0]
        real_run = segmenter.predictor.model.network.run

        def counted(x):
            running.append(1)
            most[0] = max(most[0], len(running))
            time.sleep(0.05)
            running.pop()
            return real_run(x)

        monkeypatch.setattr(segmenter.predictor.model.network, "run", counted)
        masks = segmenter(photos)
    assert most[0] == 2 and len(masks) == 2


@pytest.mark.parametrize("runtime", ["onnxruntime", "openvino"])
def test_streams_can_be_asked_for(tiny_onnx: Path, runtime: str):
    """``streams=1``: every thread on each batch (the least time for one photo); 2: two batches at once."""
    if runtime == "openvino":
        pytest.importorskip("openvino")
    for streams in (1, 2):
        with Segmenter(tiny_onnx, device="cpu", threads=2, streams=streams, runtime=runtime) as segmenter:
            assert segmenter.predictor.streams == streams
            assert segmenter.describe()["runtime"]["streams"] == streams


def test_openvino_takes_its_latency_hint_for_one_stream():
    from batch.inference.openvino_runtime import compile_config

    assert compile_config(2, "f32", 1) == {
        "PERFORMANCE_HINT": "LATENCY",
        "INFERENCE_NUM_THREADS": 2,
        "INFERENCE_PRECISION_HINT": "f32",
        "ENABLE_CPU_PINNING": False,
        "NUM_STREAMS": 1,
    }
    assert compile_config(4, "f32", 8)["NUM_STREAMS"] == 4  # at most one a thread
    assert "NUM_STREAMS" not in compile_config(4, "f32") and compile_config(4, "f32")["PERFORMANCE_HINT"] == "THROUGHPUT"
    assert cpu_streams(8, 2) == (2, 4) and cpu_streams(2, 8) == (2, 1)


def test_streams_must_be_positive(tiny_onnx: Path):
    with pytest.raises(ValueError, match="streams must be a positive integer"):
        Segmenter(tiny_onnx, device="cpu", streams=0)
