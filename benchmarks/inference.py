"""Inference alone: ONNX Runtime on pre-decoded batches, a sweep of batch sizes per provider and width.

On a GPU the input batch is copied to the device once and the output stays there (I/O binding), so
the figure is the network's own speed, not PCIe copies; ``run_with_iobinding`` returns after the
provider's stream is synchronized. On the CPU provider a plain ``session.run`` is the real path.
"""

from __future__ import annotations

import logging
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from batch.core.contract import prepare_input
from batch.core.devices import Device, DeviceError
from batch.inference import runtime
from benchmarks.errors import BenchError, describe_error
from benchmarks.machine import peak_tflops
from benchmarks.memory import gpu_memory_of, this_process
from benchmarks.models import BenchModel
from benchmarks.timing import Stats, rates, summarize, time_calls

log = logging.getLogger(__name__)

CPU, CUDA, TENSORRT = runtime.CPU_PROVIDER, runtime.CUDA_PROVIDER, runtime.TENSORRT_PROVIDER
OOM_MARKERS = ("out of memory", "failed to allocate memory", "cudaerrormemoryallocation", "bfcarena")


class ProviderError(BenchError):
    """An execution provider that was asked for and is not what ONNX Runtime gave; names the fix."""


@dataclass(frozen=True)
class Backend:
    """An ONNX Runtime execution provider at one precision."""

    name: str  # "cpu", "cuda", "tensorrt"
    provider: str
    precision: str  # "fp16", "fp32" or "int8": of the compute (TensorRT builds FP16 kernels from an FP32 graph)
    device_id: int | None  # CUDA device; None on the CPU
    graph_precision: str  # precision of the ONNX file it runs

    @property
    def label(self) -> str:
        return f"ORT {self.name.upper() if self.name == 'cpu' else self.name.capitalize()} {self.precision.upper()}"

    @property
    def on_gpu(self) -> bool:
        return self.device_id is not None


def backends_for(device: str, device_id: int | None) -> list[Backend]:
    """The providers benchmarked on ``device``: the CPU provider (FP32, INT8), or CUDA FP16/FP32 and TensorRT FP16.

    INT8 (QDQ) files are for the CPU only: ONNX Runtime runs them with integer kernels there alone.
    """
    if device == "cpu":
        return [Backend("cpu", CPU, "fp32", None, "fp32"), Backend("cpu", CPU, "int8", None, "int8")]
    return [
        Backend("cuda", CUDA, "fp16", device_id, "fp16"),
        Backend("cuda", CUDA, "fp32", device_id, "fp32"),
        Backend("tensorrt", TENSORRT, "fp16", device_id, "fp32"),
    ]


def provider_missing(backend: Backend) -> str | None:
    """Why ``backend`` cannot run in this ONNX Runtime build, or None when it can."""
    return None if backend.provider == CPU else runtime.provider_missing(backend.provider)


def make_session(model: BenchModel, backend: Backend, max_batch: int, cache_dir: str | None = None):
    """The runner's kind of session (batch.inference.runtime) on exactly ``backend``'s provider; ProviderError if ORT cannot."""
    if not backend.on_gpu:
        return runtime.open_session(model.path, "cpu")
    cuda = {"cudnn_conv_algo_search": "EXHAUSTIVE", "use_tf32": 1}
    tensorrt = None
    if backend.provider == TENSORRT:
        height, width = model.contract.input_size
        shape = (
            (lambda n: f"{model.input_name}:{n}x{height}x{width}x3")
            if model.contract.input_layout == "NHWC"
            else (lambda n: f"{model.input_name}:{n}x3x{height}x{width}")
        )
        tensorrt = {
            "trt_fp16_enable": 1,
            "trt_engine_cache_enable": 1 if cache_dir else 0,
            "trt_engine_cache_path": cache_dir or "",
            "trt_profile_min_shapes": shape(1),
            "trt_profile_opt_shapes": shape(max_batch),
            "trt_profile_max_shapes": shape(max_batch),
        }
    try:
        return runtime.open_session(model.path, Device("cuda", backend.device_id), cuda_options=cuda, tensorrt_options=tensorrt)
    except DeviceError as e:
        raise ProviderError(str(e)) from e


