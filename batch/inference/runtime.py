"""ONNX Runtime sessions on an explicit device: the one place that builds execution-provider lists.

:class:`OnnxRuntimeNetwork` is a session as the runner runs it, the peer of OpenVINO's
(:mod:`batch.inference.openvino_runtime`); :mod:`batch.inference.runtime_choice` says which of the two runs a model.

- ``cpu``: the CPU provider.
- ``cuda[:N]``: the CUDA provider on GPU N (TensorRT first, when asked for). One that cannot be
  honoured (no such provider in this onnxruntime, no GPU, missing CUDA libraries, a session that
  falls back to the CPU) is a :class:`~batch.core.devices.DeviceError`, never a silent CPU run.
- ``auto``: the GPU when it works, else the CPU, with a log line saying which it took and why.

Before a CUDA session, :func:`preload_cuda_libraries` loads the CUDA and cuDNN libraries the CUDA
provider needs from wherever NVIDIA's wheels are on ``sys.path`` (see there why ONNX Runtime's own
``preload_dlls`` is not enough). The CUDA provider's options are :data:`CUDA_OPTIONS`.

onnxruntime is imported inside the functions, so this module imports without the ``cpu`` extra.
"""

from __future__ import annotations

import ctypes
import io
import logging
import queue
import sys
from collections.abc import Iterable, Iterator
from contextlib import contextmanager, redirect_stdout
from pathlib import Path
from typing import TYPE_CHECKING, Generic, TypeVar

from batch.core.devices import CPU, Device, DeviceError, cpu_count, parse_device
from batch.core.errors import CarvanaError
from batch.core.extras import require

if TYPE_CHECKING:
    import numpy as np
    import onnxruntime as ort

log = logging.getLogger(__name__)

CPU_PROVIDER = "CPUExecutionProvider"
CUDA_PROVIDER = "CUDAExecutionProvider"
TENSORRT_PROVIDER = "TensorrtExecutionProvider"
PROVIDER_LABELS = {CUDA_PROVIDER: "CUDA", TENSORRT_PROVIDER: "TensorRT"}
PROVIDER_FIXES = {
    CUDA_PROVIDER: "install onnxruntime-gpu (pip install '.[gpu]')",
    TENSORRT_PROVIDER: "install TensorRT and an onnxruntime-gpu build with its provider",
}

# The CUDA provider's options for the runner's sessions. cuDNN's heuristics pick each convolution's
# algorithm (ONNX Runtime's default, EXHAUSTIVE, times every algorithm on the first run of each new input
# shape: seconds at start-up, and again mid-run for every batch of another size). The runner's GPU session
# sees one shape only (BoundPredictor pads partial batches) and is warmed up before the clock starts,
# but the model is not the bound stage of a GPU run (decoding and writing are), so a search that might
# gain a few percent of inference time is not worth its start-up cost, which a single-photo
# Segmenter call would pay in full. unet-bench measures the model alone and searches (EXHAUSTIVE).
CUDA_OPTIONS = {"cudnn_conv_algo_search": "HEURISTIC"}

ModelSource = str | Path | bytes  # an .onnx file, or a serialized model
MAX_CPU_STREAMS = 4  # batches ONNX Runtime runs at once on the CPU (cpu_streams)
Member = TypeVar("Member")
AS_EXPORTED = "as exported"  # ONNX Runtime computes in the file's own precision (FP32, FP16 or INT8)


class ModelError(CarvanaError):
    """A model file that cannot be used; the message names the file and the fix."""


def onnxruntime():
    """The onnxruntime module; :class:`~batch.core.extras.MissingExtra` naming the extra when it is not installed."""
    return require("onnxruntime", "cpu", what="ONNX Runtime inference")


def session_options(threads: int | None = None, verbose: bool = False) -> ort.SessionOptions:
    """All graph optimizations, ``threads`` intra-op threads (default: this process's cores), no spinning."""
    ort = onnxruntime()
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads or cpu_count()
    options.inter_op_num_threads = 1
    # Idle ORT threads would otherwise spin on the cores that decoding and writing need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 2 if verbose else 3  # warnings with -v (why CUDA did not start), else errors
    return options


