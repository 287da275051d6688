"""Export a trained U-Net to an ONNX file that describes itself (see docs/onnx-contract.md).

The graph takes raw ``uint8`` RGB photos, normalizes them itself in FP32, runs the U-Net in FP16 (or
FP32) and returns FP32 logits, with dynamic batch, height and width. BatchNorm is folded into the
convolutions in FP32 before any cast, so the FP16 weights are rounded once from exact values. The
graph is traced with ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), which states
the "multiple of 2**depth" rule in the input's symbolic shape and needs no FP16 converter pass.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from torch import nn
from torch.export import Dim
from torch.nn.utils.fusion import fuse_conv_bn_eval

from batch.core.contract import ContractError, ModelContract
from batch.core.files import write_atomic as write_file_atomic
from batch.core.logs import first_line, quiet_loggers
from export.config import ExportError, ExportOptions
from unet import __version__
from unet.checkpoint import load_checkpoint, model_from_checkpoint
from unet.model import UNet, nearest_multiples

log = logging.getLogger(__name__)

FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
INPUT_NAME, OUTPUT_NAME = "image", "logits"


class UInt8UNet(nn.Module):
    """Raw photos in, FP32 logits out: the layout, normalization and precision around a U-Net.

    The normalization ``(pixel / 255 - mean) / std`` runs in FP32 on purpose (3 channels, negligible
    cost), and is written as ``(pixel - 255 mean) * (1 / (255 std))``: one subtract and one multiply.
    Only then is the tensor cast to the network's dtype; the logits are cast back to FP32.
    """

    def __init__(self, net: UNet, pixel_mean: Sequence[float], pixel_std: Sequence[float], layout: str):
        super().__init__()
        self.net, self.layout = net, layout
        self.compute_dtype = next(net.parameters()).dtype  # float16 or float32
        mean = torch.tensor(pixel_mean, dtype=torch.float64).view(1, 3, 1, 1)
        std = torch.tensor(pixel_std, dtype=torch.float64).view(1, 3, 1, 1)
        self.register_buffer("offset", (255 * mean).float())  # (1, 3, 1, 1)
        self.register_buffer("scale", (1 / (255 * std)).float())  # (1, 3, 1, 1)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        # image: (N, H, W, 3) uint8 for NHWC, (N, 3, H, W) uint8 for NCHW
        x = image.permute(0, 3, 1, 2) if self.layout == "NHWC" else image  # (N, 3, H, W) uint8: 4x cheaper to move
        x = (x.float() - self.offset) * self.scale  # (N, 3, H, W) float32, normalized
        return self.net(x.to(self.compute_dtype)).float()  # (N, 1, H, W) float32 logits


def export_model(
    model: UNet,
    out: str | Path,
    *,
    input_size: tuple[int, int],
    pixel_mean: Sequence[float],
    pixel_std: Sequence[float],
    fp16: bool = ExportOptions.fp16,
    opset: int = ExportOptions.opset,
    layout: str = ExportOptions.layout,
    provenance: dict | None = None,
) -> ModelContract:
    """Write ``model`` to ``out`` as ONNX with its contract in ``metadata_props``; return the contract.

    The graph input ``image`` is uint8 ``(N, H, W, 3)`` (NHWC) or ``(N, 3, H, W)`` (NCHW), any batch
    and any H, W that are multiples of ``2**depth``; the output ``logits`` is float32 ``(N, 1, H, W)``.
    ``input_size`` (H, W) is the size recorded for the batch runner to resize photos to. ``provenance``
    adds informational keys; ``model_config``, ``opset``, ``export_date``, ``package_version`` and
    ``torch_version`` are always written. The file appears atomically: on any failure nothing is left.
    ``model`` itself is not modified.
    """
    out = Path(out)
    check_options(model, input_size, opset, layout)
    check_output_path(out)
    contract = make_contract(model, input_size, pixel_mean, pixel_std, fp16, opset, layout, provenance)
    net = fold_batchnorm(model)
    check_weights(net, fp16)
    if fp16:
        net = net.half()
    wrapper = UInt8UNet(net, contract.pixel_mean, contract.pixel_std, layout).eval()
    proto = trace(wrapper, contract, opset)
    finish(proto, contract)
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(proto, out)
    log.debug("wrote %s (%s, %.1f MB, opset %d)", out, contract.precision, out.stat().st_size / 1e6, opset)
    return contract


def export_checkpoint(
    checkpoint: str | Path,
    out: str | Path,
    *,
    fp16: bool = ExportOptions.fp16,
    input_size: tuple[int, int] | None = None,
    opset: int = ExportOptions.opset,
    layout: str = ExportOptions.layout,
) -> ModelContract:
    """Export a ``unet-train`` checkpoint (read with ``weights_only=True``) with its provenance.

    ``input_size`` defaults to the checkpoint's training size. Raises ``CheckpointError`` for a file
    that is not a readable checkpoint of ours and ``ExportError`` for one whose contents do not fit.
    """
    checkpoint = Path(checkpoint)
    state, sha256 = load_hashed(checkpoint)
    model = rebuild_model(state, checkpoint)
    size = tuple(input_size) if input_size is not None else tuple(require(state, "input_size", checkpoint))
    return export_model(
        model,
        out,
        input_size=size,
        pixel_mean=require(state, "pixel_mean", checkpoint),
        pixel_std=require(state, "pixel_std", checkpoint),
        fp16=fp16,
        opset=opset,
        layout=layout,
        provenance=checkpoint_provenance(state, checkpoint, sha256),
    )


# ---- checks ---------------------------------------------------------------------------------------


def check_options(model: UNet, input_size: tuple[int, int], opset: int, layout: str) -> None:
    ExportOptions(opset=opset, layout=layout)  # ExportError when either is not supported
    if len(input_size) != 2:
        raise ExportError(f"input size must be (height, width), got {input_size!r}")
    height, width = (int(v) for v in input_size)
    multiple = model.config.multiple
    if height <= 0 or width <= 0 or height % multiple or width % multiple:
        sizes = sorted({f"{h}x{w}" for h in nearest_multiples(height, multiple) for w in nearest_multiples(width, multiple)})
        raise ExportError(
            f"input size {height}x{width} does not suit this U-Net (depth {model.config.depth}): height and "
            f"width must be positive multiples of {multiple}. Try --input-size {' or '.join(sizes)}."
        )


def check_output_path(out: Path) -> None:
    """Fail before the (slow) export when ``out`` cannot be written."""
    if out.is_dir():
        raise ExportError(f"output {out} is a folder: give a file name such as {out / 'model.onnx'}")
    if out.parent.exists() and not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: {out.parent} is a file, not a folder. Choose another -o path.")
    if not out.parent.is_dir():
        raise ExportError(f"cannot write {out}: folder {out.parent} does not exist. Create it first.")
    if not os.access(out.parent, os.W_OK):
        raise ExportError(f"cannot write {out}: folder {out.parent} is not writable. Choose another -o path.")


def check_weights(net: nn.Module, fp16: bool) -> None:
    """Refuse NaN/Inf weights (a diverged run), and for FP16 folded weights beyond its range (65504)."""
    for name, tensor in net.state_dict().items():
        if not tensor.is_floating_point() or not tensor.numel():
            continue
        if not torch.isfinite(tensor).all():
            raise ExportError(f"{name} holds NaN or Inf: the checkpoint is broken (did training diverge?)")
        peak = float(tensor.abs().max())
        if fp16 and peak > FP16_MAX:
            raise ExportError(f"{name} holds {peak:.3g} after BatchNorm folding, beyond FP16's range (65504): export with --fp32")


# ---- building the graph ---------------------------------------------------------------------------


def make_contract(model, input_size, pixel_mean, pixel_std, fp16, opset, layout, provenance) -> ModelContract:
    stamp = {
        "model_config": json.dumps(model.config.to_dict(), sort_keys=True),
        "opset": str(opset),
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "torch_version": torch.__version__,
    }
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (provenance or {}).items()}
    try:
        return ModelContract(
            input_height=int(input_size[0]),
            input_width=int(input_size[1]),
            input_layout=layout,
            input_dtype="uint8",
            input_multiple=model.config.multiple,
            pixel_mean=tuple(float(v) for v in pixel_mean),
            pixel_std=tuple(float(v) for v in pixel_std),
            output_kind="logits",
            threshold=0.5,
            precision="fp16" if fp16 else "fp32",
            provenance=extra | stamp,
        )
    except (ContractError, TypeError) as e:
        raise ExportError(f"cannot describe this model: {e}") from e


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every Conv2d -> BatchNorm2d pair fused into one Conv2d (in FP32)."""
    net = copy.deepcopy(model).float().eval()
    pairs = conv_bn_pairs(net)
    for sequential, conv, bn in pairs:
        setattr(sequential, conv, fuse_conv_bn_eval(getattr(sequential, conv), getattr(sequential, bn)))
        setattr(sequential, bn, nn.Identity())
    log.debug("folded %d BatchNorm layers into their convolutions", len(pairs))
    return net


def conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """(sequential, conv name, batchnorm name) for each Conv2d directly followed by a BatchNorm2d."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if type(getattr(module, first)) is nn.Conv2d and isinstance(getattr(module, second), nn.BatchNorm2d):
                    pairs.append((module, first, second))
    return pairs


def trace(wrapper: UInt8UNet, contract: ModelContract, opset: int) -> onnx.ModelProto:
    """``torch.export`` the wrapper with dynamic batch and spatial axes; return the ONNX model."""
    m = contract.input_multiple
    # batch 2 and unequal sides: example sizes 0, 1 or equal sides would be specialized by torch.export
    shape, (h_axis, w_axis) = (
        ((2, 2 * m, 3 * m, 3), (1, 2)) if contract.input_layout == "NHWC" else ((2, 3, 2 * m, 3 * m), (2, 3))
    )
    example = torch.zeros(shape, dtype=torch.uint8)
    dims = {0: Dim("batch", min=1), h_axis: m * Dim("height_blocks", min=1), w_axis: m * Dim("width_blocks", min=1)}
    with quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            wrapper,
            (example,),
            dynamo=True,
            opset_version=opset,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes={"image": dims},
            external_data=False,
            optimize=True,
            verbose=False,
        )
    return program.model_proto


EXPORTER_LOG_LEVELS = {  # INFO chatter (optimizer passes) out of our logs; warnings and errors still show
    "torch.onnx": logging.WARNING,
    "onnxscript": logging.WARNING,
    "onnx_ir": logging.WARNING,
    "torch.onnx._internal.exporter._registration": logging.ERROR,  # "torchvision is not installed"
}


@contextmanager
def quiet_exporter() -> Iterator[None]:
    """The exporter's loggers at EXPORTER_LOG_LEVELS, and its deprecation notices off, inside the block."""
    with quiet_loggers(EXPORTER_LOG_LEVELS), warnings.catch_warnings():
        warnings.simplefilter("ignore", (DeprecationWarning, FutureWarning))
        yield


