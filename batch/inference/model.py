"""Inference stage: the exported model in ONNX Runtime or OpenVINO on the CPU, or ONNX Runtime on a CUDA GPU.

- :func:`load_model` reads and checks the ONNX file and its contract (batch/core/contract.py), then
  opens it as a :class:`Network` (:mod:`batch.inference.runtime_choice` says which runtime): an
  ``InferenceSession`` with explicit providers, or OpenVINO's compiled model on the CPU. ``cuda``
  that cannot be honoured (no CUDA provider in this onnxruntime, no GPU, missing CUDA libraries) is
  a :class:`DeviceError`, never a silent CPU run; ``auto`` picks the GPU when it works and says which
  it took.
- :class:`CpuPredictor`: host arrays in, low-resolution scores out, through either runtime; the
  upsample + threshold to each photo's size (:func:`batch.inference.postprocess.upsample_threshold`)
  runs later, in the writer threads.
- :class:`BoundPredictor`: IOBinding on the session's device (the CUDA path). Inputs come as device
  buffers (DALI's GPU output) or are uploaded once, every batch padded to one shape; only the
  low-resolution scores come back to the host, and the writers upsample them as on the CPU. It
  also runs with CPU buffers, which is how the tests cover it.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto

from batch.core.contract import ContractError, ModelContract, prepare_input
from batch.core.devices import parse_device
from batch.core.errors import CarvanaError
from batch.core.masks import FullMask
from batch.core.timing import StageClock
from batch.inference.decode import Batch
from batch.inference.postprocess import (
    Extent,
    average_flipped,
    mask_confidence,
    outline,
    photo_scores,
    score_extent,
    threshold_in_output_units,
    unsure_band,
)
from batch.inference.runtime import CUDA_PROVIDER, ModelError, OnnxRuntimeNetwork, device_for_precision
from batch.inference.runtime_choice import RuntimeChoice, RuntimeRequest, open_network

log = logging.getLogger(__name__)


class Network(Protocol):
    """A compiled model, whatever runs it: :class:`~batch.inference.runtime.OnnxRuntimeNetwork` or
    :class:`~batch.inference.openvino_runtime.OpenVinoNetwork`."""

    name: str  # the runtime: onnxruntime | openvino
    provider: str  # what runs the graph: ONNX Runtime's execution provider, or "OpenVINO CPU"
    precision: str  # the arithmetic: as exported, or OpenVINO's inference precision (f32, bf16)
    streams: int  # batches it runs at once, each called from its own thread

    def run(self, x: np.ndarray) -> np.ndarray:
        """A batch of the model's input (batch.core.contract.prepare_input) -> its (N, 1, h, w) scores; thread-safe."""
        ...

    def describe(self) -> dict[str, str]:
        """The runtime's name, version and precision."""
        ...


@dataclass
class Model:
    path: Path
    contract: ModelContract
    network: Network
    runtime: RuntimeChoice  # which runtime runs it, and why
    device: str  # "cpu" or "cuda:N"

    @property
    def provider(self) -> str:
        return self.network.provider

    @property
    def session(self) -> ort.InferenceSession:
        """The ONNX Runtime session (the IOBinding path); a :class:`ModelError` when OpenVINO runs the model."""
        return self.onnxruntime_network().session

    @property
    def input_name(self) -> str:
        return self.onnxruntime_network().input_name

    @property
    def output_name(self) -> str:
        return self.onnxruntime_network().output_name

    def onnxruntime_network(self) -> OnnxRuntimeNetwork:
        if not isinstance(self.network, OnnxRuntimeNetwork):
            raise ModelError(f"{self.path} runs under {self.network.name}, which has no ONNX Runtime session")
        return self.network

    @property
    def on_gpu(self) -> bool:
        return self.device.startswith("cuda")

    @property
    def device_index(self) -> int:
        return int(self.device.split(":")[1]) if self.on_gpu else 0

    def describe_runtime(self) -> dict:
        """report.json's ``runtime``: which runtime runs the model, its version and precision, why it was chosen, and
        how many batches it runs at once."""
        return self.runtime.describe(self.network.describe()["version"]) | {"streams": self.network.streams}

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


def load_model(
    path: Path,
    device: str = "auto",
    threads: int | None = None,
    verbose: bool = False,
    runtime: str = "auto",
    streams: int | None = None,
) -> Model:
    """Open ``path`` on ``device`` (auto, cpu, cuda, cuda:N) with ``runtime`` (auto, onnxruntime, openvino: see
    :mod:`batch.inference.runtime_choice`), its CPU ``threads`` split into ``streams`` (None: the runtime's choice);
    :class:`ModelError` / :class:`DeviceError` on failure."""
    device = parse_device(device)
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model file {path} does not exist")
    contract = read_contract(path)
    device = device_for_precision(device, contract.precision, path)  # INT8: CPU only
    network, choice = open_network(path, contract, device, RuntimeRequest(runtime, threads, verbose, streams))
    on_gpu = network.provider == CUDA_PROVIDER
    return Model(path, contract, network, choice, device=f"cuda:{device.index}" if on_gpu else "cpu")


