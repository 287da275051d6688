"""The input/output contract an exported model carries in its ONNX ``metadata_props``.

Written by ``unet-export`` (``ModelContract.to_metadata``), read by the batch runner and by any other
tool (``ModelContract.from_metadata``). All values are strings; see docs/onnx-contract.md.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Literal

Layout = Literal["NCHW", "NHWC"]
OutputKind = Literal["logits", "probabilities"]

CONTRACT_VERSION = "1"


class ContractError(ValueError):
    """Metadata that is missing or malformed; the message names the key and the fix."""


@dataclass(frozen=True)
class ModelContract:
    input_height: int  # recorded input size (the graph accepts any multiple of input_multiple)
    input_width: int
    input_layout: Layout = "NHWC"  # layout of the graph input: (N, H, W, 3) or (N, 3, H, W)
    input_dtype: str = "uint8"  # "uint8": the graph normalizes itself; "float32"/"float16": feed normalized pixels
    input_multiple: int = 16  # input height and width must be multiples of this (2**depth)
    pixel_mean: tuple[float, float, float] = (0.485, 0.456, 0.406)  # normalization: (pixel / 255 - mean) / std
    pixel_std: tuple[float, float, float] = (0.229, 0.224, 0.225)
    output_kind: OutputKind = "logits"  # what the (N, 1, H, W) output holds
    threshold: float = 0.5  # probability above which a pixel is car
    precision: str = "fp16"  # "fp16" or "fp32": the graph's weights and compute
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
    def from_metadata(cls, meta: dict[str, str], source: str = "model") -> "ModelContract":
        """Parse ``metadata_props``; ``source`` (the file name) goes into every error message."""

        def need(key: str) -> str:
            if key not in meta:
                raise ContractError(
                    f"{source} has no '{key}' in its metadata: export it with `unet-export to-onnx`, "
                    "or add the keys listed in docs/onnx-contract.md"
                )
            return meta[key]

        def floats(key: str) -> tuple[float, ...]:
            try:
                return tuple(float(v) for v in need(key).split(","))
            except ValueError as e:
                raise ContractError(f"{source}: metadata '{key}' = {meta[key]!r} is not comma-separated numbers") from e

        try:
            known = {
                "input_height": int(need("input_height")),
                "input_width": int(need("input_width")),
                "input_layout": meta.get("input_layout", "NCHW"),
                "input_dtype": meta.get("input_dtype", "float32"),
                "input_multiple": int(meta.get("input_multiple", "1")),
                "pixel_mean": floats("pixel_mean"),
                "pixel_std": floats("pixel_std"),
                "output_kind": meta.get("output_kind", "logits"),
                "threshold": float(meta.get("threshold", "0.5")),
                "precision": meta.get("precision", "unknown"),
            }
        except ValueError as e:
            if isinstance(e, ContractError):
                raise
            raise ContractError(f"{source}: malformed metadata ({e})") from e
        provenance = {k: v for k, v in meta.items() if k not in known and k != "contract_version"}
        try:
            return cls(**known, provenance=provenance)
        except ContractError as e:
            raise ContractError(f"{source}: {e}") from e
