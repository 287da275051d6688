"""What an export and its verification are asked for, importable without torch (``unet-export``'s defaults)."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_OPSET = 18  # the exporter's native opset: no version conversion; ORT >= 1.14, TensorRT 10+ parse it
MIN_OPSET = 17  # reached through ONNX's version converter (tested); lower ones are not tested
MAX_OPSET = 21  # highest opset tested here (ONNX Runtime 1.32, CPU provider)
LAYOUTS = ("NHWC", "NCHW")


class ExportError(ValueError):
    """An export that cannot be done as asked; the message names the file or option and the fix."""


@dataclass(frozen=True)
class ExportOptions:
    fp16: bool = True  # weights and compute in FP16 (inputs uint8 and logits FP32 either way)
    opset: int = DEFAULT_OPSET
    layout: str = "NHWC"  # of the uint8 image input: (N, H, W, 3) or (N, 3, H, W)

    def __post_init__(self) -> None:
        if self.layout not in LAYOUTS:
            raise ExportError(f"layout must be one of {', '.join(LAYOUTS)}, not {self.layout!r}")
        if not MIN_OPSET <= self.opset <= MAX_OPSET:
            raise ExportError(f"opset {self.opset} is not supported: choose {MIN_OPSET}..{MAX_OPSET} (default {DEFAULT_OPSET})")


@dataclass(frozen=True)
class VerifyOptions:
    limit: int = 8  # photos checked, spread over the folder
    rtol: float = 1e-4  # FP32: max |onnx - torch| / max |torch| over an image's logits
    min_dice: float = 0.999  # FP16 and INT8: full-resolution Dice of the ONNX mask against PyTorch's

    def __post_init__(self) -> None:
        if self.limit < 1:
            raise ExportError(f"limit must be at least 1 photo, not {self.limit}")
        if self.rtol <= 0 or not 0 < self.min_dice <= 1:
            raise ExportError(f"rtol must be positive and min_dice in (0, 1], not {self.rtol} and {self.min_dice}")


@dataclass(frozen=True)
class QuantizeOptions:
    calibration_images: int = 32  # INT8: photos the activation ranges come from, spread over the folder

    def __post_init__(self) -> None:
        if self.calibration_images < 1:
            raise ExportError(f"calibration needs at least 1 photo, not {self.calibration_images}")
