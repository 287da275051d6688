"""From low-resolution model output to full-size binary masks, without torch.

The reference semantics are those of ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` and ONNX ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")``:
resize the (h, w) logits bilinearly to the photo's (H, W), then threshold. Two implementations:

- :func:`upsample_threshold` (CPU, numpy): exact, but only interpolates where it matters. Bilinear
  interpolation is a convex combination of the four surrounding source values, so an output pixel
  whose four sources are all above (or all below) the threshold is decided without arithmetic.
  Only the thin band of source cells that straddle the threshold (the car's outline) is
  interpolated: a 1918x1280 mask costs about as much as copying it.
- :func:`build_postprocess_model` (GPU): a tiny ONNX graph (flip-average for TTA, Resize, Greater,
  Cast) that ONNX Runtime's CUDA provider runs on device buffers, so only uint8 masks leave the GPU.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np

from batch.core.contract import probability_to_logit
from batch.core.extras import require

if TYPE_CHECKING:
    import onnx

MASK_ON = 255  # value of a car pixel in the uint8 masks this module returns


def threshold_in_output_units(threshold: float, output_kind: str) -> float:
    """A probability threshold as a cut on the model's output: a logit for ``logits``, else itself."""
    return probability_to_logit(threshold) if output_kind == "logits" else threshold


UNSURE_LOGITS = math.log(3)  # a pixel is "unsure" within this many logits of the cut: probability 0.25..0.75 at 0.5


def unsure_band(threshold: float, output_kind: str) -> tuple[float, float]:
    """The scores, in the model's output units, of the pixels the model is unsure of: within ln 3 logits of the cut."""
    cut = probability_to_logit(threshold)
    low, high = cut - UNSURE_LOGITS, cut + UNSURE_LOGITS
    if output_kind == "logits":
        return low, high
    return 1 / (1 + math.exp(-low)), 1 / (1 + math.exp(-high))


def mask_confidence(scores: np.ndarray, cut: float, band: tuple[float, float]) -> float:
    """How sure the model is of a mask, in [0, 1], from its low-resolution scores: 1 - (unsure pixels / car pixels).

    Unsure pixels are those within ``band`` of the cut (probability 0.25..0.75 at the default threshold); a
    mask whose outline is sharp scores near 1, one with a blurred outline or a smeared shadow lower, and a
    mask with no car 0. On the validation cars, the 10 % least confident photos held 8 of the 12 whose
    Dice is below 0.99 (docs/model.md). NaN or infinite scores give 0.
    """
    car = int(np.count_nonzero(scores > cut))
    if car == 0 or not np.isfinite(scores).all():
        return 0.0
    unsure = int(np.count_nonzero((scores > band[0]) & (scores < band[1])))
    return max(0.0, 1.0 - unsure / car)


