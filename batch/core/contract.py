"""The input/output contract an exported model carries in its ONNX ``metadata_props``.

Written by ``unet-export`` (``ModelContract.to_metadata``), read by the batch runner and by any other
tool (``ModelContract.from_metadata``). All values are strings; see docs/onnx-contract.md.

A model file may come from anywhere, and its metadata sizes the work (input sizes, normalization,
the threshold): values are checked before anything is sized by them, with bounds no real model comes
near (8192 pixels a side, 64 megapixels, normalized pixels within float16's range), so that a hostile
or broken file is a :class:`ContractError` naming the file and the key, never an allocation of
gigabytes, a NaN mask or a traceback.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, fields
from typing import Literal

import numpy as np

from batch.core.errors import CarvanaError

Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["logits", "probabilities"]

CONTRACT_VERSION = "1"
IMAGENET_MEAN = (0.485, 0.456, 0.406)  # RGB normalization of the ImageNet-style inputs: (pixel / 255 - mean) / std
IMAGENET_STD = (0.229, 0.224, 0.225)
LAYOUTS = ("NCHW", "NHWC")
DTYPES = ("uint8", "float32", "float16")
OUTPUT_KINDS = ("logits", "probabilities")
PRECISIONS = ("fp32", "fp16", "int8", "unknown")
MAX_INPUT_SIDE = 8192  # pixels; the models here take 320x480 to 1280x1920
MAX_INPUT_PIXELS = 64_000_000
MAX_MEAN = 10.0  # |mean| and std bound the normalized pixel (x / 255 - mean) / std well inside float16's 65504
STD_RANGE = (1e-3, 1e3)
MAX_METADATA_KEYS = 1000
MAX_KEY_CHARS = 256
MAX_CONTRACT_VALUE_CHARS = 256  # a number, a name or three numbers
MAX_PROVENANCE_VALUE_CHARS = 64 * 1024  # model_config JSON and the validation cars' ids are a few KB
WHOLE_NUMBER = re.compile(r"-?[0-9]+")  # ASCII digits only: int() also takes '٣٢', '+3' and '1_000'
FIX = "export the model again with `unet-export to-onnx`, or correct the key (docs/onnx-contract.md)"


class ContractError(CarvanaError):
    """Metadata that is missing or malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelContract:
    """The defaults are also what a model whose metadata lacks the key is taken to have (docs/onnx-contract.md)."""

    input_height: int  # recorded input size (the graph accepts any multiple of input_multiple)
    input_width: int
    input_layout: Layout = "NHWC"  # layout of the graph input: (N, H, W, 3) or (N, 3, H, W)
    input_dtype: str = "uint8"  # "uint8": the graph normalizes itself; "float32"/"float16": feed normalized pixels
    input_multiple: int = 1  # input height and width must be multiples of this (2**depth * fold for a U-Net)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # normalization: (pixel / 255 - mean) / std
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    output_kind: OutputKind = "logits"  # what the (N, 1, H, W) output holds
    threshold: float = 0.5  # probability above which a pixel is car
    precision: str = "unknown"  # "fp16", "fp32" or "int8": the graph's weights and compute
    provenance: dict[str, str] = field(default_factory=dict)  # model_config, val_dice, checkpoint SHA-256, ...

    def __post_init__(self) -> None:
        """Every value checked, each message naming its key: the contract may come from a file anyone wrote."""
        self.check_size()
        for key, value, allowed in (
            ("input_layout", self.input_layout, LAYOUTS),
            ("input_dtype", self.input_dtype, DTYPES),
            ("output_kind", self.output_kind, OUTPUT_KINDS),
            ("precision", self.precision, PRECISIONS),
        ):
            if value not in allowed:
                raise ContractError(f"'{key}' must be {', '.join(allowed)}, not {value!r}; {FIX}")
        self.check_normalization()
        if not (is_real(self.threshold) and 0 < self.threshold < 1):
            raise ContractError(f"'threshold' must be a probability in (0, 1), not {self.threshold!r}; {FIX}")

    def check_size(self) -> None:
        sizes = {"input_height": self.input_height, "input_width": self.input_width, "input_multiple": self.input_multiple}
        for key, value in sizes.items():
            if not (isinstance(value, int) and not isinstance(value, bool) and value > 0):
                raise ContractError(f"'{key}' must be a positive whole number, not {value!r}; {FIX}")
        height, width, multiple = sizes.values()
        if max(height, width) > MAX_INPUT_SIDE or height * width > MAX_INPUT_PIXELS:
            raise ContractError(
                f"'input_height' x 'input_width' = {height}x{width} is past the {MAX_INPUT_SIDE} pixels a side and "
                f"{MAX_INPUT_PIXELS / 1e6:.0f} megapixels a model may ask for; {FIX}"
            )
        if height % multiple or width % multiple:
            raise ContractError(f"input size {height}x{width} is not a multiple of 'input_multiple' = {multiple}; {FIX}")

    def check_normalization(self) -> None:
        for key, values in (("pixel_mean", self.pixel_mean), ("pixel_std", self.pixel_std)):
            if not (isinstance(values, tuple) and len(values) == 3 and all(map(is_real, values))):
                raise ContractError(f"'{key}' must be three finite numbers (R, G, B), not {values!r}; {FIX}")
        if max(map(abs, self.pixel_mean)) > MAX_MEAN:
            raise ContractError(f"'pixel_mean' {self.pixel_mean} is past ±{MAX_MEAN:g} (pixels are 0..1); {FIX}")
        low, high = STD_RANGE
        if not all(low <= v <= high for v in self.pixel_std):
            raise ContractError(f"'pixel_std' {self.pixel_std} must lie in [{low:g}, {high:g}] (std positive); {FIX}")

    @property
    def input_size(self) -> tuple[int, int]:
        return self.input_height, self.input_width

    def to_metadata(self) -> dict[str, str]:
        meta = {
            "contract_version": CONTRACT_VERSION,
            "input_height": str(self.input_height),
            "input_width": str(self.input_width),
            "input_layout": self.input_layout,
            "input_dtype": self.input_dtype,
            "input_multiple": str(self.input_multiple),
            "pixel_mean": ",".join(repr(float(v)) for v in self.pixel_mean),
            "pixel_std": ",".join(repr(float(v)) for v in self.pixel_std),
            "output_kind": self.output_kind,
            "threshold": repr(float(self.threshold)),
            "precision": self.precision,
        }
        clash = meta.keys() & self.provenance.keys()
        if clash:
            raise ContractError(f"provenance keys {sorted(clash)} clash with contract keys")
        return meta | {k: v if isinstance(v, str) else json.dumps(v) for k, v in self.provenance.items()}

    @classmethod
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> ModelContract:
        """Parse ``metadata_props``; ``source`` (the file name) goes into every error message."""

        check_metadata_shape(meta, source)
        version = meta.get("contract_version", CONTRACT_VERSION)
        if version != CONTRACT_VERSION:
            raise ContractError(
                f"{source}: metadata 'contract_version' = {version!r} is not the version this package reads "
                f"({CONTRACT_VERSION}): upgrade unet-batch, or export the model again with this one's `unet-export to-onnx`"
            )
        known = {}
        for f in fields(cls):
            if f.name == "provenance":
                continue
            if f.name in meta:
                try:
                    known[f.name] = PARSERS[f.name](meta[f.name])
                except ValueError as e:
                    raise ContractError(f"{source}: metadata '{f.name}' = {meta[f.name]!r} is malformed ({e}); {FIX}") from e
            elif f.default is MISSING:
                raise ContractError(
                    f"{source} has no '{f.name}' in its metadata: export it with `unet-export to-onnx`, "
                    "or add the keys listed in docs/onnx-contract.md"
                )
        provenance = {k: v for k, v in meta.items() if k not in PARSERS and k != "contract_version"}
        try:
            return cls(**known, provenance=provenance)
        except ContractError as e:
            raise ContractError(f"{source}: {e}") from e


