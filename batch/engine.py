"""Inference stage: the exported model in ONNX Runtime, on the CPU or a CUDA GPU.

- :func:`load_model` reads and checks the ONNX file and its contract (batch/contract.py), then
  opens an ``InferenceSession`` with explicit providers. ``cuda`` that cannot be honoured (no CUDA
  provider in this onnxruntime, no GPU, missing CUDA libraries) is a :class:`DeviceError`, never a
  silent CPU run; ``auto`` picks the GPU when it works and says which it took.
- :class:`CpuEngine`: host arrays in, low-resolution scores out; the upsample + threshold to each
  photo's size (:func:`batch.postprocess.upsample_threshold`) runs later, in the writer threads.
- :class:`BoundEngine`: IOBinding on the session's device. Inputs come as device buffers (DALI's
  GPU output) or are uploaded once; logits stay on the device, where a second tiny ONNX graph
  (flip-average for TTA, Resize to the photo's size, threshold) turns them into uint8 masks, the
  only data that comes back to the host. This is the CUDA path; it also runs with CPU buffers,
  which is how the tests cover it.
"""

from __future__ import annotations

import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from batch.contract import ContractError, ModelContract
from batch.decode import Batch
from batch.postprocess import average_flipped, build_postprocess_model, threshold_in_output_units, upsample_threshold
from batch.report import StageClock

log = logging.getLogger(__name__)

ELEMENT_TYPES = {"tensor(uint8)": "uint8", "tensor(float)": "float32", "tensor(float16)": "float16"}
NUMPY_DTYPES = {"uint8": np.uint8, "float32": np.float32, "float16": np.float16}


class ModelError(ValueError):
    """A model file that cannot be used; the message names the file and the fix."""


