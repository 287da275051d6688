"""Facts about the machine a benchmark ran on, and the datasheet peaks of known GPUs."""

from __future__ import annotations

import datetime as dt
import logging
import os
import platform
import re
import shutil
import subprocess
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from batch.core.devices import cpu_count, parse_device

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
    found: dict[str, str | None] = {}
    for label, names in PACKAGES.items():
        found[label] = None
        for name in names:
            try:
                found[label] = f"{version(name)} ({name})" if len(names) > 1 else version(name)
                break
            except PackageNotFoundError:
                continue
    return found


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


def cpu_facts() -> dict[str, object]:
    model = None
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        match = re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(errors="replace"), re.MULTILINE)
        model = match[1].strip() if match else None
    usable = cpu_count()
    load = os.getloadavg() if hasattr(os, "getloadavg") else None
    memory = None
    meminfo = Path("/proc/meminfo")
    if meminfo.is_file():
        match = re.search(r"^MemTotal:\s*(\d+) kB", meminfo.read_text(), re.MULTILINE)
        memory = round(int(match[1]) / 2**20, 1) if match else None
    return {
        "model": model or platform.processor() or None,
        "logical_cores": os.cpu_count(),
        "usable_cores": usable,
        "memory_gib": memory,
        "load_average_1min": round(load[0], 2) if load else None,
    }


def gpu_facts() -> list[dict[str, object]]:
    """One entry per NVIDIA GPU that ``nvidia-smi`` lists; empty without a GPU or driver."""
    out = run_quietly(["nvidia-smi", "--query-gpu=index,name,driver_version,memory.total", "--format=csv,noheader,nounits"])
    if not out:
        return []
    cuda = None
    header = run_quietly(["nvidia-smi"])
    if header:
        match = re.search(r"CUDA Version:\s*([\d.]+)", header)
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


def onnxruntime_providers() -> list[str] | None:
    try:
        import onnxruntime
    except ImportError:
        return None
    return onnxruntime.get_available_providers()


def machine_facts() -> dict[str, object]:
    """Everything results.json records about where it ran."""
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu": cpu_facts(),
        "gpus": gpu_facts(),
        "packages": package_versions(),
        "onnxruntime_providers": onnxruntime_providers(),
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
