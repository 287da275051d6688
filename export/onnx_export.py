"""Export a trained U-Net to an ONNX file that describes itself (see docs/onnx-contract.md).

The graph takes raw ``uint8`` RGB photos, normalizes them itself in FP32, runs the U-Net in FP16 (or
FP32) and returns FP32 logits, with dynamic batch, height and width. BatchNorm is folded into the
convolutions in FP32 before any cast, so the FP16 weights are rounded once from exact values. The
graph is traced with ``torch.onnx.export(dynamo=True)`` (``torch.export`` + onnxscript), which states
the "multiple of 2**depth * fold" rule in the input's symbolic shape and needs no FP16 converter pass.

The functions take their options whole (``export.config.ExportOptions``); the network comes with what its
graph needs to know about its training as a :class:`TrainedModel`.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import onnx
import torch
from onnxscript import opset18 as onnx_op
from torch import nn
from torch.export import Dim
from torch.nn.utils.fusion import fuse_conv_bn_eval

from batch.core.contract import ContractError, ModelContract
from batch.core.files import write_atomic as write_file_atomic
from batch.core.logs import first_line, quiet_loggers
from export.config import EXPORT_DEFAULTS, ExportError, ExportOptions, check_size
from unet import __version__
from unet.checkpoint import load_checkpoint, model_from_checkpoint
from unet.config import UNetConfig
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


@dataclass(frozen=True)
class TrainedModel:
    """A network with what its graph must know beyond the weights: how its inputs were normalized,
    the size it was trained at (the size recorded when the options name none) and where it comes from."""

    net: UNet
    pixel_mean: tuple[float, float, float]  # RGB: (pixel / 255 - mean) / std, as in training
    pixel_std: tuple[float, float, float]
    train_size: tuple[int, int] | None = None  # (H, W)
    provenance: Mapping[str, object] = field(default_factory=dict)  # written to the file (non-strings as JSON)
    source: str = "the model"  # what error messages call it: the checkpoint's path

    def __post_init__(self) -> None:
        object.__setattr__(self, "pixel_mean", tuple(self.pixel_mean))
        object.__setattr__(self, "pixel_std", tuple(self.pixel_std))
        if self.train_size is not None:
            object.__setattr__(self, "train_size", check_size(self.train_size))


def export_checkpoint(checkpoint: str | Path, out: str | Path, options: ExportOptions = EXPORT_DEFAULTS) -> ModelContract:
    """Export a ``unet-train`` checkpoint (read with ``weights_only=True``) with its provenance.

    ``options.input_size`` defaults to the checkpoint's training size. Raises ``CheckpointError`` for a
    file that is not a readable checkpoint of ours and ``ExportError`` for one whose contents do not fit.
    """
    return export_model(read_checkpoint(Path(checkpoint)), out, options)


def export_model(trained: TrainedModel, out: str | Path, options: ExportOptions = EXPORT_DEFAULTS) -> ModelContract:
    """Write ``trained`` to ``out`` as ONNX with its contract in ``metadata_props``; return the contract.

    The graph input ``image`` is uint8 ``(N, H, W, 3)`` (NHWC) or ``(N, 3, H, W)`` (NCHW), any batch
    and any H, W that are multiples of the network's ``multiple`` (``2**depth * fold``); the output
    ``logits`` is float32 ``(N, 1, H, W)``. The recorded input size (what the batch runner resizes
    photos to) is ``options.input_size``, else the training size. Besides ``trained.provenance``,
    ``model_config``, ``opset``, ``export_date``, ``package_version`` and ``torch_version`` are always
    written. The file appears atomically: on any failure nothing is left. The network is not modified.
    """
    out = Path(out)
    size = choose_input_size(trained, options)
    check_output_path(out)
    contract = make_contract(trained, size, options)
    net = take_block_major_channels(fold_batchnorm(trained.net))
    check_weights(net, options.fp16)
    if options.fp16:
        net = net.half()
    wrapper = UInt8UNet(net, contract.pixel_mean, contract.pixel_std, options.layout).eval()
    proto = trace(wrapper, contract, options.opset, translate_fold())
    finish(proto, contract)
    onnx.checker.check_model(proto, full_check=True)
    write_atomic(proto, out)
    log.debug("wrote %s (%s, %.1f MB, opset %d)", out, contract.precision, out.stat().st_size / 1e6, options.opset)
    return contract


# ---- checks ---------------------------------------------------------------------------------------


def choose_input_size(trained: TrainedModel, options: ExportOptions) -> tuple[int, int]:
    """The size to record: the options', else the training size; either must suit the network."""
    size = options.input_size or trained.train_size
    if size is None:
        raise ExportError(f"{trained.source} has no 'input_size': {MISSING_KEY}")
    check_input_size(trained.net.config, size)
    return size


