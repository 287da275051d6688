"""Which runtime runs a model: ONNX Runtime or OpenVINO on the CPU, by flag or by a measurement made once.

- A GPU (``--device cuda``, or ``auto`` where ONNX Runtime's CUDA provider starts) runs ONNX Runtime's
  CUDA provider. OpenVINO runs on the CPU only here: ``--runtime openvino`` with ``--device cuda`` is a
  :class:`~batch.core.devices.DeviceError`, with ``--device auto`` it takes the CPU (a log line says so).
- ``--runtime onnxruntime`` or ``openvino``: that runtime (not installed: :class:`~batch.core.extras.MissingExtra`).
- ``--runtime auto`` on the CPU: the faster of the two on this CPU for this model file. Which one is
  faster depends on both (OpenVINO is 1.5-2x faster on CPUs with AVX-512 VNNI, BF16 or AMX, and on an
  AVX2-only CPU it may not be), so it is measured: the first run times both on the model (a few
  batches of noise, interleaved; what an image costs the CPU, :func:`measure_rates`), and the winner is cached in
  ``$XDG_CACHE_HOME/carvana-unet/runtimes.json`` (``~/.cache`` by default) under a key made of the
  model's SHA-256, the CPU (its name and flags), the thread count and both runtimes' versions. Later
  runs, and the other Ray actors of the machine, open only the winner. OpenVINO must beat ONNX
  Runtime by :data:`MARGIN` to be taken: a tie stays with ONNX Runtime. Measurements are serialized by
  a lock file, so that the actors of one machine do not time each other.

Precision: OpenVINO runs at ``f32`` (the numbers of FP32 to ~1e-5, for an INT8 file its own integer
kernels). ``bf16``, which changes the numbers, is a candidate only on a CPU that has bf16 instructions
and for a model whose bf16 masks were verified on this CPU (:func:`record_verification`, written by
``unet-export --verify --runtime openvino``) to stay within Dice 0.999 of FP32.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import hashlib
import json
import logging
import os
import platform
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from batch.core.contract import ModelContract, prepare_input
from batch.core.devices import Device, DeviceError, cpu_count
from batch.core.files import file_sha256, write_atomic
from batch.inference import openvino_runtime
from batch.inference.config import runtime_device_conflict
from batch.inference.runtime import (
    AS_EXPORTED,
    CUDA_OPTIONS,
    ModelError,
    OnnxRuntimeNetwork,
    onnxruntime,
    open_cpu_network,
    open_gpu_session,
    providers_for,
    session_options,
)

log = logging.getLogger(__name__)

GPU_REASON = "a GPU runs ONNX Runtime's CUDA provider"
MARGIN = 1.05  # OpenVINO is taken by auto only when at least this much faster than ONNX Runtime
MEASURE_BATCH = 2  # images per timed run: enough to amortize a call, little enough for a large model
MEASURE_ROUNDS = 5  # timed runs of each runtime, interleaved; each runtime's cheapest counts
MEASURE = "cpu-seconds per image of one stream, cheapest of the rounds"  # how rates are measured: part of the cache key
MIN_BF16_DICE = 0.999  # bf16 masks must stay this close to FP32's on the verification photos
CACHE_NAME = "runtimes.json"
NOTABLE_FLAGS = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "avx512_fp16", "amx_bf16", "amx_int8", "avx_vnni")


@dataclass(frozen=True)
class RuntimeRequest:
    """What the caller asked for: the runtime (``auto``, ``onnxruntime``, ``openvino``) and its threads."""

    runtime: str = "auto"
    threads: int | None = None  # None: this process's cores
    verbose: bool = False  # ONNX Runtime's warnings in the log
    streams: int | None = None  # CPU batches at once, the threads split among them; None: the runtime's choice


@dataclass(frozen=True)
class RuntimeChoice:
    """Which runtime runs the model and why: the run's log line and report.json's ``runtime``."""

    runtime: str  # onnxruntime | openvino
    precision: str  # AS_EXPORTED for ONNX Runtime; OpenVINO's inference precision, f32 or bf16
    chosen_by: str  # flag | device | measurement | cached measurement | installation
    reason: str  # one line: why this runtime
    rates: dict[str, float] = field(default_factory=dict)  # images per CPU-second of each candidate, when measured

    def describe(self, version: str) -> dict:
        """report.json's ``runtime``: the runtime's name and ``version``, and this choice."""
        return {"name": self.runtime, "version": version} | {k: v for k, v in asdict(self).items() if k != "runtime"}


@dataclass(frozen=True)
class Candidate:
    runtime: str
    precision: str

    @property
    def label(self) -> str:
        return self.runtime if self.runtime == "onnxruntime" else f"openvino {self.precision}"


ONNXRUNTIME = Candidate("onnxruntime", AS_EXPORTED)
OPENVINO_F32 = Candidate("openvino", "f32")
OPENVINO_BF16 = Candidate("openvino", "bf16")


# ---------------------------------------------------------------------------------------------
# Opening the network a request asks for.


def open_network(path: Path, contract: ModelContract, device: Device, request: RuntimeRequest):
    """The network (:class:`OnnxRuntimeNetwork` or :class:`~batch.inference.openvino_runtime.OpenVinoNetwork`) that
    ``request`` gives for ``path`` on ``device``, and the :class:`RuntimeChoice` saying why; the choice is logged."""
    conflict = runtime_device_conflict(request.runtime, str(device))
    if conflict:
        raise DeviceError(conflict)
    network, choice = pick_network(path, contract, device, request)
    version = network.describe()["version"]
    log.info("runtime %s %s (%s), chosen by %s: %s", choice.runtime, version, choice.precision, choice.chosen_by, choice.reason)
    return network, choice


def pick_network(path: Path, contract: ModelContract, device: Device, request: RuntimeRequest):
    if request.runtime == "openvino":
        if device.kind == "auto":
            log.info("device auto: --runtime openvino runs on the CPU")
        return open_candidate(OPENVINO_F32, path, contract, request), by_flag(OPENVINO_F32)
    if device.kind != "cpu":  # auto or cuda: the GPU first (open_gpu_session says why not, or raises for an explicit cuda)
        session = open_gpu_session(path, device, ort_options(request), providers_for(device, CUDA_OPTIONS))
        if session is not None:
            return OnnxRuntimeNetwork(session), RuntimeChoice("onnxruntime", AS_EXPORTED, "device", GPU_REASON)
    if request.runtime == "auto":
        return choose_on_cpu(path, contract, request)
    return open_candidate(ONNXRUNTIME, path, contract, request), by_flag(ONNXRUNTIME)


def by_flag(candidate: Candidate) -> RuntimeChoice:
    return RuntimeChoice(candidate.runtime, candidate.precision, "flag", f"--runtime {candidate.runtime}")


def ort_options(request: RuntimeRequest):
    return session_options(request.threads, request.verbose)


def open_candidate(candidate: Candidate, path: Path, contract: ModelContract, request: RuntimeRequest):
    if candidate.runtime == "onnxruntime":
        return open_cpu_network(path, request.threads, request.verbose, request.streams)
    return openvino_runtime.OpenVinoNetwork(path, contract, request.threads, candidate.precision, request.streams)


def choose_on_cpu(path: Path, contract: ModelContract, request: RuntimeRequest):
    """``auto`` on the CPU: the cached winner for this model and machine, else both measured now (and cached)."""
    if not openvino_runtime.installed():
        network = open_candidate(ONNXRUNTIME, path, contract, request)
        reason = "auto, and OpenVINO is not installed (pip install '.[cpu]' adds it)"
        return network, RuntimeChoice("onnxruntime", AS_EXPORTED, "installation", reason)
    cache = ChoiceCache(cache_folder())
    sha256 = file_sha256(path)
    candidates = [ONNXRUNTIME, *openvino_candidates(sha256)]
    key = machine_key(sha256, request, candidates)
    with cache.locked():
        entry = cache.choice(key)
        if entry is None:
            return measure_and_choose(Trial(path, contract, request, candidates), cache, key)
    winner, rates = Candidate(entry["runtime"], entry["precision"]), entry["rates"]
    network = open_candidate(winner, path, contract, request)
    reason = f"{compare_rates(winner, rates)} (auto; cached in {cache.path})"
    return network, RuntimeChoice(winner.runtime, winner.precision, "cached measurement", reason, rates)


@dataclass(frozen=True)
class Trial:
    """What is measured: a model, as the request opens it, under each candidate runtime."""

    path: Path
    contract: ModelContract
    request: RuntimeRequest
    candidates: list[Candidate]


def measure_and_choose(trial: Trial, cache: ChoiceCache, key: str):
    """Time every candidate on the model; the winner stays open (the others are dropped) and is cached.

    A candidate OpenVINO cannot compile is left out, with a warning: ``auto`` asked for the faster runtime
    that works, and ONNX Runtime (the reference, opened first) does."""
    log.info("runtime auto: timing ONNX Runtime and OpenVINO on %s (once for this model on this machine)", trial.path.name)
    networks = {ONNXRUNTIME: open_candidate(ONNXRUNTIME, trial.path, trial.contract, trial.request)}
    for candidate in trial.candidates[1:]:
        try:
            networks[candidate] = open_candidate(candidate, trial.path, trial.contract, trial.request)
        except ModelError as e:
            log.warning("runtime auto: leaving %s out: %s", candidate.label, e)
    rates = measure_rates({c.label: n for c, n in networks.items()}, probe_input(trial.contract))
    winner = pick_winner(list(networks), rates)
    cache.store_choice(key, {"runtime": winner.runtime, "precision": winner.precision, "rates": rates, "model": trial.path.name})
    reason = f"{compare_rates(winner, rates)} (auto; cached in {cache.path})"
    return networks[winner], RuntimeChoice(winner.runtime, winner.precision, "measurement", reason, rates)


def openvino_candidates(sha256: str) -> list[Candidate]:
    """OpenVINO at f32, and at bf16 where this CPU has bf16 and the model's bf16 masks were verified here."""
    candidates = [OPENVINO_F32]
    if openvino_runtime.computes_bf16() and bf16_verified(sha256):
        candidates.append(OPENVINO_BF16)
    return candidates