def model_input(images: np.ndarray, model: BenchModel, batch: int) -> np.ndarray:
    """A batch in the model's contract from decoded photos (N, H, W, 3) uint8, repeating photos as needed."""
    return prepare_input(images[np.arange(batch) % len(images)], model.contract)  # (batch, ...) as the runner feeds it


def runner(session, model: BenchModel, backend: Backend, batch: np.ndarray) -> Callable[[], None]:
    """A no-argument function that runs one batch (device-resident input and output on a GPU)."""
    if backend.on_gpu:
        return bound_runner(session, model, batch, "cuda", backend.device_id)
    feed = {model.input_name: batch}
    return lambda: session.run(None, feed)


def bound_runner(session, model: BenchModel, batch: np.ndarray, device_type: str, device_id: int) -> Callable[[], None]:
    """Run ``batch`` copied once to the device, outputs left there (I/O binding); waits for the outputs."""
    import onnxruntime as ort

    binding = session.io_binding()
    device_input = ort.OrtValue.ortvalue_from_numpy(batch, device_type, device_id)
    binding.bind_ortvalue_input(model.input_name, device_input)
    for output in session.get_outputs():
        binding.bind_output(output.name, device_type, device_id)

    def run() -> None:
        session.run_with_iobinding(binding)
        binding.synchronize_outputs()

    run.binding, run.device_input = binding, device_input  # both must outlive every call
    return run


@dataclass(frozen=True)
class InferenceResult:
    backend: str  # "cpu", "cuda", "tensorrt"
    label: str  # "ORT CUDA FP16"
    precision: str
    model: str  # "unet-w16" or the user's file name
    width: int | None
    batch_size: int
    input_size: tuple[int, int]
    status: str  # "ok", "skipped", "oom", "failed"
    reason: str | None = None
    images_per_second: Stats | None = None
    seconds_per_batch: Stats | None = None
    gflop_per_image: float | None = None
    achieved_tflops: float | None = None  # at the median rate
    peak_tflops: float | None = None  # datasheet dense tensor peak of the card at this precision
    fraction_of_peak: float | None = None
    gpu_memory_mib: float | None = None
    gpu_memory_method: str | None = None


@dataclass(frozen=True)
class Sweep:
    """What a provider/model pair did across batch sizes."""

    results: list[InferenceResult] = field(default_factory=list)

    def best(self) -> InferenceResult | None:
        done = [r for r in self.results if r.status == "ok"]
        return max(done, key=lambda r: r.images_per_second.median) if done else None


def is_oom(error: Exception) -> bool:
    text = str(error).lower()
    return any(marker in text for marker in OOM_MARKERS)


def sweep_batches(
    model: BenchModel,
    backend: Backend,
    images: np.ndarray,
    batch_sizes: tuple[int, ...],
    *,
    warmup: int,
    repeats: int,
    max_batch_seconds: float,
    gpu_name: str | None,
) -> Sweep:
    """Measure ``model`` on ``backend`` at each batch size, smallest first (see :func:`sweep_session`).

    A provider this ONNX Runtime lacks is a recorded skip; one it has but cannot start is an error
    for CUDA (never a silent CPU run) and a recorded skip for TensorRT, which is optional.
    """
    base = dict(
        backend=backend.name,
        label=backend.label,
        precision=backend.precision,
        model=model.name,
        width=model.width,
        input_size=model.contract.input_size,
    )
    missing = provider_missing(backend)
    if missing:
        return Sweep([InferenceResult(batch_size=batch_sizes[0], status="skipped", reason=missing, **base)])
    with tempfile.TemporaryDirectory(prefix="unet-bench-trt-") as trt_cache:
        try:
            session = make_session(model, backend, max(batch_sizes), trt_cache if backend.name == "tensorrt" else None)
        except ProviderError as e:
            if backend.name != "tensorrt":
                raise
            return Sweep([InferenceResult(batch_size=batch_sizes[0], status="skipped", reason=str(e), **base)])
        except Exception as e:  # noqa: BLE001 - ORT raises its own types (Fail, RuntimeException, ...)
            return Sweep(
                [
                    InferenceResult(
                        batch_size=batch_sizes[0], status="failed", reason=f"session creation failed: {describe_error(e)}", **base
                    )
                ]
            )
        return Sweep(
            sweep_session(
                session,
                model,
                backend,
                images,
                batch_sizes,
                warmup=warmup,
                repeats=repeats,
                max_batch_seconds=max_batch_seconds,
                gpu_name=gpu_name,
                base=base,
            )
        )


