"""Memory figures: peak host RSS (stdlib ``resource``) and GPU memory (``nvidia-smi``)."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import resource
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks.machine import number_or_none, run_quietly

log = logging.getLogger(__name__)


def rss_mib(ru_maxrss: int) -> float:
    """``ru_maxrss`` in MiB: Linux reports KiB, macOS bytes."""
    return ru_maxrss / (2**20 if sys.platform == "darwin" else 2**10)


def peak_rss_mib() -> float:
    """Peak resident set size of this process so far, in MiB."""
    return rss_mib(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


@dataclass(frozen=True)
class GpuMemoryReading:
    mib: float | None
    method: str  # how it was measured, or why it could not be


def gpu_memory_of(is_ours: Callable[[int], bool], device_index: int) -> GpuMemoryReading:
    """GPU memory held now by the processes ``is_ours`` accepts (by pid), from ``nvidia-smi``.

    Inside a container the driver may list host process ids that match none of ours; then the whole
    device's used memory is reported instead, and ``method`` says so.
    """
    apps = run_quietly(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"])
    if apps is None:
        return GpuMemoryReading(None, "nvidia-smi not available")
    ours = []
    for line in apps.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and number_or_none(parts[1]) is not None and is_ours(int(parts[0])):
            ours.append(number_or_none(parts[1]))
    if ours:
        return GpuMemoryReading(sum(ours), "nvidia-smi, the benchmarked process")
    total = run_quietly(["nvidia-smi", f"--id={device_index}", "--query-gpu=memory.used", "--format=csv,noheader,nounits"])
    used = number_or_none(total.strip()) if total else None
    if used is None:
        return GpuMemoryReading(None, "nvidia-smi reports neither the process nor the device's memory")
    return GpuMemoryReading(used, "nvidia-smi, whole device (process not listed; includes other processes)")


def this_process(pid: int) -> bool:
    return pid == os.getpid()


def in_process_group(group: int) -> Callable[[int], bool]:
    def accept(pid: int) -> bool:
        try:
            return os.getpgid(pid) == group
        except OSError:  # gone, or a pid of another pid namespace
            return False

    return accept


class GpuMemorySampler:
    """Polls :func:`gpu_memory_of` in a background thread and keeps the peak; a context manager."""

    def __init__(self, is_ours: Callable[[int], bool], device_index: int, interval_s: float = 0.5):
        self.is_ours, self.device_index, self.interval_s = is_ours, device_index, interval_s
        self.peak: GpuMemoryReading = GpuMemoryReading(None, "not sampled")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)

    def _poll(self) -> None:
        while not self._stop.is_set():
            reading = gpu_memory_of(self.is_ours, self.device_index)
            if self.peak.mib is None or (reading.mib is not None and reading.mib > self.peak.mib):
                self.peak = reading
            self._stop.wait(self.interval_s)

    def __enter__(self) -> GpuMemorySampler:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()


@dataclass(frozen=True)
class ChildRun:
    returncode: int
    seconds: float  # wall clock, launch to exit
    peak_rss_mib: float  # the command's own peak resident set size
    gpu_memory: GpuMemoryReading | None  # peak sampled while it ran; None when no GPU was asked for


def run_child(command: list[str], *, stdout, stderr, timeout_s: float, gpu_index: int | None = None) -> ChildRun:
    """Run ``command`` to completion, measuring its wall time, peak RSS and (on a GPU) peak GPU memory.

    The command runs under :mod:`benchmarks.launch` in a new session, so its RSS is its own and, past
    ``timeout_s``, the whole process group is killed (a timeout is exit code -9).
    """
    with tempfile.TemporaryDirectory(prefix="unet-bench-launch-") as folder:
        report = Path(folder) / "rusage.json"
        start = time.perf_counter()
        process = subprocess.Popen(
            [sys.executable, "-m", "benchmarks.launch", str(report), *command],
            stdout=stdout,
            stderr=stderr,
            start_new_session=True,
        )
        sampler = GpuMemorySampler(in_process_group(process.pid), gpu_index) if gpu_index is not None else None
        with sampler or contextlib.nullcontext():
            try:
                process.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
        seconds = time.perf_counter() - start
        usage = json.loads(report.read_text()) if report.is_file() else {"returncode": process.returncode, "ru_maxrss": 0}
    return ChildRun(usage["returncode"], seconds, rss_mib(usage["ru_maxrss"]), sampler.peak if sampler else None)