def pick_winner(candidates: list[Candidate], rates: dict[str, float]) -> Candidate:
    """The fastest candidate; OpenVINO only when :data:`MARGIN` faster than ONNX Runtime."""
    best = max(candidates, key=lambda c: rates[c.label])
    if best != ONNXRUNTIME and rates[best.label] < MARGIN * rates[ONNXRUNTIME.label]:
        return ONNXRUNTIME
    return best


def compare_rates(winner: Candidate, rates: dict[str, float]) -> str:
    others = ", ".join(f"{label} {rate:.1f}" for label, rate in rates.items() if label != winner.label)
    said = f"{rates[winner.label]:.1f} images per CPU-second on this CPU against {others}"
    if any(rate > rates[winner.label] for rate in rates.values()):
        said += f" (OpenVINO is taken when {MARGIN - 1:.0%} faster)"
    return said


# ---------------------------------------------------------------------------------------------
# The measurement.


def probe_input(contract: ModelContract, batch: int = MEASURE_BATCH) -> np.ndarray:
    """A batch of noise at the model's input size, as the model takes it (the work does not depend on the pixels)."""
    height, width = contract.input_size
    pixels = np.random.default_rng(0).integers(0, 256, (batch, height, width, 3), dtype=np.uint8)
    return prepare_input(pixels, contract)


