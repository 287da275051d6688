"""Inference alone: ONNX Runtime, and OpenVINO on the CPU, on pre-decoded batches: a sweep of batch sizes per
backend and width.

On the CPU both runtimes run every model, side by side, as the runner opens them (``unet-batch --runtime``:
OpenVINO at f32 inference precision, each runtime's threads split into streams) and as the runner feeds them:
a call runs as many batches at once as the network has streams, each from its own thread. On a GPU the input
batch is copied to the device once and the output stays there (I/O binding), so the figure is the network's
own speed, not PCIe copies; ``run_with_iobinding`` returns after the provider's stream is synchronized.
Like timm's benchmark, a batch that runs out of GPU memory is retried once at half the size.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial

import numpy as np

from batch.core.contract import prepare_input
from batch.core.devices import Device, DeviceError
from batch.inference import openvino_runtime, runtime
from benchmarks.config import BenchError, SweepConfig, describe_error
from benchmarks.machine import Hardware, gpu_memory_of, peak_tflops, this_process
from benchmarks.models import BenchModel
from benchmarks.timing import Stats, rates, summarize, time_calls

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = runtime.CPU_PROVIDER, runtime.CUDA_PROVIDER, runtime.TENSORRT_PROVIDER
OPENVINO = openvino_runtime.PROVIDER
CPU_BACKENDS = ("cpu", "openvino")  # ONNX Runtime's CPU provider, OpenVINO's CPU plugin
OOM_MARKERS = ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation", "bfcarena")


class ProviderError(BenchError):
    """An execution provider that was asked for and is not what ONNX Runtime gave; names the fix."""


@dataclass(frozen=True)
class Backend:
    """An ONNX Runtime execution provider, or OpenVINO on the CPU, at one precision."""

    name: str  # "cpu" (ONNX Runtime's CPU provider), "openvino", "cuda", "tensorrt"
    provider: str
    precision: str  # "fp16", "fp32" or "int8": of the compute (TensorRT builds FP16 kernels from an FP32 graph)
    device_id: int | None  # CUDA device; None on the CPU
    graph_precision: str  # precision of the ONNX file it runs
    gpu_name: str | None = None  # the card, for its datasheet peak

    @property
    def label(self) -> str:
        if self.name == "openvino":
            return f"OpenVINO CPU {self.precision.upper()}"
        return f"ORT {self.name.upper() if self.name == 'cpu' else self.name.capitalize()} {self.precision.upper()}"

    @property
    def runtime(self) -> str:
        """The runner's ``--runtime`` for this backend."""
        return "openvino" if self.name == "openvino" else "onnxruntime"

    @property
    def on_gpu(self) -> bool:
        return self.device_id is not None


def backends_for(hardware: Hardware) -> list[Backend]:
    """The backends benchmarked on ``hardware``: ONNX Runtime's CPU provider and OpenVINO (FP32, INT8 each), or CUDA
    FP16/FP32 and TensorRT FP16.

    INT8 (QDQ) files are for the CPU only: ONNX Runtime runs them with integer kernels there alone.
    """
    if hardware.device_id is None:
        runtimes = (("cpu", CPU), ("openvino", OPENVINO))
        return [
            Backend(name, provider, precision, None, precision) for name, provider in runtimes for precision in ("fp32", "int8")
        ]
    gpu = hardware.device_id, hardware.gpu_name
    return [
        Backend("cuda", CUDA, "fp16", gpu[0], "fp16", gpu[1]),
        Backend("cuda", CUDA, "fp32", gpu[0], "fp32", gpu[1]),
        Backend("tensorrt", TENSORRT, "fp16", gpu[0], "fp32", gpu[1]),
    ]


