"""ONNX Runtime sessions on an explicit device: the one place that builds execution-provider lists.

- ``cpu``: the CPU provider.
- ``cuda[:N]``: the CUDA provider on GPU N (TensorRT first, when asked for). One that cannot be
  honoured (no such provider in this onnxruntime, no GPU, missing CUDA libraries, a session that
  falls back to the CPU) is a :class:`~batch.core.devices.DeviceError`, never a silent CPU run.
- ``auto``: the GPU when it works, else the CPU, with a log line saying which it took and why.

onnxruntime is imported inside the functions, so this module imports without the ``cpu`` extra.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

from batch.core.devices import CPU, Device, DeviceError, cpu_count, parse_device
from batch.core.errors import CarvanaError
from batch.core.extras import require

if TYPE_CHECKING:
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

ModelSource = str | Path | bytes  # an .onnx file, or a serialized model


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
    ort = onnxruntime()
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
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: find CUDA/cuDNN from the nvidia-* wheels
        ort.preload_dlls()
    try:
        session = new_session(model, options, providers)
    except Exception as e:
        if not explicit:
            log.info("device auto: the %s provider failed (%s); running on the CPU", label, e)
            return None
        raise unusable(device, f"ONNX Runtime failed to open the model there ({e})") from e
    if session.get_providers()[0] != wanted:
        return unavailable(
            f"ONNX Runtime could not start its {label} provider (no GPU visible, or CUDA/cuDNN libraries missing; "
            "-v shows its log)"
        )
    log.info("running on GPU %d with ONNX Runtime's %s provider", device.index, label)
    return session
