"""What an export and its verification are asked for, importable without torch (``unet-export``'s defaults).

Each option set is a frozen dataclass checked when it is made, so a bad value fails before any slow
work (loading a checkpoint, tracing, calibrating) and the functions that take one pass it on whole.
"""

from __future__ import annotations

from dataclasses import dataclass

from batch.core.devices import parse_device
from batch.core.errors import CarvanaError
from batch.inference.config import OPENVINO_PRECISIONS, RUNTIMES, runtime_device_conflict

DEFAULT_OPSET = 18  # the exporter's native opset: no version conversion; ORT >= 1.14, TensorRT 10+ parse it
MIN_OPSET = 17  # reached through ONNX's version converter (tested); lower ones are not tested
MAX_OPSET = 21  # highest opset tested here (ONNX Runtime 1.32, CPU provider)
LAYOUTS = ("NHWC", "NCHW")
VERIFY_RUNTIMES = tuple(r for r in RUNTIMES if r != "auto")  # verification names the runtime it checks under


class ExportError(CarvanaError):
    """An export that cannot be done as asked; the message names the file or option and the fix."""


@dataclass(frozen=True)
class ExportOptions:
    """The graph to write. ``input_size`` must also suit the network (a multiple of its ``multiple``),
    which only the export can check: it knows the network."""

    fp16: bool = True  # weights and compute in FP16 (inputs uint8 and logits FP32 either way)
    opset: int = DEFAULT_OPSET
    layout: str = "NHWC"  # of the uint8 image input: (N, H, W, 3) or (N, 3, H, W)
    input_size: tuple[int, int] | None = None  # (H, W) recorded for the batch runner; None: the checkpoint's training size

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")
        if self.input_size is not None:
            object.__setattr__(self, "input_size", check_size(self.input_size))


@dataclass(frozen=True)
class VerifyOptions:
    """How an export is checked against PyTorch (docs/export.md, "The parity report")."""

    limit: int = 8  # photos checked, spread over the folder
    device: str = "auto"  # ONNX Runtime device: auto, cpu, cuda or cuda:N (stored in canonical form)
    rtol: float = 1e-4  # FP32: max |onnx - torch| / max |torch| over an image's logits
    min_dice: float = 0.999  # FP16 and INT8: full-resolution Dice of the ONNX mask against PyTorch's
    min_car: float = 0.01  # a mask Dice tests something only where PyTorch's car covers this share of the photo, and
    # leaves as much background: on a (near-)empty or (near-)full mask two models agree whatever they compute
    runtime: str = "onnxruntime"  # what runs the ONNX file: onnxruntime (on ``device``) or openvino (on the CPU)
    openvino_precision: str = "f32"  # with openvino: f32, or bf16 (judged by its masks, like FP16 and INT8)

    def __post_init__(self) -> None:
        if self.runtime not in VERIFY_RUNTIMES:
            raise ExportError(f"runtime must be one of {', '.join(VERIFY_RUNTIMES)}, not {self.runtime!r}")
        if self.openvino_precision not in OPENVINO_PRECISIONS:
            choices = ", ".join(OPENVINO_PRECISIONS)
            raise ExportError(f"OpenVINO precision must be one of {choices}, not {self.openvino_precision!r}")
        if self.openvino_precision != "f32" and self.runtime != "openvino":
            raise ExportError(f"an OpenVINO precision ({self.openvino_precision}) needs runtime openvino")
        if self.limit < 1:
            raise ExportError(f"limit must be at least 1 photo, not {self.limit}")
        if self.rtol <= 0 or not 0 < self.min_dice <= 1:
            raise ExportError(f"rtol must be positive and min_dice in (0, 1], not {self.rtol} and {self.min_dice}")
        if not 0 <= self.min_car < 0.5:
            raise ExportError(f"min_car must be in [0, 0.5), not {self.min_car}")
        object.__setattr__(self, "device", str(parse_device(self.device)))  # a DeviceError names the choices
        conflict = runtime_device_conflict(self.runtime, self.device)
        if conflict:
            raise ExportError(conflict)
        if self.runtime == "openvino":
            object.__setattr__(self, "device", "cpu")  # auto: OpenVINO runs on the CPU


@dataclass(frozen=True)
class QuantizeOptions:
    """INT8 calibration: how many photos the activation ranges come from."""

    calibration_images: int = 32  # photos the activation ranges come from, spread over the folder

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ExportError(f"calibration needs at least 1 photo, not {self.calibration_images}")


# The defaults the functions take: frozen, so one instance serves every call.
EXPORT_DEFAULTS = ExportOptions()
FP32_EXPORT = ExportOptions(fp16=False)  # what INT8 quantizes
VERIFY_DEFAULTS = VerifyOptions()
QUANTIZE_DEFAULTS = QuantizeOptions()


def check_size(size: tuple[int, int]) -> tuple[int, int]:
    """``size`` as a (height, width) tuple of positive ints; ExportError otherwise."""
    try:
        height, width = (int(side) for side in size)
    except (TypeError, ValueError):
        raise ExportError(f"input size must be (height, width), got {size!r}") from None
    if height <= 0 or width <= 0:
        raise ExportError(f"input size must be positive, got {height}x{width}")
    return height, width
