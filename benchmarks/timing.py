"""Timing discipline shared by every benchmark: warm-up, repeats, median and spread.

Like timm's ``benchmark.py``: a few untimed warm-up calls (allocator arenas, cuDNN algorithm search,
page cache), then ``repeats`` timed calls, each ending with a device synchronization where the work
is asynchronous. A rate is reported as the median over repeats with its interquartile range and
min/max, so one slow repeat (another process taking the CPU) does not move the headline figure.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Stats:
    """Summary of repeated measurements of one quantity (a rate, or seconds)."""

    median: float
    q1: float  # 25th percentile
    q3: float  # 75th percentile
    min: float
    max: float
    n: int  # number of repeats

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError("Stats need at least one sample")

    @property
    def iqr(self) -> float:
        return self.q3 - self.q1

    def scaled(self, factor: float) -> Stats:
        """The same spread, every value multiplied by ``factor`` (> 0), e.g. images/s -> megapixels/s."""
        if factor <= 0:
            raise ValueError(f"scale factor must be positive, got {factor}")
        return Stats(self.median * factor, self.q1 * factor, self.q3 * factor, self.min * factor, self.max * factor, self.n)


def summarize(samples: Sequence[float]) -> Stats:
    """Median, quartiles and extremes of ``samples``."""
    values = np.asarray(samples, dtype=np.float64)
    if values.size == 0:
        raise ValueError("cannot summarize zero samples")
    q1, median, q3 = np.percentile(values, [25, 50, 75])
    return Stats(float(median), float(q1), float(q3), float(values.min()), float(values.max()), int(values.size))


def rates(items: Sequence[float], seconds: Sequence[float]) -> Stats:
    """Throughput (items per second) of each repeat, summarized."""
    if len(items) != len(seconds):
        raise ValueError(f"{len(items)} item counts for {len(seconds)} timings")
    if any(s <= 0 for s in seconds):
        raise ValueError("every timing must be positive")
    return summarize([n / s for n, s in zip(items, seconds)])


def time_calls(fn: Callable[[], object], *, warmup: int, repeats: int, sync: Callable[[], None] | None = None) -> list[float]:
    """Seconds taken by each of ``repeats`` calls of ``fn`` after ``warmup`` untimed calls.

    ``sync`` (e.g. a CUDA stream synchronize) runs after every call, inside the timed region, so
    asynchronous work is counted where it happens.
    """
    if warmup < 0 or repeats < 1:
        raise ValueError(f"need warmup >= 0 and repeats >= 1, got {warmup} and {repeats}")
    finish = sync or (lambda: None)
    for _ in range(warmup):
        fn()
        finish()
    seconds = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        finish()
        seconds.append(time.perf_counter() - start)
    return seconds