def check_metadata_shape(meta: dict[str, str], source: str) -> None:
    """A :class:`ContractError` for metadata no exporter writes: too many keys, keys or values too long, not strings
    (checked before any value is parsed, so that none costs more than its bound)."""
    if len(meta) > MAX_METADATA_KEYS:
        raise ContractError(f"{source}: metadata has {len(meta)} keys, more than {MAX_METADATA_KEYS}; {FIX}")
    for key, value in meta.items():
        if not (isinstance(key, str) and isinstance(value, str)):
            raise ContractError(f"{source}: metadata key {str(key)[:40]!r} has a value that is not a string; {FIX}")
        limit = MAX_CONTRACT_VALUE_CHARS if key in PARSERS or key == "contract_version" else MAX_PROVENANCE_VALUE_CHARS
        if len(key) > MAX_KEY_CHARS or len(value) > limit:
            raise ContractError(
                f"{source}: metadata '{key[:40]}' has a {len(key)}-character key or {len(value)}-character value, "
                f"more than the {MAX_KEY_CHARS} and {limit} allowed; {FIX}"
            )


def is_real(value: object) -> bool:
    """A finite int or float (not a bool, not NaN or infinite)."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def whole_number(text: str) -> int:
    """``"320"`` -> 320; ASCII digits only (``int`` also reads Unicode digits, ``+`` and ``_``)."""
    if not WHOLE_NUMBER.fullmatch(text):
        raise ValueError("not a whole number in ASCII digits")
    return int(text)


def floats(text: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> (0.485, 0.456, 0.406)."""
    return tuple(float(v) for v in text.split(","))


PARSERS: dict[str, Callable[[str], object]] = {  # metadata value -> field value, for every field but provenance
    "input_height": whole_number,
    "input_width": whole_number,
    "input_layout": str,
    "input_dtype": str,
    "input_multiple": whole_number,
    "pixel_mean": floats,
    "pixel_std": floats,
    "output_kind": str,
    "threshold": float,
    "precision": str,
}


def probability_to_logit(probability: float | np.ndarray) -> float | np.ndarray:
    """The logit whose sigmoid is ``probability`` (in (0, 1)): where a probability threshold cuts logits.

    A float for a float; an array of the same shape and dtype for an array.
    """
    logit = np.log(probability / (1.0 - probability))
    return float(logit) if np.ndim(logit) == 0 else logit


def prepare_input(pixels: np.ndarray, contract: ModelContract) -> np.ndarray:
    """(N, H, W, 3) uint8 RGB -> what the graph's input wants (NHWC/NCHW, uint8 or normalized float)."""
    x = pixels
    if contract.input_dtype != "uint8":
        mean = np.asarray(contract.pixel_mean, dtype=np.float32) * 255.0
        inv_std = 1.0 / (np.asarray(contract.pixel_std, dtype=np.float32) * 255.0)
        x = ((pixels.astype(np.float32) - mean) * inv_std).astype(contract.input_dtype, copy=False)
    if contract.input_layout == "NCHW":
        x = x.transpose(0, 3, 1, 2)  # (N, 3, H, W)
    return np.ascontiguousarray(x)