def provider_missing(provider: str) -> str | None:
    """Why this onnxruntime cannot run ``provider`` (not in its build), or None when it has it."""
    ort = onnxruntime()
    if provider in ort.get_available_providers():
        return None
    return f"this onnxruntime ({ort.__version__}) has no {PROVIDER_LABELS[provider]} provider; {PROVIDER_FIXES[provider]}"


def unusable(device: Device, reason: str) -> DeviceError:
    return DeviceError(f"--device cuda:{device.index} cannot be used: {reason}. Use --device cpu to run on the CPU.")


def check_device(device: Device | str) -> Device:
    """``device`` parsed, and refused at once when it is an explicit ``cuda`` this onnxruntime has no provider for.

    For a command that does costly work before it opens its session; :func:`open_session` checks the rest.
    """
    device = parse_device(device)
    reason = provider_missing(CUDA_PROVIDER) if device.is_cuda else None
    if reason:
        raise unusable(device, reason)
    return device


def device_for_precision(device: Device | str, precision: str, model: str | Path) -> Device:
    """Where a model of ``precision`` runs: INT8 (QDQ) ones on the CPU only, the rest wherever ``device`` says.

    ONNX Runtime fuses QDQ graphs into integer kernels on its CPU provider only; its CUDA provider would run
    every layer in float between quantize/dequantize steps. So ``cuda`` with an INT8 model is a
    :class:`~batch.core.devices.DeviceError`, and ``auto`` takes the CPU (with a log line).
    """
    device = parse_device(device)
    if precision != "int8" or device.kind == "cpu":
        return device
    reason = f"{model} is an INT8 model, which ONNX Runtime runs with integer kernels on the CPU only"
    if device.is_cuda:
        raise unusable(device, f"{reason} (on a GPU, use the FP16 or FP32 export of the same checkpoint)")
    log.info("device auto: %s", reason)
    return CPU


def providers_for(device: Device, cuda_options: dict | None = None, tensorrt_options: dict | None = None) -> list:
    """The providers list for ``device`` (``auto`` lists the GPU's): TensorRT when options are given, CUDA, the CPU."""
    if device.kind == "cpu":
        return [CPU_PROVIDER]
    gpu = [(CUDA_PROVIDER, {"device_id": device.index, **(cuda_options or {})})]
    if tensorrt_options is not None:
        gpu.insert(0, (TENSORRT_PROVIDER, {"device_id": device.index, **tensorrt_options}))
    return [*gpu, CPU_PROVIDER]


def open_session(
    model: ModelSource,
    device: Device | str = "auto",
    options: ort.SessionOptions | None = None,
    *,
    cuda_options: dict | None = None,
    tensorrt_options: dict | None = None,
) -> ort.InferenceSession:
    """An InferenceSession for ``model`` on ``device``; :class:`ModelError` / :class:`DeviceError` on failure.

    ``cuda_options`` / ``tensorrt_options``: extra provider options (TensorRT is used only when given).
    """
    device = parse_device(device)
    options = options or session_options()
    if device.kind != "cpu":
        session = open_gpu_session(model, device, options, providers_for(device, cuda_options, tensorrt_options))
        if session is not None:
            return session
    return create_session(model, options, [CPU_PROVIDER])


def model_name(model: ModelSource) -> str:
    return "the in-memory model" if isinstance(model, bytes) else str(model)


