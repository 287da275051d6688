"""INT8 export: ONNX Runtime's static quantization of the FP32 export, calibrated on real photos.

The checkpoint is exported in FP32 (:func:`export.onnx_export.export_checkpoint`), then quantized by
``onnxruntime.quantization.quantize_static`` in the QDQ format, the one ONNX Runtime's CPU provider
fuses into integer kernels (``QLinearConv``, ``QLinearConcat``, uint8 ``MaxPool``):

- weights: int8, one scale per output channel, in 7 bits (``reduce_range``): x86 CPUs without VNNI
  multiply uint8 by int8 with ``vpmaddubsw``, whose 16-bit sums saturate with full 8-bit weights
  (measured on the bundled model: mask Dice 0.93 against FP32 with 8 bits, 0.9996 with 7);
- activations: uint8, one scale per tensor, from the min/max seen on the calibration photos;
- FP32 on purpose: the uint8 input and the in-graph normalization (3 channels, negligible cost), the
  stem (the convolutions before the first pooling: they see the normalized photo at full
  resolution and cost about 6 % of the FLOPs) and the head, so the logits come out in FP32.

Calibration photos go through the runner's own preprocessing (``batch.core.images.load_resized_rgb``,
then ``batch.core.contract.prepare_input``), so the ranges are those inference will see. Photos of the
checkpoint's validation cars (``val_cars``) are left out, so that its validation score stays a score
on unseen cars. The file records ``precision: int8`` and the calibration set (count and SHA-256).
"""

from __future__ import annotations

import hashlib
import io
import logging
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import onnx
import onnxruntime
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quant_pre_process, quantize_static
from tqdm import tqdm

from batch.core.contract import ModelContract, prepare_input
from batch.core.files import spread_evenly
from batch.core.images import DECODE_ERRORS, load_resized_rgb
from batch.core.logs import first_line
from export.config import FP32_EXPORT, QUANTIZE_DEFAULTS, ExportError, ExportOptions, QuantizeOptions
from export.onnx_export import check_output_path, export_checkpoint, stamp, write_atomic
from export.verify import VerifyError, list_photos
from unet.data import car_id

log = logging.getLogger(__name__)

QUANTIZED_OPS = ("Conv", "ConvTranspose", "MaxPool", "Concat", "Relu", "Resize")  # Relu folds into the ranges
QUANTIZATION = (
    "onnxruntime {version} quantize_static, QDQ: weights int8 per channel (7-bit range), activations uint8 per "
    "tensor (MinMax calibration); FP32: input normalization, stem convolutions, head and logits"
)


class QuantizeError(ExportError):
    """A quantization that cannot be done (no usable calibration photos, a graph ONNX Runtime cannot quantize)."""


@dataclass(frozen=True)
class CalibrationSet:
    """The photos the activation ranges come from, prepared exactly as the batch runner prepares them."""

    names: tuple[str, ...]  # file names, in the order used
    inputs: tuple[np.ndarray, ...]  # each (1, H, W, 3) or (1, 3, H, W): what the graph's input takes
    sha256: str  # SHA-256 of `sha256sum`'s output for the photos: "<file sha256>  <name>" lines, in order
    source: Path  # the folder

    def provenance(self) -> dict[str, str]:
        return {
            "calibration_images": str(len(self.names)),
            "calibration_sha256": self.sha256,
            "calibration_source": str(self.source.resolve()),
        }


class CalibrationReader(CalibrationDataReader):
    """The calibration photos for ``quantize_static``, one per run, with a progress bar."""

    def __init__(self, calibration: CalibrationSet, input_name: str, progress: bool):
        self.feeds: Iterator[np.ndarray] = iter(
            tqdm(calibration.inputs, desc="calibrate", unit="img", disable=not progress, leave=False)
        )
        self.input_name = input_name

    def get_next(self) -> dict[str, np.ndarray] | None:
        x = next(self.feeds, None)
        return None if x is None else {self.input_name: x}


def quantize_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    calibrate: str | Path,
    options: ExportOptions = FP32_EXPORT,
    quantization: QuantizeOptions = QUANTIZE_DEFAULTS,
    *,
    progress: bool = True,
) -> ModelContract:
    """Export ``checkpoint`` as an INT8 (QDQ) ONNX model at ``out``, calibrated on photos of the folder ``calibrate``.

    ``options`` shape the FP32 graph that is quantized (so ``fp16`` must be False). Up to
    ``quantization.calibration_images`` photos spread over the sorted folder, less the checkpoint's
    validation cars and unreadable files (logged). Raises ``QuantizeError`` (no usable photo, a graph
    ONNX Runtime cannot quantize) and whatever :func:`export_checkpoint` raises; on any failure ``out``
    is not touched. Returns the contract written to the file (``precision="int8"``).
    """
    if options.fp16:
        raise QuantizeError("INT8 quantizes the FP32 graph: pass ExportOptions(fp16=False)")
    out = Path(out)
    check_output_path(out)  # the cheap checks first: the export and the calibration take seconds
    photos = list_calibration_photos(Path(calibrate))
    with tempfile.TemporaryDirectory(prefix="unet-int8-") as scratch:
        fp32 = Path(scratch) / "fp32.onnx"
        export_checkpoint(checkpoint, fp32, options)
        return quantize_model(fp32, out, photos, quantization, progress=progress, source=checkpoint)