def finish(proto: onnx.ModelProto, contract: ModelContract) -> None:
    """Name the dynamic axes, drop the exporter's debug annotations, make ``metadata_props`` the contract."""
    m = contract.input_multiple
    names = {"batch": "batch", f"{m}*height_blocks": "height", f"{m}*width_blocks": "width"}
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        del value.metadata_props[:]
        for dim in value.type.tensor_type.shape.dim:
            if dim.HasField("dim_param") and dim.dim_param in names:
                dim.dim_param = names[dim.dim_param]
    for node in proto.graph.node:  # stack traces with this machine's paths, FX node dumps
        del node.metadata_props[:]
    for tensor in proto.graph.initializer:
        del tensor.metadata_props[:]
    onnx.helper.set_model_props(proto, contract.to_metadata())
    proto.doc_string = (
        f"Carvana U-Net, {contract.precision}: uint8 RGB {contract.input_layout} in (any batch, sides multiples of "
        f"{m}; recorded size {contract.input_height}x{contract.input_width}), float32 logits (N, 1, H, W) out. "
        "Contract in metadata_props (docs/onnx-contract.md)."
    )


def write_atomic(proto: onnx.ModelProto, out: Path) -> None:
    """Serialize to a temp file next to ``out``, flush it to disk, then rename: never a partial ``out``."""
    try:
        write_file_atomic(out, proto.SerializeToString(), durable=True)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}. Choose a writable -o path.") from e


# ---- checkpoints ----------------------------------------------------------------------------------


def load_hashed(checkpoint: Path) -> tuple[dict, str]:
    """Load (weights_only) and SHA-256 the same file; refuse one replaced in between (a training run's best.pt)."""
    before = file_identity(checkpoint)
    sha256 = sha256_file(checkpoint) if before else ""
    state = load_checkpoint(checkpoint, map_location="cpu")  # raises CheckpointError when missing or foreign
    if file_identity(checkpoint) != before:
        raise ExportError(f"{checkpoint} changed while it was read (a training run saving it?): run the export again")
    return state, sha256


def file_identity(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def require(state: dict, key: str, checkpoint: Path):
    if key not in state:
        raise ExportError(
            f"{checkpoint} has no '{key}': it was not written by this version of unet-train. Re-train or re-save it."
        )
    return state[key]


def rebuild_model(state: dict, checkpoint: Path) -> UNet:
    require(state, "model", checkpoint)
    require(state, "model_config", checkpoint)
    try:
        return model_from_checkpoint(state)
    except (RuntimeError, TypeError, ValueError, KeyError, AttributeError) as e:
        raise ExportError(
            f"{checkpoint}: the weights do not fit its model_config ({first_line(e)}). Is the file damaged or edited?"
        ) from e


def checkpoint_provenance(state: dict, checkpoint: Path, sha256: str) -> dict[str, str]:
    size = state.get("input_size")
    found = {
        "train_images": state.get("train_images"),
        "val_images": state.get("val_images"),
        "val_dice": state.get("val_dice"),
        "val_cars": ",".join(state["val_cars"]) if state.get("val_cars") else None,
        "epoch": state.get("epoch"),
        "train_input_size": f"{size[0]}x{size[1]}" if size else None,
        "source_checkpoint": str(checkpoint.resolve()),
        "source_checkpoint_sha256": sha256,
        "checkpoint_version": state.get("version"),
    }
    return {k: v if isinstance(v, str) else repr(v) for k, v in found.items() if v is not None}
