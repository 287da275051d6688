"""The input/output contract an exported model carries in its ONNX ``metadata_props``.

Written by ``unet-export`` (``ModelContract.to_metadata``), read by the batch runner and by any other
tool (``ModelContract.from_metadata``). All values are strings; see docs/onnx-contract.md.
"""

from __future__ import annotations

import json
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


class ContractError(CarvanaError):
    """Metadata that is missing or malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelContract:
    """The defaults are also what a model whose metadata lacks the key is taken to have (docs/onnx-contract.md)."""

    input_height: int  # recorded input size (the graph accepts any multiple of input_multiple)
    input_width: int
    input_layout: Layout = "NHWC"  # layout of the graph input: (N, H, W, 3) or (N, 3, H, W)
    input_dtype: str = "uint8"  # "uint8": the graph normalizes itself; "float32"/"float16": feed normalized pixels
    input_multiple: int = 1  # input height and width must be multiples of this (2**depth for a U-Net)
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # normalization: (pixel / 255 - mean) / std
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    output_kind: OutputKind = "logits"  # what the (N, 1, H, W) output holds
    threshold: float = 0.5  # probability above which a pixel is car
    precision: str = "unknown"  # "fp16" or "fp32": the graph's weights and compute
    provenance: dict[str, str] = field(default_factory=dict)  # model_config, val_dice, checkpoint SHA-256, ...

    def __post_init__(self) -> None:
        if self.input_height <= 0 or self.input_width <= 0:
            raise ContractError(f"input size {self.input_height}x{self.input_width} must be positive")
        if self.input_multiple <= 0 or self.input_height % self.input_multiple or self.input_width % self.input_multiple:
            raise ContractError(
                f"input size {self.input_height}x{self.input_width} is not a multiple of input_multiple={self.input_multiple}"
            )
        if self.input_layout not in ("NCHW", "NHWC"):
            raise ContractError(f"input_layout must be NCHW or NHWC, not {self.input_layout!r}")
        if self.input_dtype not in ("uint8", "float32", "float16"):
            raise ContractError(f"input_dtype must be uint8, float32 or float16, not {self.input_dtype!r}")
        if self.output_kind not in ("logits", "probabilities"):
            raise ContractError(f"output_kind must be logits or probabilities, not {self.output_kind!r}")
        if not 0 < self.threshold < 1:
            raise ContractError(f"threshold must be a probability in (0, 1), not {self.threshold}")
        if len(self.pixel_mean) != 3 or len(self.pixel_std) != 3 or min(self.pixel_std) <= 0:
            raise ContractError("pixel_mean and pixel_std need three values each, std positive")

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

        known = {}
        for f in fields(cls):
            if f.name == "provenance":
                continue
            if f.name in meta:
                try:
                    known[f.name] = PARSERS[f.name](meta[f.name])
                except ValueError as e:
                    raise ContractError(f"{source}: metadata '{f.name}' = {meta[f.name]!r} is malformed ({e})") from e
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


def floats(text: str) -> tuple[float, ...]:
    """``"0.485,0.456,0.406"`` -> (0.485, 0.456, 0.406)."""
    return tuple(float(v) for v in text.split(","))


PARSERS: dict[str, Callable[[str], object]] = {  # metadata value -> field value, for every field but provenance
    "input_height": int,
    "input_width": int,
    "input_layout": str,
    "input_dtype": str,
    "input_multiple": int,
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