def new_session(model: ModelSource, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    source = model if isinstance(model, bytes) else str(model)
    return onnxruntime().InferenceSession(source, sess_options=options, providers=providers)


def create_session(model: ModelSource, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return new_session(model, options, providers)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        raise ModelError(
            f"{model_name(model)}: ONNX Runtime cannot load this model ({e}); re-export it with `unet-export to-onnx`"
        ) from e


def open_gpu_session(
    model: ModelSource, device: Device, options: ort.SessionOptions, providers: list
) -> ort.InferenceSession | None:
    """A session whose first provider is ``providers[0]``; None (with a log line saying why) when ``auto`` cannot have one."""
    wanted = providers[0][0]
    label = PROVIDER_LABELS[wanted]
    explicit = device.kind == "cuda"

    def unavailable(reason: str) -> None:
        if explicit:
            raise unusable(device, reason)
        log.info("device auto: running on the CPU (%s)", reason)

    missing = provider_missing(wanted)
    if missing:
        return unavailable(missing)
    not_found = preload_cuda_libraries(sys.path)
    try:
        session = new_session(model, options, providers)
    except Exception as e:
        if not explicit:
            log.info("device auto: the %s provider failed (%s); running on the CPU", label, e)
            return None
        raise unusable(device, f"ONNX Runtime failed to open the model there ({e})") from e
    if session.get_providers()[0] != wanted:
        return unavailable(f"ONNX Runtime could not start its {label} provider ({why_cuda_failed(not_found)}; -v shows its log)")
    log.info("running on GPU %d with ONNX Runtime's %s provider", device.index, label)
    return session


def cpu_streams(threads: int, streams: int | None = None) -> tuple[int, int]:
    """(streams, threads each): how ONNX Runtime spends ``threads`` CPU threads: ``streams`` batches at once (at most
    one a thread), or by default up to :data:`MAX_CPU_STREAMS`, the threads split evenly among them.

    A convolution split over threads waits for its slowest thread at every layer, and in a run the
    decode and writer threads take turns on the same cores; batches run side by side, one thread each,
    never wait for each other. On the project's 2-core VM the bundled INT8 file runs at 19.6-20.6
    images/s as two single-thread streams against 15.2-17.2 as one 2-thread stream (inference alone).
    OpenVINO picks its own streams (``PERFORMANCE_HINT`` THROUGHPUT: two of one thread there).
    """
    streams = max(1, min(threads, streams or MAX_CPU_STREAMS))
    return streams, max(1, threads // streams)


class Lanes(Generic[Member]):
    """Members (sessions, infer requests) lent to one caller at a time: ``with lanes.take() as member``; a caller
    waits while all are out."""

    def __init__(self, members: Iterable[Member]):
        self.free: queue.SimpleQueue[Member] = queue.SimpleQueue()
        for member in members:
            self.free.put(member)

    @contextmanager
    def take(self) -> Iterator[Member]:
        member = self.free.get()
        try:
            yield member
        finally:
            self.free.put(member)


class OnnxRuntimeNetwork:
    """ONNX Runtime sessions as the runner runs them: a batch of the model's input -> its (N, 1, h, w) scores, up to
    ``streams`` batches at once from as many threads.

    ``sessions``: one, which the streams share (ONNX Runtime's ``run`` is thread-safe, and a session of one
    intra-op thread computes in its caller's thread), or one per stream, each with its own threads.
    """

    name = "onnxruntime"
    precision = AS_EXPORTED

    def __init__(self, *sessions: ort.InferenceSession, streams: int = 1):
        if not sessions or streams < 1:
            raise ValueError(f"an ONNX Runtime network needs a session and a stream, not {len(sessions)} and {streams}")
        self.session = sessions[0]  # the IOBinding path's (a GPU runs one stream)
        self.streams = streams
        self.sessions: Lanes[ort.InferenceSession] = Lanes(sessions[i % len(sessions)] for i in range(streams))
        self.provider: str = self.session.get_providers()[0]  # the execution provider running the graph
        self.input_name: str = self.session.get_inputs()[0].name
        self.output_name: str = self.session.get_outputs()[0].name

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.sessions.take() as session:
            return session.run([self.output_name], {self.input_name: x})[0]

    def describe(self) -> dict[str, str]:
        return {"name": self.name, "version": onnxruntime().__version__, "precision": self.precision}


def open_cpu_network(
    model: ModelSource, threads: int | None = None, verbose: bool = False, streams: int | None = None
) -> OnnxRuntimeNetwork:
    """The model on ONNX Runtime's CPU provider, its ``threads`` (default: this process's cores) spent as :func:`cpu_streams`
    says: one shared session when each stream has one thread, else a session per stream."""
    streams, each = cpu_streams(threads or cpu_count(), streams)
    options = session_options(each, verbose)
    sessions = [open_session(model, CPU, options) for _ in range(1 if each == 1 else streams)]
    return OnnxRuntimeNetwork(*sessions, streams=streams)


# ---------------------------------------------------------------------------------------------
# CUDA and cuDNN libraries for the CUDA provider.


def cuda_library_names() -> list[str]:
    """The CUDA and cuDNN libraries this onnxruntime's CUDA provider needs, in load order, by file name.

    ONNX Runtime's own list (the one ``preload_dlls`` loads; its CUDA major version is the build's):
    private, so an onnxruntime without it gives an empty list and only ``preload_dlls`` runs.
    """
    listed = getattr(onnxruntime(), "_get_nvidia_dll_paths", None)
    if listed is None:
        return []
    return [relative[-1] for relative in listed(False, cuda=True, cudnn=True)]  # (..., file name) paths for Linux


def find_cuda_libraries(names: Iterable[str], search_path: Iterable[str]) -> dict[str, Path]:
    """Each of ``names``' first copy in an NVIDIA wheel's folder, ``ENTRY/nvidia/PACKAGE/lib/``, along ``search_path``.

    By file name, in any package folder: NVIDIA's CUDA 13 wheels put every library in ``nvidia/cu13/lib``,
    CUDA 12's in one folder per library (``nvidia/cublas/lib``, ...); cuDNN's are in ``nvidia/cudnn/lib``.
    """
    wanted = list(names)
    found: dict[str, Path] = {}
    for entry in search_path:
        for folder in sorted(Path(entry or ".").glob("nvidia/*/lib")):
            for name in wanted:
                if name not in found and (folder / name).is_file():
                    found[name] = folder / name
    return {name: found[name] for name in wanted if name in found}  # in load order


def preload_cuda_libraries(search_path: Iterable[str]) -> list[str]:
    """Load the CUDA provider's CUDA and cuDNN libraries from NVIDIA's wheels on ``search_path``; the names not found.

    ``libonnxruntime_providers_cuda.so`` has no RUNPATH: the dynamic loader finds its CUDA libraries
    only when they are already loaded (it matches them by soname) or on the loader's own path.
    ``ort.preload_dlls()`` loads them from the ``nvidia`` folder beside the onnxruntime package
    only. An onnxruntime-gpu installed apart from the environment that holds NVIDIA's wheels (``pip
    install --target``, the GPU acceptance run, with CUDA in the host's torch environment) finds
    nothing there, and its CUDA provider fails to load. A test run hides this: importing torch
    loads the same libraries into the process first. So each library is loaded here by its full
    path from the first NVIDIA wheel folder on ``search_path`` that has it, then ``preload_dlls``
    runs (for what it does besides; what it prints goes to the debug log).
    """
    ort = onnxruntime()
    names = cuda_library_names()
    found = find_cuda_libraries(names, search_path)
    for name, path in list(found.items()):
        try:
            ctypes.CDLL(str(path))
        except OSError as e:  # a library of the wrong CUDA version, or one whose own dependencies are missing
            log.debug("cannot load %s: %s", path, e)
            del found[name]
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21
        with redirect_stdout(io.StringIO()) as said:
            ort.preload_dlls()
        log.debug("onnxruntime.preload_dlls(): %s", said.getvalue().strip() or "no messages")
    return [name for name in names if name not in found]


def why_cuda_failed(not_found: list[str]) -> str:
    """The likely reason a CUDA provider that this onnxruntime has did not start."""
    if not not_found:
        return "no GPU visible, a CUDA driver too old for this onnxruntime, or CUDA/cuDNN libraries it cannot load"
    return (
        f"no GPU visible, or CUDA/cuDNN libraries missing: {', '.join(not_found)} in no nvidia/*/lib folder on sys.path; "
        "install NVIDIA's wheels (pip install 'onnxruntime-gpu[cuda,cudnn]'), put the site-packages folder that holds "
        "them on PYTHONPATH, or their lib folders on LD_LIBRARY_PATH"
    )
