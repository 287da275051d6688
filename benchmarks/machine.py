"""Where a benchmark runs: the machine's facts, the device it measures, and the memory the work holds.

results.json records the facts (CPU, GPUs, package versions, git revision, load) so that two runs
are compared knowingly. Memory is peak host RSS (stdlib ``resource``) and GPU memory (``nvidia-smi``).
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import logging
import os
import platform
import re
import resource
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from batch.core.devices import Device, cpu_count, parse_device
from batch.inference.runtime_choice import cpu_signature
from benchmarks.config import BenchError

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]

# Dense (no sparsity) tensor-core peaks in TFLOP/s from NVIDIA's datasheets: FP16 with FP32
# accumulate, and TF32, which ONNX Runtime's CUDA provider uses for FP32 convolutions by default
# (provider option use_tf32=1). Longest name first, so "H100 PCIe" is matched before "H100".
GPU_PEAK_TFLOPS: dict[str, dict[str, float]] = {
    "H200": {"fp16": 989.4, "fp32": 494.7},
    "H100 PCIe": {"fp16": 756.0, "fp32": 378.0},
    "H100": {"fp16": 989.4, "fp32": 494.7},  # SXM
    "A100": {"fp16": 312.0, "fp32": 156.0},
    "L40S": {"fp16": 362.1, "fp32": 183.0},
    "L4": {"fp16": 121.0, "fp32": 60.0},
    "A10": {"fp16": 125.0, "fp32": 62.5},
}

# Versions worth recording, by distribution name (the first installed one of each group is kept).
PACKAGES = {
    "onnxruntime": ("onnxruntime-gpu", "onnxruntime"),
    "openvino": ("openvino",),
    "nvidia-dali": ("nvidia-dali-cuda130", "nvidia-dali-cuda120", "nvidia-dali-cuda110"),
    "torch": ("torch",),
    "onnx": ("onnx",),
    "numpy": ("numpy",),
    "pillow": ("pillow",),
    "carvana-unet": ("carvana-unet",),
}


def peak_tflops(gpu_name: str | None, precision: str) -> float | None:
    """Datasheet dense tensor peak of ``gpu_name`` at ``precision`` ("fp16" or "fp32"), or None if unknown."""
    if not gpu_name:
        return None
    for key in sorted(GPU_PEAK_TFLOPS, key=len, reverse=True):
        if key.lower() in gpu_name.lower():
            return GPU_PEAK_TFLOPS[key].get(precision)
    return None


def package_versions() -> dict[str, str | None]:
    return {label: installed_version(names) for label, names in PACKAGES.items()}


def installed_version(names: tuple[str, ...]) -> str | None:
    """The version of the first of ``names`` installed, naming it when there are alternatives."""
    for name in names:
        try:
            return f"{version(name)} ({name})" if len(names) > 1 else version(name)
        except PackageNotFoundError:
            continue
    return None


def run_quietly(command: list[str], timeout: float = 20) -> str | None:
    """stdout of ``command``, or None when it is missing or fails (the caller records the absence)."""
    if shutil.which(command[0]) is None:
        return None
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        log.debug("%s failed: %s", command[0], e)
        return None
    return done.stdout if done.returncode == 0 else None


def git_revision() -> dict[str, str | bool | None]:
    """The package's git commit and whether the working tree has uncommitted changes."""
    commit = run_quietly(["git", "-C", str(REPO), "rev-parse", "HEAD"])
    status = run_quietly(["git", "-C", str(REPO), "status", "--porcelain", "--untracked-files=no"])
    return {
        "commit": commit.strip() if commit else None,  # None: not a git checkout, or no commit yet
        "dirty": bool(status.strip()) if status is not None else None,
    }


def search_file(path: str, pattern: str) -> str | None:
    """The first group of ``pattern`` in the text file ``path`` (a /proc file), or None where there is none."""
    text = Path(path).read_text(errors="replace") if Path(path).is_file() else ""
    match = re.search(pattern, text, re.MULTILINE)
    return match[1].strip() if match else None


def cpu_facts() -> dict[str, object]:
    memory_kib = search_file("/proc/meminfo", r"^MemTotal:\s*(\d+) kB")
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    cpu = cpu_signature()
    return {
        "model": cpu.name or None,
        "flags": list(cpu.notable),  # the instruction sets the runtimes' kernels choose by (AVX2, VNNI, BF16, AMX)
        "logical_cores": os.cpu_count(),
        "usable_cores": cpu_count(),
        "memory_gib": round(int(memory_kib) / 2**20, 1) if memory_kib else None,
        "load_average_1min": round(load[0], 2) if load else None,
    }


