"""Busy seconds per stage of a run, summed over the threads doing it: the stage times of report.json and unet-bench."""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from contextlib import contextmanager

STAGES = ("discover", "setup", "decode", "infer", "postprocess", "write")


class StageClock:
    """Busy seconds per stage, summed over the threads doing it (thread-safe). ``timer``: wall time by default;
    ``time.process_time`` measures CPU time instead (unet-bench's host cost)."""

    def __init__(self, timer: Callable[[], float] = time.perf_counter) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.lock = threading.Lock()
        self.timer = timer

    def add(self, stage: str, seconds: float) -> None:
        with self.lock:
            self.seconds[stage] += seconds

    @contextmanager
    def __call__(self, stage: str):
        start = self.timer()
        try:
            yield
        finally:
            self.add(stage, self.timer() - start)

    def snapshot(self) -> dict[str, float]:
        with self.lock:
            return {stage: round(self.seconds.get(stage, 0.0), 4) for stage in STAGES}