def quantize_model(
    fp32: str | Path,
    out: str | Path,
    photos: Sequence[Path],
    options: QuantizeOptions = QUANTIZE_DEFAULTS,
    *,
    progress: bool = False,
    source: str | Path | None = None,
) -> ModelContract:
    """Quantize ``fp32``, an FP32 file from ``unet-export`` (contract in its metadata), to INT8 at ``out``.

    Calibrated on up to ``options.calibration_images`` of ``photos``, less those of the validation cars
    the file records. ``source`` (default ``fp32``) is what error messages name. Returns the new contract.
    """
    fp32, out, source = Path(fp32), Path(out), source or fp32
    contract = read_fp32_contract(fp32, source)
    calibration = load_calibration(photos, contract, options.calibration_images)
    proto = quantize(fp32, calibration, progress, source)
    contract = record_quantization(contract, calibration)
    stamp(proto, contract, kind="int8 (QDQ)", use="For ONNX Runtime's CPU provider. ")
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(proto, out)
    log.debug("wrote %s (int8, %.1f MB, calibrated on %d photos)", out, out.stat().st_size / 1e6, len(calibration.names))
    return contract


def list_calibration_photos(folder: Path) -> list[Path]:
    try:
        return list_photos(folder, "--calibrate")
    except VerifyError as e:
        raise QuantizeError(str(e)) from e


def read_fp32_contract(fp32: Path, source: str | Path) -> ModelContract:
    """The contract in ``fp32``'s metadata; QuantizeError unless it is an FP32 export."""
    meta = {p.key: p.value for p in onnx.load(str(fp32), load_external_data=False).metadata_props}
    contract = ModelContract.from_metadata(meta, source=str(fp32))
    if contract.precision != "fp32":
        raise QuantizeError(f"{source} is a {contract.precision} model: quantize an FP32 export (unet-export --fp32)")
    return contract


def record_quantization(contract: ModelContract, calibration: CalibrationSet) -> ModelContract:
    """The INT8 file's contract: ``precision="int8"``, and the calibration set and method in its provenance."""
    provenance = calibration.provenance() | {"quantization": QUANTIZATION.format(version=onnxruntime.__version__)}
    return replace(contract, precision="int8", provenance=contract.provenance | provenance)


# ---- calibration photos -----------------------------------------------------------------------------


def load_calibration(photos: Sequence[Path], contract: ModelContract, count: int) -> CalibrationSet:
    """Up to ``count`` of ``photos`` (validation cars left out), decoded and prepared for the graph's input."""
    if not photos:
        raise QuantizeError("no calibration photos given: pass photos like the ones the model will segment")
    folder = photos[0].parent
    val_cars = set(filter(None, contract.provenance.get("val_cars", "").split(",")))
    eligible = [p for p in photos if car_id(p.stem) not in val_cars]
    if len(eligible) < len(photos):
        log.info("calibration: left out %d photos of the checkpoint's validation cars", len(photos) - len(eligible))
    names, inputs, lines = [], [], []
    for photo in spread_evenly(eligible, count) if eligible else []:
        try:
            data = photo.read_bytes()
            rgb = load_resized_rgb(io.BytesIO(data), contract.input_size).pixels  # (h, w, 3) uint8
        except DECODE_ERRORS as e:
            log.warning("calibration: skipped %s, which cannot be read (%s)", photo, first_line(e))
            continue
        names.append(photo.name)
        inputs.append(prepare_input(rgb[None], contract))  # what batch.inference.model feeds the graph
        lines.append(f"{hashlib.sha256(data).hexdigest()}  {photo.name}\n")
    if not names:
        why = "they are all photos of the checkpoint's validation cars" if not eligible else "none of them can be read"
        raise QuantizeError(f"no usable calibration photos in {folder}: {why}. Point --calibrate at a folder of training photos.")
    digest = hashlib.sha256("".join(lines).encode()).hexdigest()
    return CalibrationSet(tuple(names), tuple(inputs), digest, folder)


# ---- quantization -----------------------------------------------------------------------------------


def quantize(fp32: Path, calibration: CalibrationSet, progress: bool, source: str | Path) -> onnx.ModelProto:
    """ONNX Runtime's pre-processing and static QDQ quantization of the file ``fp32``; ``source`` names it in errors."""
    graph = onnx.load(str(fp32)).graph
    with tempfile.TemporaryDirectory(prefix="unet-int8-") as scratch:
        prepared, int8 = Path(scratch) / "prepared.onnx", Path(scratch) / "int8.onnx"
        try:
            quant_pre_process(str(fp32), str(prepared), skip_symbolic_shape=True)  # ONNX shape inference, ORT fusions
            quantize_static(
                str(prepared),
                str(int8),
                CalibrationReader(calibration, graph.input[0].name, progress),
                quant_format=QuantFormat.QDQ,
                per_channel=True,
                reduce_range=True,
                activation_type=QuantType.QUInt8,
                weight_type=QuantType.QInt8,
                op_types_to_quantize=list(QUANTIZED_OPS),
                nodes_to_exclude=find_float_nodes(graph),
            )
        except Exception as e:  # onnxruntime raises its own types and plain Exceptions from its Python tools
            raise QuantizeError(
                f"{source}: ONNX Runtime cannot quantize this model ({first_line(e)}). Export it with --fp32 instead."
            ) from e
        proto = onnx.load(str(int8))
    if not any(node.op_type == "QuantizeLinear" for node in proto.graph.node):
        raise QuantizeError(f"{source}: ONNX Runtime quantized none of its layers. Export it with --fp32 instead.")
    return proto


def find_float_nodes(graph: onnx.GraphProto) -> list[str]:
    """Nodes kept in FP32: the stem's convolutions (all before the first MaxPool) and the head.

    The head is the last convolution: its output is the logits, or, in a folded U-Net, the blocks of
    logits that a DepthToSpace unfolds (so it is not the node that writes the graph's output).
    """
    stem = []
    for node in graph.node:  # topological order
        if node.op_type == "MaxPool":
            break
        if node.op_type == "Conv":
            stem.append(node.name)
    head = [node.name for node in graph.node if node.op_type == "Conv"][-1:]
    return stem + head