def gpu_facts() -> list[dict[str, object]]:
    """One entry per NVIDIA GPU that ``nvidia-smi`` lists; empty without a GPU or driver."""
    out = run_quietly(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if not out:
        return []
    match = re.search(r"CUDA Version:\s*([\d.]+)", run_quietly(["nvidia-smi"]) or "")
    cuda = match[1] if match else None
    gpus = []
    for line in out.strip().splitlines():
        parts = [part.strip() for part in line.split(",")]
        if len(parts) != 4 or not parts[0].isdigit():
            log.debug("unexpected nvidia-smi line %r", line)
            continue
        index, name, driver, memory = parts
        gpus.append(
            {"index": int(index), "name": name, "driver": driver, "cuda_driver_api": cuda, "memory_mib": number_or_none(memory)}
        )
    return gpus


def number_or_none(text: str) -> float | None:
    """nvidia-smi prints "[N/A]" or "[Not Supported]" where a value is unknown (MIG, some drivers)."""
    try:
        return float(text)
    except ValueError:
        return None


def machine_facts() -> dict[str, object]:
    """Everything results.json records about where it ran."""
    try:
        import onnxruntime
    except ImportError:
        onnxruntime = None
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "gpus": gpu_facts(),
        "packages": package_versions(),
        "onnxruntime_providers": onnxruntime.get_available_providers() if onnxruntime else None,
        "git": git_revision(),
    }


def machine_slug(facts: dict, device: str) -> str:
    """A file-name-safe name of the benchmarked hardware, e.g. ``nvidia-h200`` or ``cpu-amd-epyc-2-cores``."""
    gpus = facts.get("gpus") or []
    parsed = parse_device(device)
    if parsed.is_cuda and gpus:
        name = next((g["name"] for g in gpus if g["index"] == parsed.index), gpus[0]["name"])
    else:
        cpu = facts.get("cpu") or {}
        name = f"cpu {cpu.get('model') or 'unknown'} {cpu.get('usable_cores')} cores"
    slug = re.sub(r"[^a-z0-9]+", "-", name.lower().replace("(r)", "").replace("(tm)", "")).strip("-")
    return slug or "unknown-machine"


# ---- the device measured ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Hardware:
    """The device a run measures, resolved from ``--device``: the CPU, or one GPU by index and name."""

    device: Device  # cpu or cuda:N, never auto
    gpu_name: str | None = None  # as nvidia-smi names it: the key to its datasheet peak
    threads: int = 1  # CPU threads for decoding and file I/O

    @property
    def kind(self) -> str:
        return self.device.kind

    @property
    def device_id(self) -> int | None:
        return self.device.index if self.device.is_cuda else None


def resolve_hardware(requested: str, facts: dict) -> Hardware:
    """``auto`` -> ``cuda:0`` when ONNX Runtime has CUDA and a GPU is present, else ``cpu``; check ``cuda[:N]``.

    A GPU that was asked for and cannot be used is an error, never a silent CPU run.
    """
    from batch.inference.runtime import CUDA_PROVIDER, check_device, provider_missing

    gpus, threads = facts["gpus"], facts["cpu"]["usable_cores"] or 1
    device = parse_device(requested)
    if device.kind == "auto":
        device = parse_device("cuda:0" if gpus and provider_missing(CUDA_PROVIDER) is None else "cpu")
        log.info("--device auto: benchmarking %s", device)
    elif device.is_cuda:
        check_device(device)
        if device.index not in {g["index"] for g in gpus}:
            raise BenchError(
                f"--device {device}: nvidia-smi lists GPUs {[g['index'] for g in gpus] or 'none'}; "
                "check the driver or choose another index"
            )
    gpu_name = next((g["name"] for g in gpus if g["index"] == device.index), None) if device.is_cuda else None
    return Hardware(device, gpu_name, threads)


# ---- memory -----------------------------------------------------------------------------------------

# Runs COMMAND (argv[2:]) and writes its exit status and its own peak RSS to the file argv[1]. Linux
# hands a process's high-water RSS at exec to the program it becomes, so a command started straight
# from the benchmark (hundreds of MiB: models, torch) would report at least that much; started from
# this small interpreter, its ru_maxrss is its own (or the launcher's ~10 MiB, whichever is larger).
LAUNCHER = """
import json, resource, subprocess, sys
code = subprocess.run(sys.argv[2:], check=False).returncode
usage = resource.getrusage(resource.RUSAGE_CHILDREN)
open(sys.argv[1], "w").write(json.dumps({"returncode": code, "ru_maxrss": usage.ru_maxrss}))
sys.exit(code)
"""


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
        mib = number_or_none(parts[1]) if len(parts) == 2 else None
        if mib is not None and parts[0].isdigit() and is_ours(int(parts[0])):
            ours.append(mib)
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
        self.peak = GpuMemoryReading(None, "not sampled")
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

    The command runs under :data:`LAUNCHER` in a new session, so its RSS is its own and, past
    ``timeout_s``, the whole process group is killed (a timeout is exit code -9).
    """
    with tempfile.TemporaryDirectory(prefix="unet-bench-launch-") as folder:
        report = Path(folder) / "rusage.json"
        start = time.perf_counter()
        launcher = [sys.executable, "-c", LAUNCHER, str(report), *command]
        process = subprocess.Popen(launcher, stdout=stdout, stderr=stderr, start_new_session=True)
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
