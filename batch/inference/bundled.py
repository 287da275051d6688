"""The models that ship inside the package (``batch/models/``), and which one a device gets.

- ``default.onnx``: FP32, runs everywhere (the fallback);
- ``default-int8.onnx`` (optional): for the CPU, where ONNX Runtime's integer kernels are faster;
- ``default-fp16.onnx`` (optional): for CUDA GPUs.

The model card (docs/model.md) says which files this release carries and how they were made.
"""

from __future__ import annotations

import importlib.resources
from pathlib import Path

from batch.core.devices import Device, parse_device
from batch.inference.runtime import CUDA_PROVIDER, onnxruntime

DEFAULT_MODEL = "default.onnx"
MODEL_FOR = {"cpu": "default-int8.onnx", "cuda": "default-fp16.onnx"}  # the preferred file per device kind, when shipped


def models_folder() -> Path:
    """Where the bundled models are (package data; a pip install keeps them as plain files)."""
    return Path(str(importlib.resources.files("batch").joinpath("models")))


def default_model_path(device: str | Device = "auto") -> Path:
    """The bundled model for ``device`` (``auto``, ``cpu``, ``cuda``, ``cuda:N``): the device's own file if this
    installation has it (INT8 on the CPU, FP16 on a GPU), else ``default.onnx``.

    ``auto`` counts as ``cuda`` when this onnxruntime has a CUDA provider. Raises
    :class:`FileNotFoundError` when the installation carries no bundled model.
    """
    device = parse_device(device)
    folder = models_folder()
    candidates = [folder / DEFAULT_MODEL]
    if any((folder / name).is_file() for name in MODEL_FOR.values()):
        candidates.insert(0, folder / MODEL_FOR[device_kind(device)])
    for path in candidates:
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"this installation has no bundled model ({folder / DEFAULT_MODEL}); pass the path of an ONNX file "
        "made by `unet-export to-onnx` (--model PATH, or model=PATH in Python)"
    )


def device_kind(device: Device) -> str:
    """``cpu`` or ``cuda``: what ``device`` will run on (``auto``: CUDA when this onnxruntime has the provider)."""
    if device.kind != "auto":
        return device.kind
    return "cuda" if CUDA_PROVIDER in onnxruntime().get_available_providers() else "cpu"