def check_input_size(config: UNetConfig, size: tuple[int, int]) -> None:
    height, width = size
    multiple = config.multiple
    if height % multiple or width % multiple:
        sizes = sorted({f"{h}x{w}" for h in nearest_multiples(height, multiple) for w in nearest_multiples(width, multiple)})
        fold = f", fold {config.fold}" if config.fold > 1 else ""
        raise ExportError(
            f"input size {height}x{width} does not suit this U-Net (depth {config.depth}{fold}): height and "
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


def make_contract(trained: TrainedModel, size: tuple[int, int], options: ExportOptions) -> ModelContract:
    stamp = {
        "model_config": json.dumps(trained.net.config.to_dict(), sort_keys=True),
        "opset": str(options.opset),
        "export_date": datetime.now(UTC).isoformat(timespec="seconds"),
        "package_version": __version__,
        "torch_version": torch.__version__,
    }
    extra = {k: v if isinstance(v, str) else json.dumps(v) for k, v in trained.provenance.items()}
    try:
        return ModelContract(
            input_height=size[0],
            input_width=size[1],
            input_layout=options.layout,
            input_dtype="uint8",
            input_multiple=trained.net.config.multiple,
            pixel_mean=tuple(float(v) for v in trained.pixel_mean),
            pixel_std=tuple(float(v) for v in trained.pixel_std),
            output_kind="logits",
            threshold=0.5,
            precision="fp16" if options.fp16 else "fp32",
            provenance=extra | stamp,
        )
    except (ContractError, TypeError, ValueError) as e:
        raise ExportError(f"cannot describe this model: {e}") from e


def fold_batchnorm(model: nn.Module) -> nn.Module:
    """A copy of ``model`` in eval mode with every Conv2d -> BatchNorm2d pair fused into one Conv2d (in FP32)."""
    net = copy.deepcopy(model).float().eval()
    pairs = find_conv_bn_pairs(net)
    for sequential, conv, bn in pairs:
        setattr(sequential, conv, fuse_conv_bn_eval(getattr(sequential, conv), getattr(sequential, bn)))
        setattr(sequential, bn, nn.Identity())
    log.debug("folded %d BatchNorm layers into their convolutions", len(pairs))
    return net


def find_conv_bn_pairs(model: nn.Module) -> list[tuple[nn.Sequential, str, str]]:
    """(sequential, conv name, batchnorm name) for each Conv2d directly followed by a BatchNorm2d."""
    pairs = []
    for module in model.modules():
        if isinstance(module, nn.Sequential):
            names = list(module._modules)
            for first, second in zip(names, names[1:]):
                if type(getattr(module, first)) is nn.Conv2d and isinstance(getattr(module, second), nn.BatchNorm2d):
                    pairs.append((module, first, second))
    return pairs


def block_major_order(config: UNetConfig) -> list[int]:
    """For each channel of ONNX ``SpaceToDepth``'s output, block-major (channel ``b C + c`` holds pixel ``b`` of
    the block, of input channel ``c``), the channel of ``pixel_unshuffle``'s output, channel-major
    (``c f^2 + b``), that holds the same values."""
    channels, blocks = config.in_channels, config.fold**2
    return [channel * blocks + block for block in range(blocks) for channel in range(channels)]


def take_block_major_channels(net: nn.Module) -> nn.Module:
    """``net`` (the export's own copy), its first convolution's input channels reordered to ``SpaceToDepth``'s order.

    A folded U-Net's ``pixel_unshuffle`` orders channels colour-major, ONNX ``SpaceToDepth`` block-major.
    Rather than a ``Gather`` that moves the values into the network's order, the convolution that reads them
    takes its weights in ``SpaceToDepth``'s order (exact: the same sums, term for term). The graph is then
    plain ``SpaceToDepth -> Conv``, which runtimes map to their kernels; OpenVINO 2026.4 fuses a channel
    ``Gather`` into the next convolution wrongly (logits off by 35%), which this shape never meets.
    An unfolded network is returned as it is.
    """
    config = net.config
    if config.fold == 1:
        return net
    first = net.stem[0]  # the stem's first Conv2d: the only reader of the folded input
    with torch.no_grad():
        first.weight.copy_(first.weight[:, block_major_order(config)])  # indexing copies: no alias
    return net


def translate_fold() -> dict:
    """The exporter's translation of a folded U-Net's space-to-depth: ONNX ``SpaceToDepth`` alone.

    The exporter's own translation of ``aten::pixel_unshuffle`` is Reshape -> Transpose -> Reshape with a
    dozen nodes of shape arithmetic, because ``SpaceToDepth`` orders the channels block-major and
    ``pixel_unshuffle`` channel-major. One ``SpaceToDepth`` is right for a network whose first convolution
    reads block-major channels: :func:`take_block_major_channels` makes the export's copy so. The unfold
    needs nothing: ``pixel_shuffle`` becomes ``DepthToSpace`` in CRD mode, its exact order.
    """

    def space_to_depth(self, downscale_factor: int):
        return onnx_op.SpaceToDepth(self, blocksize=downscale_factor)  # (N, f^2 C, H/f, W/f), block-major

    return {torch.ops.aten.pixel_unshuffle.default: space_to_depth}


def trace(wrapper: UInt8UNet, contract: ModelContract, opset: int, translations: dict) -> onnx.ModelProto:
    """``torch.export`` the wrapper with dynamic batch and spatial axes; return the ONNX model.

    ``translations``: ONNX translations of aten operators that replace the exporter's own.
    """
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
            custom_translation_table=translations,
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
    # torch.export's graph signature and range constraints: the latter printed in an order that varies with
    # PYTHONHASHSEED, so the same export would give different bytes from one run to the next
    del proto.graph.metadata_props[:]
    for tensor in proto.graph.initializer:
        del tensor.metadata_props[:]
    stamp(proto, contract)


def stamp(proto: onnx.ModelProto, contract: ModelContract, kind: str = "", use: str = "") -> None:
    """Make ``metadata_props`` the contract, and say in the doc string what the file is (``kind``: the
    precision unless given) and, in ``use``, where it is meant to run."""
    onnx.helper.set_model_props(proto, contract.to_metadata())  # replaces whatever was there
    proto.doc_string = (
        f"Carvana U-Net, {kind or contract.precision}: uint8 RGB {contract.input_layout} in (any batch, sides multiples "
        f"of {contract.input_multiple}; recorded size {contract.input_height}x{contract.input_width}), float32 logits "
        f"(N, 1, H, W) out. {use}Contract in metadata_props (docs/onnx-contract.md)."
    )


def write_atomic(proto: onnx.ModelProto, out: Path) -> None:
    """Serialize to a temp file next to ``out``, flush it to disk, then rename: never a partial ``out``."""
    try:
        write_file_atomic(out, proto.SerializeToString(), durable=True)
    except OSError as e:
        raise ExportError(f"cannot write {out}: {e.strerror or e}. Choose a writable -o path.") from e


# ---- checkpoints ----------------------------------------------------------------------------------


def read_checkpoint(checkpoint: Path) -> TrainedModel:
    """The network of a ``unet-train`` checkpoint, its normalization, training size and provenance."""
    state, sha256 = load_hashed(checkpoint)
    net = rebuild_model(state, checkpoint)
    return TrainedModel(
        net,
        pixel_mean=require(state, "pixel_mean", checkpoint),
        pixel_std=require(state, "pixel_std", checkpoint),
        train_size=state.get("input_size"),
        provenance=describe_checkpoint(state, checkpoint, sha256),
        source=str(checkpoint),
    )


def load_hashed(checkpoint: Path) -> tuple[dict, str]:
    """Load (weights_only) and SHA-256 the same file; refuse one replaced in between (a training run's best.pt)."""
    before = identify_file(checkpoint)
    sha256 = hash_file(checkpoint) if before else ""
    state = load_checkpoint(checkpoint, map_location="cpu")  # raises CheckpointError when missing or foreign
    if identify_file(checkpoint) != before:
        raise ExportError(f"{checkpoint} changed while it was read (a training run saving it?): run the export again")
    return state, sha256


def identify_file(path: Path) -> tuple[int, int, int] | None:
    """(inode, mtime, size): what changes when a file is replaced or rewritten; None for no file."""
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_ino, st.st_mtime_ns, st.st_size


def hash_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


MISSING_KEY = "it was not written by this version of unet-train. Re-train or re-save it."


def require(state: dict, key: str, checkpoint: Path):
    if key not in state:
        raise ExportError(f"{checkpoint} has no '{key}': {MISSING_KEY}")
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


def describe_checkpoint(state: dict, checkpoint: Path, sha256: str) -> dict[str, str]:
    """The provenance keys a checkpoint gives its export (those it has)."""
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