# ---------------------------------------------------------------------------------------------
# Input preparation on the host (Pillow batches): batch.core.contract.prepare_input, and the mirrored copy for TTA.


def mirrored(pixels: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(pixels[:, :, ::-1])  # (N, H, W, 3) flipped along W


# ---------------------------------------------------------------------------------------------
# Predictions: something the writer turns into a full-size uint8 mask.


class Prediction(Protocol):
    def mask(self) -> np.ndarray:
        """The full-size mask: (H, W) uint8, 0 = background, 255 = car."""
        ...

    def full_mask(self) -> FullMask:
        """The same mask, its pixels or its rows' runs made as a writer needs them."""
        ...

    def confidence(self) -> float:
        """How sure the model is of the mask, in [0, 1] (:func:`batch.inference.postprocess.mask_confidence`); NaN where
        the path that made the mask did not measure it."""
        ...


class Predictor(Protocol):
    streams: int  # batches to have in flight: ``predict`` is called from that many threads at once

    def predict(self, batch: Batch) -> Sequence[Prediction]:
        """One prediction per image of ``batch``, in order; raises what ONNX Runtime raises (out of memory, ...)."""
        ...


def make_predictor(model: Model, threshold: float, tta: bool, batch_size: int, clock: StageClock | None = None) -> Predictor:
    """IOBinding on the device, warmed up for ``batch_size``, for a GPU model; host arrays on the CPU."""
    if model.on_gpu:
        return BoundPredictor(model, threshold, tta, batch_size, clock=clock)
    return CpuPredictor(model, threshold, tta, clock=clock)


class NonFiniteOutput(CarvanaError):
    """The model returned NaN or infinite scores for a photo: no mask is made from them."""


@dataclass
class LowResScores:
    """Model output at the model's size; upsampled and thresholded on demand (in a writer thread)."""

    scores: np.ndarray  # (h, w) float32
    size: tuple[int, int]  # the photo's (H, W)
    cut: float  # threshold in the output's units
    band: tuple[float, float]  # the scores of unsure pixels, in the output's units (mask_confidence)
    extent: Extent | None = None  # the scores' rows and columns that cover the photo (a padded decode); None: all

    def __post_init__(self) -> None:
        self.scores = photo_scores(self.scores, self.extent)[0]  # the photo's own, contiguous: made once, read twice

    def mask(self) -> np.ndarray:
        """The full-size mask (:meth:`full_mask`'s pixels)."""
        return self.full_mask().pixels

    def full_mask(self) -> FullMask:
        """The full-size mask, as pixels or runs on demand; :class:`NonFiniteOutput` when the scores are not all
        finite numbers (a NaN is never car, so thresholding it would write an empty mask that a rerun then keeps
        as done)."""
        if not self.finite:
            raise NonFiniteOutput(
                "the model returned NaN or infinite scores for this photo, so no mask was written; the model file "
                "may be damaged or mis-exported: check it with `unet-export --verify`, or use another model"
            )
        made = outline(self.scores, self.size, self.cut, self.extent)
        return FullMask(made.pixels, made.runs)

    def confidence(self) -> float:
        return mask_confidence(self.scores, self.cut, self.band, self.finite)

    @functools.cached_property
    def finite(self) -> bool:
        """Whether the scores are all finite numbers (checked once for the mask and its confidence)."""
        return bool(np.isfinite(self.scores).all())


def low_res_scores(
    batch: Batch, scores: np.ndarray, contract: ModelContract, cut: float, band: tuple[float, float]
) -> list[LowResScores]:
    """One :class:`LowResScores` per image of ``batch`` from its (N, 1, h, w) ``scores``, each knowing what of them
    covers its photo."""
    contents = batch.contents or [contract.input_size] * len(batch)
    extents = [score_extent(content, contract.input_size, scores.shape[2:]) for content in contents]
    return [LowResScores(scores[i, 0], size, cut, band, extent) for i, (size, extent) in enumerate(zip(batch.sizes, extents))]


class CpuPredictor:
    """The model's network (ONNX Runtime or OpenVINO) on host arrays; post-processing deferred to the writers."""

    def __init__(self, model: Model, threshold: float, tta: bool, clock: StageClock | None = None):
        self.model = model
        self.tta = tta
        self.cut = threshold_in_output_units(threshold, model.contract.output_kind)
        self.band = unsure_band(threshold, model.contract.output_kind)
        self.clock = clock or StageClock()
        self.streams = model.network.streams

    def run(self, x: np.ndarray) -> np.ndarray:
        with self.clock("infer"):
            scores = self.model.network.run(x)  # (N, 1, h, w)
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
        return low_res_scores(batch, scores, self.model.contract, self.cut, self.band)


class BoundPredictor:
    """ONNX Runtime with IOBinding on the model's device (the CUDA path): device inputs in, low-resolution scores out.

    Inputs are device buffers (DALI's GPU batches) or host pixels, prepared and uploaded once. The
    session sees one input shape, ``batch_size`` rows: a partial batch (the last one, DALI's
    one-by-one retries, Pillow's fallbacks) is padded, so that no batch of a new size makes the CUDA
    provider choose kernels mid-run, and that shape runs once before the first batch (:meth:`warm_up`,
    in the Segmenter's set-up time). Only the scores come back to the host (0.6 MB a photo at 320x480
    in float32, where a full-size mask is 2.45 MB); the writers upsample and threshold them, as on
    the CPU, so both devices make their masks with the same code.
    """

    def __init__(
        self,
        model: Model,
        threshold: float,
        tta: bool,
        batch_size: int,
        clock: StageClock | None = None,
        device_type: str | None = None,
    ):
        self.model = model
        self.tta = tta
        self.batch_size = batch_size
        self.streams = 1  # one device, one binding at a time
        self.clock = clock or StageClock()
        self.device_type = device_type or ("cuda" if model.on_gpu else "cpu")
        self.device_id = model.device_index
        self.cut = threshold_in_output_units(threshold, model.contract.output_kind)
        self.band = unsure_band(threshold, model.contract.output_kind)
        self._start_allocator()
        self.warm_up()

    def _start_allocator(self) -> None:
        """Make ONNX Runtime's Python-side allocator for the device now, in this thread.

        ONNX Runtime makes it on first use, in a map that is not thread-safe, and it is first used from
        two threads at once: the decoder's (:meth:`allocate`) and the inference thread's (uploads).
        """
        ort.OrtValue.ortvalue_from_shape_and_type([1], np.uint8, self.device_type, self.device_id)
        ort.OrtValue.ortvalue_from_numpy(np.zeros(1, np.uint8), self.device_type, self.device_id)

    def warm_up(self) -> None:
        """Run the one input shape once: kernel choice and loading, library handles, the memory arena's growth."""
        height, width = self.model.contract.input_size
        self._run(self._upload(prepare_input(np.zeros((self.batch_size, height, width, 3), np.uint8), self.model.contract)), 1)

    def allocate(self, shape: tuple[int, ...], dtype: np.dtype) -> ort.OrtValue:
        """A buffer on the model's device (DALI copies its GPU batches into these, padded to ``batch_size`` rows)."""
        return ort.OrtValue.ortvalue_from_shape_and_type(list(shape), dtype, self.device_type, self.device_id)

    def _upload(self, x: np.ndarray) -> ort.OrtValue:
        """A model input on the host -> on the device, padded to ``batch_size`` rows."""
        padding = self.batch_size - len(x)
        if padding > 0:
            x = np.concatenate([x, np.zeros((padding, *x.shape[1:]), x.dtype)])
        return ort.OrtValue.ortvalue_from_numpy(x, self.device_type, self.device_id)

    def _to_device(self, batch: Batch, flipped: bool) -> ort.OrtValue:
        x = batch.model_input_flipped if flipped else batch.model_input  # DALI's: on the device (padded) or the host
        if x is None:  # a Pillow batch
            x = prepare_input(mirrored(batch.pixels) if flipped else batch.pixels, self.model.contract)
        return self._upload(x) if isinstance(x, np.ndarray) else x

    def _run(self, x: ort.OrtValue, rows: int) -> np.ndarray:
        """The model on a device input; its first ``rows`` scores (rows, 1, h, w) float32, on the host."""
        binding = self.model.session.io_binding()
        binding.bind_ortvalue_input(self.model.input_name, x)
        binding.bind_output(self.model.output_name, "cpu")
        self.model.session.run_with_iobinding(binding)
        return binding.get_outputs()[0].numpy()[:rows].astype(np.float32, copy=False)

    def predict(self, batch: Batch) -> list[LowResScores]:
        with self.clock("infer"):
            scores = self._run(self._to_device(batch, flipped=False), len(batch))
            if self.tta:
                scores = average_flipped(scores, self._run(self._to_device(batch, flipped=True), len(batch)))
        return low_res_scores(batch, scores, self.model.contract, self.cut, self.band)