class DeviceError(RuntimeError):
    """A device that was asked for and cannot be used; the message says why and what to do."""


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def parse_device(name: str) -> tuple[str, int]:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` -> (kind, index)."""
    match = re.fullmatch(r"(auto|cpu|cuda)(?::(\d+))?", name)
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return match[1], int(match[2] or 0)


@dataclass
class Model:
    path: Path
    contract: ModelContract
    session: ort.InferenceSession
    device: str  # "cpu" or "cuda:N"
    provider: str  # the execution provider running the graph
    input_name: str
    output_name: str
    output_dtype: str  # "float32" or "float16"

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_index(self) -> int:
        return int(self.device.split(":")[1]) if self.on_gpu else 0

    def describe(self) -> dict:
        c = self.contract
        return {
            "path": str(self.path),
            "precision": c.precision,
            "input_size": [c.input_height, c.input_width],
            "input_layout": c.input_layout,
            "input_dtype": c.input_dtype,
            "output_kind": c.output_kind,
            "threshold": c.threshold,
        }


def read_contract(path: Path) -> ModelContract:
    """The model's contract from its metadata, checked against the graph's input and output."""
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # protobuf raises DecodeError and friends; any of them means "not ONNX"
        raise ModelError(
            f"{path} is not a readable ONNX model ({type(e).__name__}: {e}); export one with `unet-export to-onnx`"
        ) from e
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        contract = ModelContract.from_metadata(meta, source=str(path))
    except ContractError as e:
        raise ModelError(str(e)) from e
    initializers = {t.name for t in proto.graph.initializer}
    inputs = {i.name: i for i in proto.graph.input if i.name not in initializers}
    check_graph_io(path, contract, list(inputs.values()), list(proto.graph.output))
    return contract


def check_graph_io(path: Path, contract: ModelContract, inputs: list, outputs: list) -> None:
    if len(inputs) != 1:
        raise ModelError(f"{path} has {len(inputs)} inputs ({[i.name for i in inputs]}); the batch runner needs one image input")
    if not outputs:
        raise ModelError(f"{path} has no outputs")
    image = inputs[0].type.tensor_type
    expected = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}[contract.input_dtype]
    if image.elem_type != expected:
        raise ModelError(
            f"{path}: input '{inputs[0].name}' is {TensorProto.DataType.Name(image.elem_type)} but the metadata says "
            f"input_dtype={contract.input_dtype}; fix the metadata or re-export the model"
        )
    dims = [d.dim_value if d.HasField("dim_value") else None for d in image.shape.dim]
    channel_axis, other_axis = (3, 1) if contract.input_layout == "NHWC" else (1, 3)
    looks_transposed = len(dims) == 4 and dims[channel_axis] is None and dims[other_axis] == 3
    if len(dims) != 4 or dims[channel_axis] not in (3, None) or looks_transposed:
        raise ModelError(
            f"{path}: input '{inputs[0].name}' has shape {dims}, not {contract.input_layout} with 3 channels as its "
            "metadata says (input_layout); fix the metadata or re-export the model"
        )
    out = outputs[0].type.tensor_type
    if out.elem_type not in (TensorProto.FLOAT, TensorProto.FLOAT16):
        raise ModelError(f"{path}: output '{outputs[0].name}' is {TensorProto.DataType.Name(out.elem_type)}, not float")
    out_dims = [d.dim_value if d.HasField("dim_value") else None for d in out.shape.dim]
    if len(out_dims) != 4 or out_dims[1] not in (1, None):
        raise ModelError(f"{path}: output '{outputs[0].name}' has shape {out_dims}; expected (N, 1, H, W)")


def session_options(threads: int, verbose: bool) -> ort.SessionOptions:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    # Idle ORT threads would otherwise spin on the cores that decoding and writing need.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    options.log_severity_level = 2 if verbose else 3  # warnings with -v (why CUDA did not start), else errors
    return options


def load_model(path: Path, device: str = "auto", threads: int | None = None, verbose: bool = False) -> Model:
    """Open ``path`` on ``device`` (auto, cpu, cuda, cuda:N); :class:`ModelError` / :class:`DeviceError` on failure."""
    kind, index = parse_device(device)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    contract = read_contract(path)
    options = session_options(threads or cpu_count(), verbose)

    session = None
    if kind in ("auto", "cuda"):
        session = open_cuda_session(path, options, index, explicit=kind == "cuda")
    if session is None:
        session = open_session(path, options, ["CPUExecutionProvider"])
    provider = session.get_providers()[0]
    on_gpu = provider == "CUDAExecutionProvider"
    image, = session.get_inputs()
    output = session.get_outputs()[0]
    return Model(
        path=path,
        contract=contract,
        session=session,
        device=f"cuda:{index}" if on_gpu else "cpu",
        provider=provider,
        input_name=image.name,
        output_name=output.name,
        output_dtype=ELEMENT_TYPES[output.type],  # float or float16: checked by read_contract
    )


def open_session(path: Path, options: ort.SessionOptions, providers: list) -> ort.InferenceSession:
    try:
        return ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:  # onnxruntime raises its own Fail / InvalidGraph / ... types
        raise ModelError(f"{path}: ONNX Runtime cannot load this model ({e}); re-export it with `unet-export to-onnx`") from e


def open_cuda_session(path: Path, options: ort.SessionOptions, index: int, explicit: bool) -> ort.InferenceSession | None:
    """A session on GPU ``index``; None (with a log line saying why) when ``auto`` cannot have one."""

    def unavailable(reason: str) -> None:
        if explicit:
            raise DeviceError(f"--device cuda:{index} cannot be used: {reason}. Use --device cpu to run on the CPU.")
        log.info("device auto: running on the CPU (%s)", reason)

    if "CUDAExecutionProvider" not in ort.get_available_providers():
        return unavailable(
            f"this onnxruntime ({ort.__version__}) has no CUDA provider; install onnxruntime-gpu (pip install '.[gpu]')"
        )
    if hasattr(ort, "preload_dlls"):  # onnxruntime >= 1.21: find CUDA/cuDNN from the nvidia-* wheels
        ort.preload_dlls()
    providers = [("CUDAExecutionProvider", {"device_id": index}), "CPUExecutionProvider"]
    try:
        session = ort.InferenceSession(str(path), sess_options=options, providers=providers)
    except Exception as e:
        if not explicit:
            log.info("device auto: the CUDA provider failed (%s); running on the CPU", e)
            return None
        raise DeviceError(f"--device cuda:{index} cannot be used: ONNX Runtime failed to open the model there ({e})") from e
    if session.get_providers()[0] != "CUDAExecutionProvider":
        return unavailable(
            "ONNX Runtime could not start its CUDA provider (no GPU visible, or CUDA/cuDNN libraries missing; -v shows its log)"
        )
    log.info("running on GPU %d with ONNX Runtime's CUDA provider", index)
    return session


# ---------------------------------------------------------------------------------------------
# Input preparation on the host (Pillow batches): the graph's layout, dtype and normalization.


def prepare_input(pixels: np.ndarray, contract: ModelContract) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> what the graph's input wants (NHWC/NCHW, uint8 or normalized float)."""
    x = pixels
    if contract.input_dtype != "uint8":
        mean = np.asarray(contract.pixel_mean, dtype=np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(contract.pixel_std, dtype=np.float32) * 255.0)
        x = ((pixels.astype(np.float32) - mean) * inv_std).astype(NUMPY_DTYPES[contract.input_dtype], copy=False)
    if contract.input_layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)  # (N, 3, H, W)
    return np.ascontiguousarray(x)


def mirrored(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels[:, :, ::-1])  # (N, H, W, 3) flipped along W


# ---------------------------------------------------------------------------------------------
# Predictions: something the writer turns into a full-size uint8 mask.


@dataclass
class LowResScores:
    """Model output at the model's size; upsampled and thresholded on demand (in a writer thread)."""

    scores: np.ndarray  # (h, w) float32
    size: tuple[int, int]  # the photo's (H, W)
    cut: float  # threshold in the output's units

    def mask(self) -> np.ndarray:
        return upsample_threshold(self.scores, self.size, self.cut)


@dataclass
class FinishedMask:
    """A mask already made on the device."""

    value: np.ndarray  # (H, W) uint8, 0 or 255

    def mask(self) -> np.ndarray:
        return self.value


class CpuEngine:
    """ONNX Runtime on host arrays; post-processing deferred to the writers."""

    def __init__(self, model: Model, threshold: float, tta: bool, clock: StageClock | None = None):
        self.model = model
        self.tta = tta
        self.cut = threshold_in_output_units(threshold, model.contract.output_kind)
        self.clock = clock or StageClock()

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.clock("infer"):
            scores = self.model.session.run([self.model.output_name], {self.model.input_name: x})[0]  # (N, 1, h, w)
        return scores.astype(np.float32, copy=False)

    def predict(self, batch: Batch) -> list[LowResScores]:
        contract = self.model.contract
        x = batch.model_input if batch.model_input is not None else prepare_input(batch.pixels, contract)
        scores = self.run(x)
        if self.tta:
            flipped = batch.model_input_flipped
            if flipped is None:
                flipped = prepare_input(mirrored(batch.pixels), contract)
            scores = average_flipped(scores, self.run(flipped))
        return [LowResScores(scores[i, 0], size, self.cut) for i, size in enumerate(batch.sizes)]


class BoundEngine:
    """ONNX Runtime with IOBinding on the model's device; masks made there (the GPU path)."""

    def __init__(
        self, model: Model, threshold: float, tta: bool, clock: StageClock | None = None, device_type: str | None = None
    ):
        self.model = model
        self.tta = tta
        self.clock = clock or StageClock()
        self.device_type = device_type or ("cuda" if model.on_gpu else "cpu")
        self.device_id = model.device_index
        cut = threshold_in_output_units(threshold, model.contract.output_kind)
        score_type = TensorProto.FLOAT16 if model.output_dtype == "float16" else TensorProto.FLOAT
        graph = build_postprocess_model(score_type, cut, tta)
        providers = (
            [("CUDAExecutionProvider", {"device_id": self.device_id}), "CPUExecutionProvider"]
            if self.device_type == "cuda"
            else ["CPUExecutionProvider"]
        )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        self.post = ort.InferenceSession(graph.SerializeToString(), sess_options=options, providers=providers)
        self.score_dtype = NUMPY_DTYPES[model.output_dtype]

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
        """A buffer on the model's device (DALI copies its GPU batches into these)."""
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, self.device_id)

    def to_device(self, batch: Batch, flipped: bool) -> ort.OrtValue:
        x = batch.model_input_flipped if flipped else batch.model_input
        if x is None:  # a host batch (Pillow): prepare and upload once
            pixels = mirrored(batch.pixels) if flipped else batch.pixels
            x = prepare_input(pixels, self.model.contract)
        if isinstance(x, np.ndarray):
            x = ort.OrtValue.ortvalue_from_numpy(x, self.device_type, self.device_id)
        return x

    def run(self, x: ort.OrtValue) -> ort.OrtValue:
        """Model on a device input; the (N, 1, h, w) scores stay on the device."""
        binding = self.model.session.io_binding()
        binding.bind_ortvalue_input(self.model.input_name, x)
        binding.bind_output(self.model.output_name, self.device_type, self.device_id)
        self.model.session.run_with_iobinding(binding)
        return binding.get_outputs()[0]

    def predict(self, batch: Batch) -> list[FinishedMask]:
        with self.clock("infer"):
            scores = self.run(self.to_device(batch, flipped=False))
            flipped = self.run(self.to_device(batch, flipped=True)) if self.tta else None
        masks: list[FinishedMask] = []
        with self.clock("postprocess"):
            for start, stop in runs_of_equal(batch.sizes):
                masks += [FinishedMask(m[0]) for m in self.masks(scores, flipped, start, stop, batch.sizes[start])]
        return masks

    def masks(self, scores: ort.OrtValue, flipped: ort.OrtValue | None, start: int, stop: int, size: tuple[int, int]) -> np.ndarray:
        """Masks of images start..stop-1 (all of ``size``): (k, 1, H, W) uint8, copied to the host."""
        _, _, h, w = scores.shape()
        k = stop - start
        per_image = h * w * np.dtype(self.score_dtype).itemsize
        binding = self.post.io_binding()
        names = [("scores", scores)] + ([("flipped", flipped)] if flipped is not None else [])
        for name, value in names:
            binding.bind_input(
                name, self.device_type, self.device_id, self.score_dtype, [k, 1, h, w], value.data_ptr() + start * per_image
            )
        binding.bind_cpu_input("sizes", np.array([k, 1, *size], dtype=np.int64))
        binding.bind_output("mask", "cpu")
        self.post.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()


def runs_of_equal(values: list) -> list[tuple[int, int]]:
    """[start, stop) ranges of consecutive equal values."""
    runs, start = [], 0
    for i in range(1, len(values) + 1):
        if i == len(values) or values[i] != values[start]:
            runs.append((start, i))
            start = i
    return runs