def sweep_session(
    session,
    model: BenchModel,
    backend: Backend,
    images: np.ndarray,
    batch_sizes: tuple[int, ...],
    *,
    warmup: int,
    repeats: int,
    max_batch_seconds: float,
    gpu_name: str | None,
    base: dict,
) -> list[InferenceResult]:
    """One row per batch size tried. The sweep stops before a batch predicted (from the last per-image
    time) to take longer than ``max_batch_seconds``, and after an out-of-memory error, which is
    retried once at half the batch size. Every stop is a row with its reason."""
    results: list[InferenceResult] = []
    seconds_per_image = None
    queue = list(batch_sizes)
    while queue:
        batch = queue.pop(0)
        if seconds_per_image is not None and seconds_per_image * batch > max_batch_seconds:
            results.append(
                InferenceResult(
                    batch_size=batch,
                    status="skipped",
                    **base,
                    reason=(
                        f"predicted {seconds_per_image * batch:.1f} s per batch, over this suite's {max_batch_seconds:g} s budget"
                    ),
                )
            )
            break
        try:
            result = measure_batch(
                session, model, backend, images, batch, warmup=warmup, repeats=repeats, gpu_name=gpu_name, base=base
            )
        except Exception as e:  # noqa: BLE001 - ORT's exception types are not importable in a stable way
            if not (backend.on_gpu and is_oom(e)):
                log.error("%s %s batch %d failed: %s", backend.label, model.name, batch, describe_error(e))
                results.append(InferenceResult(batch_size=batch, status="failed", reason=describe_error(e), **base))
                break
            results.append(InferenceResult(batch_size=batch, status="oom", reason=describe_error(e), **base))
            smaller = batch // 2
            queue = [smaller] if smaller >= 1 and smaller not in {r.batch_size for r in results} else []
            if queue:
                log.warning("%s %s batch %d: out of GPU memory; retrying at %d", backend.label, model.name, batch, smaller)
            continue
        results.append(result)
        seconds_per_image = result.seconds_per_batch.median / batch
        log.info("%s %s batch %d: %.2f images/s", backend.label, model.name, batch, result.images_per_second.median)
    return results


def measure_batch(
    session,
    model: BenchModel,
    backend: Backend,
    images: np.ndarray,
    batch: int,
    *,
    warmup: int,
    repeats: int,
    gpu_name: str | None,
    base: dict,
) -> InferenceResult:
    run = runner(session, model, backend, model_input(images, model, batch))
    seconds = time_calls(run, warmup=max(warmup, 1), repeats=repeats)  # >= 1 warm-up: first run allocates
    rate = rates([batch] * repeats, seconds)
    gflop = model.gflops(model.contract.input_size)
    achieved = gflop * rate.median / 1e3 if gflop is not None else None
    peak = peak_tflops(gpu_name, backend.precision) if backend.on_gpu else None
    memory = gpu_memory_of(this_process, backend.device_id) if backend.on_gpu else None
    return InferenceResult(
        batch_size=batch,
        status="ok",
        images_per_second=rate,
        seconds_per_batch=summarize(seconds),
        gflop_per_image=gflop,
        achieved_tflops=achieved,
        peak_tflops=peak,
        fraction_of_peak=achieved / peak if achieved is not None and peak else None,
        gpu_memory_mib=memory.mib if memory else None,
        gpu_memory_method=memory.method if memory else None,
        **base,
    )
