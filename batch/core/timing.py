"""Busy seconds per stage of a run, summed over the threads doing it: the stage times of report.json and unet-bench."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from contextlib import contextmanager

STAGES = ("discover", "setup", "decode", "infer", "postprocess", "write")


class StageClock:
    """Busy seconds per stage, summed over the threads doing it (thread-safe)."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str):
        start = time.perf_counter()
        try:
            yield
        finally:
            self.add(stage, time.perf_counter() - start)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {stage: round(self.seconds.get(stage, 0.0), 4) for stage in STAGES}