def measure_rates(networks: dict, x: np.ndarray, rounds: int = MEASURE_ROUNDS) -> dict[str, float]:
    """Images per CPU-second of each network on ``x`` (the CPU time of all this process's threads): one warm-up
    run each, then ``rounds`` runs each, interleaved; each network's cheapest run counts.

    CPU time, not wall time: on a machine busy with other work (a training job, another run) wall time
    stretches unevenly (a runtime whose threads work in lockstep loses more when one core is taken), and a
    choice made then would be cached for good. What an image costs the CPU stays each runtime's own: on this
    project's 2-core VM, 14-15 images per CPU-second for OpenVINO against 9-11 for ONNX Runtime on the
    bundled INT8 file, busy or idle, where wall-time rates came out even (15-17 img/s each) while a training
    job ran and 23.5 against 16.3 when idle. Both runtimes run the same number of threads, and in a run the
    network shares the cores with decoding and writing, so the cheaper one is the faster one there too.
    """
    for network in networks.values():
        network.run(x)
    seconds: dict[str, list[float]] = {label: [] for label in networks}
    for _ in range(rounds):
        for label, network in networks.items():
            start = time.process_time()
            network.run(x)
            seconds[label].append(time.process_time() - start)
    return {label: round(len(x) / max(min(times), 1e-6), 2) for label, times in seconds.items()}


# ---------------------------------------------------------------------------------------------
# The machine and the cache.


@dataclass(frozen=True)
class CpuSignature:
    """The CPU as the runtimes see it: its name and the instruction-set flags the kernels depend on."""

    name: str
    flags: tuple[str, ...]

    @property
    def notable(self) -> tuple[str, ...]:
        """The flags that decide which kernels run (AVX2, AVX-512 VNNI/BF16, AMX)."""
        return tuple(flag for flag in NOTABLE_FLAGS if flag in self.flags)


