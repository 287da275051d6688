"""Batch segmentation of car photos with an exported ONNX U-Net (no torch needed).

    from batch import Segmenter
    mask = Segmenter()("car.jpg")  # (H, W) uint8, 255 = car

    import batch
    report = batch.segment("photos/", "masks/", device="cpu")  # what `unet-batch segment` does
    print(batch.evaluate("masks/", "truth/").mean_dice)        # what `unet-batch evaluate` does

The public names below are imported on first use, so that ``import batch`` stays cheap and works
without ONNX Runtime (the mask, RLE and file helpers need only numpy and Pillow). See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch.api import InferenceError, Segmenter
    from batch.bundled import default_model_path
    from batch.config import SegmentConfig
    from batch.decode import Failure, Item
    from batch.evaluation import Evaluation, evaluate
    from batch.images import ImageError
    from batch.report import Report
    from batch.runner import segment

EXPORTS = {  # public name -> the module that defines it
    "Segmenter": "batch.api",
    "InferenceError": "batch.api",
    "Item": "batch.decode",
    "Failure": "batch.decode",
    "ImageError": "batch.images",
    "default_model_path": "batch.bundled",
    "segment": "batch.runner",
    "SegmentConfig": "batch.config",
    "Report": "batch.report",
    "evaluate": "batch.evaluation",
    "Evaluation": "batch.evaluation",
}

__all__ = [
    "Evaluation",
    "Failure",
    "ImageError",
    "InferenceError",
    "Item",
    "Report",
    "SegmentConfig",
    "Segmenter",
    "default_model_path",
    "evaluate",
    "segment",
]


def __getattr__(name: str):
    if name not in EXPORTS:
        raise AttributeError(f"module 'batch' has no attribute {name!r}")
    return getattr(importlib.import_module(EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(EXPORTS))
