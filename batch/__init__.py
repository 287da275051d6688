"""Batch segmentation of car photos with an exported ONNX U-Net (no torch needed).

    from batch import Segmenter
    mask = Segmenter()("car.jpg")  # (H, W) uint8, 255 = car

    import batch
    report = batch.segment("photos/", "masks/", device="cpu")  # what `unet-batch segment` does
    print(batch.evaluate("masks/", "truth/").mean_dice)        # what `unet-batch evaluate` does

The package's layers import one way, each only from those above it in this list:

- ``batch.core``: images, masks, the ONNX contract, files, devices, logs, errors (numpy and Pillow only;
  ``unet/`` and ``export/`` use it too);
- ``batch.inference``: ONNX Runtime sessions, the model, decoders, post-processing, :class:`Segmenter`;
- ``batch.runs``: runs over folders and buckets: storage, plan, formats, outputs, the local and Ray engines, the report;
- ``batch.evaluation``: masks against the truth;
- ``batch.cli``: ``unet-batch``, one module per command.

The public names below are imported on first use, so that ``import batch`` stays cheap and works
without ONNX Runtime (the mask, RLE and file helpers need only numpy and Pillow). See docs/api.md.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from batch.core.images import ImageError
    from batch.evaluation import Evaluation, evaluate
    from batch.inference.bundled import default_model_path
    from batch.inference.decode import Failure, Item
    from batch.inference.segmenter import InferenceError, Segmenter
    from batch.runs.config import ClusterConfig, RunConfig
    from batch.runs.report import Report
    from batch.runs.run import segment

EXPORTS = {  # public name -> the module that defines it
    "Segmenter": "batch.inference.segmenter",
    "InferenceError": "batch.inference.segmenter",
    "Item": "batch.inference.decode",
    "Failure": "batch.inference.decode",
    "ImageError": "batch.core.images",
    "default_model_path": "batch.inference.bundled",
    "segment": "batch.runs.run",
    "RunConfig": "batch.runs.config",
    "ClusterConfig": "batch.runs.config",
    "Report": "batch.runs.report",
    "evaluate": "batch.evaluation",
    "Evaluation": "batch.evaluation",
}

__all__ = [
    "ClusterConfig",
    "Evaluation",
    "Failure",
    "ImageError",
    "InferenceError",
    "Item",
    "Report",
    "RunConfig",
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