@functools.cache
def cpu_signature() -> CpuSignature:
    """This CPU's model name and flags (``/proc/cpuinfo`` on Linux; the platform's name elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return CpuSignature(platform.processor() or platform.machine(), ())
    fields = {}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        fields.setdefault(key.strip(), value.strip())
    return CpuSignature(fields.get("model name", platform.machine()), tuple(sorted(fields.get("flags", "").split())))


def machine_key(sha256: str, request: RuntimeRequest, candidates: list[Candidate]) -> str:
    """What a measurement holds for: this model file, this CPU, this many threads, these runtime versions, these
    candidates (a bf16 verified since is measured anew)."""
    cpu = cpu_signature()
    parts = {
        "candidates": [c.label for c in candidates],
        "model_sha256": sha256,
        "cpu": cpu.name,
        "flags": " ".join(cpu.flags),
        "threads": request.threads or cpu_count(),
        "streams": request.streams,
        "onnxruntime": onnxruntime().__version__,
        "openvino": openvino_runtime.version(),
        "measure": MEASURE,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def verification_key(sha256: str, precision: str) -> str:
    """A model's masks at ``precision`` verified on this CPU (bf16 kernels differ between instruction sets)."""
    cpu = cpu_signature()
    parts = {"model_sha256": sha256, "cpu": cpu.name, "flags": " ".join(cpu.flags), "precision": precision}
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()


def cache_folder() -> Path:
    """``$XDG_CACHE_HOME/carvana-unet``, ``~/.cache/carvana-unet`` without it."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carvana-unet"


class ChoiceCache:
    """``runtimes.json``: measured choices and verified precisions, keyed as above. One that cannot be read is
    measured again; one that cannot be written is reported in the log and the run goes on."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.path = folder / CACHE_NAME

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """One process of this machine at a time measures and writes (the others wait, then read its result)."""
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            handle = open(self.folder / "runtimes.lock", "a")  # noqa: SIM115 (held for the block)
        except OSError as e:
            log.warning("cannot use the runtime cache %s (%s): measuring without it", self.folder, e.strerror or e)
            yield
            return
        with handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def read(self) -> dict:
        try:
            content = json.loads(self.path.read_text())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            log.warning("ignoring the runtime cache %s (%s); measuring again", self.path, e)
            return {}
        return content if isinstance(content, dict) else {}

    def choice(self, key: str) -> dict | None:
        entry = self.read().get("choices", {}).get(key)
        valid = isinstance(entry, dict) and {"runtime", "precision", "rates"} <= entry.keys()
        if not valid or Candidate(entry["runtime"], entry["precision"]) not in (ONNXRUNTIME, OPENVINO_F32, OPENVINO_BF16):
            return None
        return entry

    def verified(self, key: str) -> dict | None:
        entry = self.read().get("verified", {}).get(key)
        return entry if isinstance(entry, dict) else None

    def store_choice(self, key: str, entry: dict) -> None:
        self.store("choices", key, entry)

    def store(self, section: str, key: str, entry: dict) -> None:
        content = self.read()
        content.setdefault(section, {})[key] = entry | {"recorded": time.strftime("%Y-%m-%dT%H:%M:%S")}
        try:
            self.folder.mkdir(parents=True, exist_ok=True)
            write_atomic(self.path, json.dumps(content, indent=1, sort_keys=True).encode())
        except OSError as e:
            log.warning("cannot write the runtime cache %s (%s): the next run measures again", self.path, e.strerror or e)


def bf16_verified(sha256: str) -> bool:
    """Whether the bf16 masks of the model file with ``sha256`` were verified on this CPU to stay within
    :data:`MIN_BF16_DICE` of FP32's."""
    entry = ChoiceCache(cache_folder()).verified(verification_key(sha256, "bf16"))
    return bool(entry) and entry.get("passed") is True and float(entry.get("min_dice", 0)) >= MIN_BF16_DICE


def record_verification(path: Path, precision: str, min_dice: float, photos: int) -> bool:
    """Record that ``path`` at OpenVINO's ``precision`` gave masks within ``min_dice`` of FP32 on ``photos`` photos
    (``unet-export --verify --runtime openvino``); True when that passes :data:`MIN_BF16_DICE`."""
    cache = ChoiceCache(cache_folder())
    passed = photos > 0 and min_dice >= MIN_BF16_DICE
    entry = {"model": path.name, "precision": precision, "min_dice": min_dice, "photos": photos, "passed": passed}
    with cache.locked():
        cache.store("verified", verification_key(file_sha256(path), precision), entry)
    return passed