def source_coordinates(out_size: int, in_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear sampling along one axis: (i0, i1, weight of i1), each (out_size,)."""
    position = (np.arange(out_size, dtype=np.float64) + 0.5) * (in_size / out_size) - 0.5
    position = np.clip(position, 0.0, in_size - 1)
    i0 = np.floor(position).astype(np.intp)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (position - i0).astype(np.float32)


def upsample_threshold(scores: np.ndarray, size: tuple[int, int], cut: float) -> np.ndarray:
    """``scores`` (h, w) -> (H, W) uint8 mask (0 or 255) of ``bilinear_resize(scores) > cut``."""
    height, width = size
    scores = np.asarray(scores, dtype=np.float32)
    y0, y1, wy = source_coordinates(height, scores.shape[0])
    x0, x1, wx = source_coordinates(width, scores.shape[1])

    # A cell (i, j) holds the output pixels whose top-left source is (i, j); its corners are
    # (i, j), (i + 1, j), (i, j + 1), (i + 1, j + 1), clamped at the last row and column.
    above = np.pad(scores > cut, ((0, 1), (0, 1)), mode="edge")  # (h + 1, w + 1)
    corners = (above[:-1, :-1], above[1:, :-1], above[:-1, 1:], above[1:, 1:])
    all_above = corners[0] & corners[1] & corners[2] & corners[3]  # (h, w)
    any_above = corners[0] | corners[1] | corners[2] | corners[3]

    # y0 and x0 are sorted, so a cell's pixels are a block of rows_per_cell x cols_per_cell.
    rows_per_cell = np.bincount(y0, minlength=scores.shape[0])
    cols_per_cell = np.bincount(x0, minlength=scores.shape[1])

    # Uniform cells: every output pixel takes its cell's value (a gather of columns, (h, W), then each row
    # repeated: a copy of whole rows, 10% faster than a gather of them).
    cell_value = all_above.astype(np.uint8) * MASK_ON  # (h, w)
    mask = np.repeat(np.take(cell_value, x0, axis=1), rows_per_cell, axis=0)  # (H, W)

    # Mixed cells: interpolate exactly, only at the output pixels they hold.
    rows, cols = pixels_of_cells(any_above & ~all_above, rows_per_cell, cols_per_cell)
    if rows.size:
        ty, tx = wy[rows], wx[cols]
        top = scores[y0[rows], x0[cols]] * (1 - tx) + scores[y0[rows], x1[cols]] * tx
        bottom = scores[y1[rows], x0[cols]] * (1 - tx) + scores[y1[rows], x1[cols]] * tx
        mask[rows, cols] = np.where(top * (1 - ty) + bottom * ty > cut, MASK_ON, 0)
    return mask


def pixels_of_cells(cells: np.ndarray, rows_per_cell: np.ndarray, cols_per_cell: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Output (row, col) indices of every pixel in the selected cells; cells (h, w) bool."""
    ci, cj = np.nonzero(cells)  # (K,) each
    if ci.size == 0:
        return ci, cj
    first_row = np.concatenate([[0], np.cumsum(rows_per_cell)[:-1]])
    first_col = np.concatenate([[0], np.cumsum(cols_per_cell)[:-1]])
    tall, wide = int(rows_per_cell.max()), int(cols_per_cell.max())
    dy = np.arange(tall)[None, :, None]  # (1, tall, 1)
    dx = np.arange(wide)[None, None, :]  # (1, 1, wide)
    inside = (dy < rows_per_cell[ci][:, None, None]) & (dx < cols_per_cell[cj][:, None, None])  # (K, tall, wide)
    rows = np.broadcast_to(first_row[ci][:, None, None] + dy, inside.shape)[inside]
    cols = np.broadcast_to(first_col[cj][:, None, None] + dx, inside.shape)[inside]
    return rows, cols


def bilinear_resize(scores: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Plain half-pixel bilinear resize of (h, w) -> (H, W) float32: the reference the tests check against."""
    y0, y1, wy = source_coordinates(size[0], scores.shape[0])
    x0, x1, wx = source_coordinates(size[1], scores.shape[1])
    scores = np.asarray(scores, dtype=np.float32)
    top = scores[y0][:, x0] * (1 - wx) + scores[y0][:, x1] * wx  # (H, W)
    bottom = scores[y1][:, x0] * (1 - wx) + scores[y1][:, x1] * wx
    return top * (1 - wy[:, None]) + bottom * wy[:, None]


def average_flipped(scores: np.ndarray, flipped_scores: np.ndarray) -> np.ndarray:
    """Test-time augmentation: mean of a prediction and the un-flipped prediction of the mirrored input.

    Both (N, 1, h, w); ``flipped_scores`` is the model's output for horizontally flipped inputs.
    """
    return (scores + flipped_scores[..., ::-1]) * 0.5


def build_postprocess_model(score_dtype: int, cut: float, tta: bool, opset: int = 17) -> onnx.ModelProto:
    """ONNX graph: scores (N, 1, h, w) [+ flipped (N, 1, h, w)], sizes int64[4] -> mask uint8 (N, 1, H, W).

    ``sizes`` is (N, 1, H, W). Values are 0 or 255. ``score_dtype`` is an ``onnx.TensorProto`` type
    (FLOAT or FLOAT16); interpolation runs in float32 either way.
    """
    onnx = require("onnx", "cpu", what="the GPU post-processing graph")
    TensorProto, helper = onnx.TensorProto, onnx.helper
    nodes = [helper.make_node("Cast", ["scores"], ["scores32"], to=TensorProto.FLOAT)]
    inputs = [helper.make_tensor_value_info("scores", score_dtype, ["N", 1, "h", "w"])]
    initializers = [
        helper.make_tensor("cut", TensorProto.FLOAT, [], [cut]),
        helper.make_tensor("on", TensorProto.UINT8, [], [MASK_ON]),
        helper.make_tensor("zero", TensorProto.UINT8, [], [0]),
    ]
    resized_input = "scores32"
    if tta:
        inputs.append(helper.make_tensor_value_info("flipped", score_dtype, ["N", 1, "h", "w"]))
        initializers += [
            helper.make_tensor("start", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("end", TensorProto.INT64, [1], [-(2**63)]),
            helper.make_tensor("axis", TensorProto.INT64, [1], [3]),
            helper.make_tensor("step", TensorProto.INT64, [1], [-1]),
            helper.make_tensor("half", TensorProto.FLOAT, [], [0.5]),
        ]
        nodes += [
            helper.make_node("Cast", ["flipped"], ["flipped32"], to=TensorProto.FLOAT),
            helper.make_node("Slice", ["flipped32", "start", "end", "axis", "step"], ["unflipped"]),  # reverse W
            helper.make_node("Add", ["scores32", "unflipped"], ["summed"]),
            helper.make_node("Mul", ["summed", "half"], ["averaged"]),
        ]
        resized_input = "averaged"
    inputs.append(helper.make_tensor_value_info("sizes", TensorProto.INT64, [4]))
    nodes += [
        helper.make_node(
            "Resize", [resized_input, "", "", "sizes"], ["resized"], mode="linear", coordinate_transformation_mode="half_pixel"
        ),
        helper.make_node("Greater", ["resized", "cut"], ["car"]),
        helper.make_node("Where", ["car", "on", "zero"], ["mask"]),
    ]
    graph = helper.make_graph(
        nodes,
        "unet_batch_postprocess",
        inputs,
        [helper.make_tensor_value_info("mask", TensorProto.UINT8, ["N", 1, "H", "W"])],
        initializer=initializers,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="unet-batch")
    model.ir_version = 8  # the oldest IR for opset 17: any onnxruntime(-gpu) >= 1.20 runs it
    onnx.checker.check_model(model)
    return model