def provider_missing(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (no such provider in this ONNX Runtime build, no openvino), or None when it can."""
    if backend.name == "openvino":
        return None if openvino_runtime.installed() else "openvino is not installed: pip install '.[cpu]'"
    return None if backend.provider == CPU else runtime.provider_missing(backend.provider)


def make_session(model: BenchModel, backend: Backend, max_batch: int, cache_dir: str):
    """The runner's kind of session (batch.inference.runtime) on exactly ``backend``'s provider, or its OpenVINO
    network (batch.inference.openvino_runtime); ProviderError if ORT cannot."""
    if backend.name == "openvino":
        return openvino_runtime.OpenVinoNetwork(model.path, model.contract)
    if not backend.on_gpu:
        return runtime.open_cpu_network(model.path)
    cuda = {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": 1}
    tensorrt = tensorrt_options(model, max_batch, cache_dir) if backend.provider == TENSORRT else None
    try:
        return runtime.open_session(model.path, Device("cuda", backend.device_id), cuda_options=cuda, tensorrt_options=tensorrt)
    except DeviceError as e:
        raise ProviderError(str(e)) from e


def tensorrt_options(model: BenchModel, max_batch: int, cache_dir: str) -> dict:
    """One optimization profile from batch 1 to ``max_batch`` at the model's size: TensorRT builds its engine once."""
    import onnx

    name = onnx.load(str(model.path), load_external_data=False).graph.input[0].name
    height, width = model.contract.input_size
    dims = "{}x{}x{}x3" if model.contract.input_layout == "NHWC" else "{}x3x{}x{}"

    def shape(batch: int) -> str:
        return f"{name}:{dims.format(batch, height, width)}"

    return {
        "trt_fp16_enable": 1,
        "trt_engine_cache_enable": 1,
        "trt_engine_cache_path": cache_dir,
        "trt_profile_min_shapes": shape(1),
        "trt_profile_opt_shapes": shape(max_batch),
        "trt_profile_max_shapes": shape(max_batch),
    }


def model_input(images: np.ndarray, model: BenchModel, batch: int) -> np.ndarray:
    """A batch in the model's contract from decoded photos (N, H, W, 3) uint8, repeating photos as needed."""
    return prepare_input(images[np.arange(batch) % len(images)], model.contract)  # (batch, ...) as the runner feeds it


def runner(session, backend: Backend, batch: np.ndarray) -> tuple[Callable[[], None], int]:
    """A no-argument function that runs one call (device-resident input and output on a GPU), and the images it runs:
    on the CPU, one batch per stream of the network, at once, as the runner keeps that many in flight."""
    if backend.on_gpu:
        return bound_runner(session, batch, "cuda", backend.device_id), len(batch)
    if session.streams == 1:
        return partial(session.run, batch), len(batch)
    pool = ThreadPoolExecutor(session.streams, thread_name_prefix="bench-stream")  # its threads end with the function

    def run() -> None:
        for scores in pool.map(session.run, [batch] * session.streams):
            del scores

    run.pool = pool
    return run, session.streams * len(batch)


def bound_runner(session, batch: np.ndarray, device_type: str, device_id: int) -> Callable[[], None]:
    """Run ``batch`` copied once to the device, outputs left there (I/O binding); waits for the outputs."""
    ort = runtime.onnxruntime()
    binding = session.io_binding()
    device_input = ort.OrtValue.ortvalue_from_numpy(batch, device_type, device_id)
    binding.bind_ortvalue_input(session.get_inputs()[0].name, device_input)
    for output in session.get_outputs():
        binding.bind_output(output.name, device_type, device_id)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.binding, run.device_input = binding, device_input  # both must outlive every call
    return run


@dataclass(frozen=True)
class InferenceResult:
    backend: str  # "cpu", "openvino", "cuda", "tensorrt"
    label: str  # "ORT CUDA FP16", "OpenVINO CPU INT8"
    precision: str
    model: str  # "unet-w16" or the user's file name
    width: int | None
    batch_size: int
    input_size: tuple[int, int]
    status: str  # "ok", "skipped", "oom", "failed"
    reason: str | None = None
    images_per_second: Stats | None = None
    seconds_per_batch: Stats | None = None  # of a batch, with ``streams`` batches running at once
    streams: int = 1  # batches run at once (a CPU runtime's streams)
    gflop_per_image: float | None = None
    achieved_tflops: float | None = None  # at the median rate
    peak_tflops: float | None = None  # datasheet dense tensor peak of the card at this precision
    fraction_of_peak: float | None = None
    gpu_memory_mib: float | None = None
    gpu_memory_method: str | None = None


@dataclass(frozen=True)
class Trial:
    """One model on one provider, fed batches drawn from the same decoded photos."""

    model: BenchModel
    backend: Backend
    images: np.ndarray  # (N, H, W, 3) uint8

    @property
    def name(self) -> str:
        return f"{self.backend.label} {self.model.name}"

    def row(self, batch: int, status: str, **measured) -> InferenceResult:
        b, m = self.backend, self.model
        return InferenceResult(b.name, b.label, b.precision, m.name, m.width, batch, m.contract.input_size, status, **measured)


def fastest(rows: list[InferenceResult]) -> InferenceResult | None:
    """The measured row with the highest median images/s; None when nothing was measured."""
    return max((r for r in rows if r.status == "ok"), key=lambda r: r.images_per_second.median, default=None)


def is_oom(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in OOM_MARKERS)


def sweep_batches(model: BenchModel, backend: Backend, images: np.ndarray, sweep: SweepConfig) -> list[InferenceResult]:
    """Measure ``model`` on ``backend`` at each batch size, smallest first (see :func:`sweep_session`).

    A provider this ONNX Runtime lacks is a recorded skip; one it has but cannot start is an error
    for CUDA (never a silent CPU run) and a recorded skip for TensorRT, which is optional.
    """
    trial, first = Trial(model, backend, images), sweep.batch_sizes[0]
    missing = provider_missing(backend)
    if missing:
        return [trial.row(first, "skipped", reason=missing)]
    with tempfile.TemporaryDirectory(prefix="unet-bench-trt-") as trt_cache:
        try:
            session = make_session(model, backend, max(sweep.batch_sizes), trt_cache)
        except ProviderError as e:
            if backend.name != "tensorrt":
                raise
            return [trial.row(first, "skipped", reason=str(e))]
        except Exception as e:  # noqa: BLE001 - ORT raises its own types (Fail, RuntimeException, ...)
            return [trial.row(first, "failed", reason=f"session creation failed: {describe_error(e)}")]
        return sweep_session(session, trial, sweep)


def sweep_session(session, trial: Trial, sweep: SweepConfig) -> list[InferenceResult]:
    """One row per batch size tried. The sweep stops before a batch predicted to be over the time budget,
    and at a failure; an out-of-memory error is retried once at half the batch size. Every stop is a row
    with its reason."""
    results: list[InferenceResult] = []
    queue = list(sweep.batch_sizes)
    while queue:
        batch = queue.pop(0)
        reason = over_budget(results, batch, sweep.max_batch_seconds)
        if reason:
            results.append(trial.row(batch, "skipped", reason=reason))
            break
        try:
            results.append(measure_batch(session, trial, batch, sweep))
        except Exception as e:  # noqa: BLE001 - ORT's exception types are not importable in a stable way
            oom = trial.backend.on_gpu and is_oom(e)
            results.append(trial.row(batch, "oom" if oom else "failed", reason=describe_error(e)))
            smaller = batch // 2
            queue = [smaller] if oom and smaller >= 1 and smaller not in {r.batch_size for r in results} else []
            retry = f"; retrying at {smaller}" if queue else ""
            log.log(logging.WARNING if queue else logging.ERROR, "%s batch %d: %s%s", trial.name, batch, describe_error(e), retry)
            continue
        log.info("%s batch %d: %.2f images/s", trial.name, batch, results[-1].images_per_second.median)
    return results


def over_budget(results: list[InferenceResult], batch: int, budget_s: float) -> str | None:
    """Why ``batch`` is not tried: its time, predicted from the last measured per-image time, is over ``budget_s``."""
    done = [r for r in results if r.status == "ok"]
    if not done:
        return None
    predicted = done[-1].seconds_per_batch.median / done[-1].batch_size * batch
    return f"predicted {predicted:.1f} s per batch, over this suite's {budget_s:g} s budget" if predicted > budget_s else None


def measure_batch(session, trial: Trial, batch: int, sweep: SweepConfig) -> InferenceResult:
    """Warm up (at least once: the first run allocates), time ``sweep.repeats`` calls, and relate the rate to FLOPs."""
    model, backend = trial.model, trial.backend
    run, images = runner(session, backend, model_input(trial.images, model, batch))
    seconds = time_calls(run, warmup=max(sweep.warmup, 1), repeats=sweep.repeats)
    rate = rates([images] * sweep.repeats, seconds)
    gflop = model.gflops(model.contract.input_size)
    achieved = gflop * rate.median / 1e3 if gflop is not None else None
    peak = peak_tflops(backend.gpu_name, backend.precision) if backend.on_gpu else None
    memory = gpu_memory_of(this_process, backend.device_id) if backend.on_gpu else None
    return trial.row(
        batch,
        "ok",
        images_per_second=rate,
        seconds_per_batch=summarize(seconds),
        streams=images // batch,
        gflop_per_image=gflop,
        achieved_tflops=achieved,
        peak_tflops=peak,
        fraction_of_peak=achieved / peak if achieved is not None and peak else None,
        gpu_memory_mib=memory.mib if memory else None,
        gpu_memory_method=memory.method if memory else None,
    )
