"""From low-resolution model output to full-size binary masks, without torch.

The reference semantics are those of ``torch.nn.functional.interpolate(mode="bilinear",
align_corners=False)`` and ONNX ``Resize(mode="linear", coordinate_transformation_mode="half_pixel")``:
resize the (h, w) logits bilinearly to the photo's (H, W), then threshold. Two implementations:

- :func:`outline` (CPU, numpy): exact, but only interpolates where it matters. Bilinear
  interpolation is a convex combination of the four surrounding source values, so an output pixel
  whose four sources are all above (or all below) the threshold is decided without arithmetic.
  Only the thin band of source cells that straddle the threshold (the car's outline) is
  interpolated. From that :class:`Outline` the mask is painted (:func:`upsample_threshold`: a
  1918x1280 mask costs about as much as copying it) or traced into its rows' runs
  (:func:`upsample_threshold_runs`: what the PNG is made from, without the 2.45 MB of pixels).
- :func:`build_postprocess_model` (GPU): a tiny ONNX graph (flip-average for TTA, Resize, Greater,
  Cast) that ONNX Runtime's CUDA provider runs on device buffers, so only uint8 masks leave the GPU.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from batch.core.contract import probability_to_logit
from batch.core.extras import require
from batch.core.masks import MaskRuns, true_at

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


def mask_confidence(scores: np.ndarray, cut: float, band: tuple[float, float], finite: bool | None = None) -> float:
    """How sure the model is of a mask, in [0, 1], from its low-resolution scores: 1 - (unsure pixels / car pixels).

    Unsure pixels are those within ``band`` of the cut (probability 0.25..0.75 at the default threshold); a
    mask whose outline is sharp scores near 1, one with a blurred outline or a smeared shadow lower, and a
    mask with no car 0. On the validation cars, the 10 % least confident photos held 8 of the 12 whose
    Dice is below 0.99 (docs/model.md). NaN or infinite scores give 0 (``finite``: whether they are all finite,
    when the caller knows).
    """
    car = int(np.count_nonzero(scores > cut))
    if car == 0 or not (finite if finite is not None else np.isfinite(scores).all()):
        return 0.0
    unsure = int(np.count_nonzero(scores > band[0])) - int(np.count_nonzero(scores >= band[1]))  # band[0] < s < band[1]
    return max(0.0, 1.0 - unsure / car)


Extent = tuple[float, float]  # the rows and columns of a model's scores that cover the photo (the rest: padding)


def photo_scores(scores: np.ndarray, extent: Extent | None) -> tuple[np.ndarray, Extent]:
    """``scores`` (h, w) float32 without the rows and columns wholly past ``extent`` (None: all of them), and the extent.

    A photo decoded a little short of the model's size is padded (``batch.core.images.fit_rgb``); its scores
    cover ``content * scores / model input`` rows and columns, a fraction where the model's output is
    smaller than its input.
    """
    scores = np.asarray(scores, dtype=np.float32)
    if extent is None:
        return scores, (float(scores.shape[0]), float(scores.shape[1]))
    if not all(0 < e <= side for e, side in zip(extent, scores.shape)):
        raise ValueError(f"extent {extent} is not within the scores' {scores.shape[0]}x{scores.shape[1]}")
    return np.ascontiguousarray(scores[: math.ceil(extent[0]), : math.ceil(extent[1])]), extent  # whole rows: 2x faster passes


def score_extent(content: tuple[int, int], input_size: tuple[int, int], score_size: tuple[int, int]) -> Extent | None:
    """The scores' rows and columns covering a photo that fills ``content`` (h, w) of the model's ``input_size``."""
    if tuple(content) == tuple(input_size):
        return None
    return (content[0] * score_size[0] / input_size[0], content[1] * score_size[1] / input_size[1])


def source_coordinates(out_size: int, in_size: int, extent: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Half-pixel bilinear sampling along one axis: (i0, i1, weight of i1), each (out_size,).

    The output spans the first ``extent`` source pixels (default: all ``in_size``), clamped at the last one.
    """
    scale = (in_size if extent is None else extent) / out_size
    position = (np.arange(out_size, dtype=np.float64) + 0.5) * scale - 0.5
    position = np.clip(position, 0.0, in_size - 1)
    i0 = np.floor(position).astype(np.intp)
    i1 = np.minimum(i0 + 1, in_size - 1)
    return i0, i1, (position - i0).astype(np.float32)


@dataclass(frozen=True)
class _Axis:
    """Half-pixel bilinear sampling along one axis, grouped by cell: the output pixels whose lower source is
    ``i`` are ``first[i]`` .. ``first[i + 1] - 1`` (``low`` is sorted, so a cell's pixels are contiguous)."""

    low: np.ndarray  # (out,) source index at or before each output pixel
    high: np.ndarray  # (out,) the next one, clamped at the last
    weight: np.ndarray  # (out,) float32 weight of ``high``
    first: np.ndarray  # (in + 1,) first output pixel of each source cell; the last entry is ``out``

    @classmethod
    @functools.lru_cache(maxsize=32)  # one per (photo size, score size): a folder's photos share a few
    def of(cls, out_size: int, in_size: int, extent: float) -> _Axis:
        low, high, weight = source_coordinates(out_size, in_size, extent)
        first = np.zeros(in_size + 1, np.intp)
        np.cumsum(np.bincount(low, minlength=in_size), out=first[1:])
        for shared in (low, high, weight, first):  # cached, read by every writer thread
            shared.setflags(write=False)
        return cls(low, high, weight, first)

    def pixels(self, cells: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(how many output pixels each of ``cells`` holds, all those pixels in order): one repeat, no loop."""
        counts = self.first[cells + 1] - self.first[cells]
        ends = np.cumsum(counts)
        return counts, np.repeat(self.first[cells] - (ends - counts), counts) + np.arange(ends[-1] if ends.size else 0)


def upsample_threshold(scores: np.ndarray, size: tuple[int, int], cut: float, extent: Extent | None = None) -> np.ndarray:
    """``scores`` (h, w) -> (H, W) uint8 mask (0 or 255) of ``bilinear_resize(scores, size, extent) > cut``: the
    :class:`Outline`'s pixels."""
    return outline(scores, size, cut, extent).pixels()


def upsample_threshold_runs(scores: np.ndarray, size: tuple[int, int], cut: float, extent: Extent | None = None) -> MaskRuns:
    """The same mask as :func:`upsample_threshold`, as its rows' runs, made without its pixels."""
    return outline(scores, size, cut, extent).runs()


@dataclass(frozen=True, eq=False)  # arrays: compared by identity
class Outline:
    """A thresholded bilinear upsample, decided cell by cell.

    Cell (i, j) holds the output pixels whose top-left source is (i, j); its corners are (i, j), (i + 1, j),
    (i, j + 1), (i + 1, j + 1), clamped at the last row and column. A cell with all four corners above the
    cut is car, one with none is background, without arithmetic; only the pixels of the others (the
    outline's cells, "mixed") are interpolated, in the same float32 operations as :func:`bilinear_resize`.
    All the work is confined to the window of cells a corner above the cut can reach (a car's bounding
    box, about half the frame). The mask is then either painted (:meth:`pixels`: one pass over it) or
    traced into its rows' runs (:meth:`runs`: no pass over it at all).
    """

    size: tuple[int, int]  # the mask's (H, W)
    rows: _Axis
    cols: _Axis
    origin: tuple[int, int]  # the window's first cell (i0, j0)
    all_above: np.ndarray  # (window rows, window cols) bool: the cell's four corners above the cut
    mixed: np.ndarray  # (window rows, window cols) bool: some corners above the cut, not all
    mixed_cells: tuple[np.ndarray, np.ndarray]  # (rows, cols) of the mixed cells, row by row
    mixed_pixels: np.ndarray  # (n,) flat indices r * W + c of the mixed cells' pixels, cell by cell
    car: np.ndarray  # (n,) bool: which of them are car

    def pixels(self) -> np.ndarray:
        """The (H, W) uint8 mask: the window's cells gathered into its output columns once per cell row, each output
        row a copy of its cell row's, written straight into the mask; then the mixed cells' pixels."""
        (i0, j0), (i1, j1) = self.origin, self.window_end
        rows, cols = self.rows, self.cols
        r0, r1, c0, c1 = rows.first[i0], rows.first[i1], cols.first[j0], cols.first[j1]
        band = np.zeros((i1 - i0, cols.low.size), np.uint8)
        band[:, c0:c1] = self.all_above.view(np.uint8)[:, cols.low[c0:c1] - j0] * np.uint8(MASK_ON)
        mask = np.empty(self.size, np.uint8)
        mask[:r0], mask[r1:] = 0, 0
        np.take(band, rows.low[r0:r1] - i0, axis=0, out=mask[r0:r1])
        mask.reshape(-1)[self.mixed_pixels] = self.car.view(np.uint8) * np.uint8(MASK_ON)
        return mask

    def runs(self) -> MaskRuns:
        """The mask's rows as stretches of equal value, from the cells alone.

        Along an output row, two neighbouring cells that are not mixed cannot differ (they share two corners),
        so the value changes only at mixed cells' pixels, or at the first pixel past a mixed cell (which, where
        the mask is smaller than the scores, may also be past cells with no pixel in the row). The stretches
        start at every mixed pixel, at every pixel past a mixed cell, and at every row's first pixel.
        """
        height, width = self.size
        rows, cols = self.rows, self.cols
        # Past each mixed cell: its row's first pixel right of the cell, unless that pixel is a mixed one.
        cell_rows, past = self.mixed_cells[0], cols.first[self.mixed_cells[1] + 1]
        inside = past < width
        cell_rows, past = cell_rows[inside], past[inside]
        past_mixed, past_value = self.cell_state(cell_rows, cols.low[past])
        cell_rows, past, past_value = cell_rows[~past_mixed], past[~past_mixed], past_value[~past_mixed]
        tall, out_rows = rows.pixels(cell_rows)
        past_starts = out_rows * width + np.repeat(past, tall)
        # Each row's first pixel, unless it is a mixed one.
        first_mixed, first_value = self.cell_state(rows.low, np.full(height, cols.low[0]))
        first_starts = np.flatnonzero(~first_mixed) * width
        # One sort of (start, value) pairs packed into one integer: the starts are unique.
        car = self.car.view(np.uint8) * np.uint8(MASK_ON)
        keyed = np.concatenate((self.mixed_pixels, past_starts, first_starts)) << 8
        keyed |= np.concatenate((car, np.repeat(past_value, tall), first_value[~first_mixed]))
        keyed.sort(kind="stable")  # timsort: the events come in long ascending runs
        return MaskRuns(self.size, keyed >> 8, (keyed & 0xFF).astype(np.uint8))

    @property
    def window_end(self) -> tuple[int, int]:
        return self.origin[0] + self.all_above.shape[0], self.origin[1] + self.all_above.shape[1]

    def cell_state(self, cell_rows: np.ndarray, cell_cols: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(mixed, value 0 or 255 where not) of the cells (``cell_rows``, ``cell_cols``): past the window, background."""
        i, j = cell_rows - self.origin[0], cell_cols - self.origin[1]
        inside = (i >= 0) & (i < self.all_above.shape[0]) & (j >= 0) & (j < self.all_above.shape[1])
        mixed, value = np.zeros(i.size, bool), np.zeros(i.size, np.uint8)
        mixed[inside] = self.mixed[i[inside], j[inside]]
        value[inside] = self.all_above[i[inside], j[inside]] * np.uint8(MASK_ON)
        return mixed, value


def outline(scores: np.ndarray, size: tuple[int, int], cut: float, extent: Extent | None = None) -> Outline:
    """The :class:`Outline` of ``bilinear_resize(scores, size, extent) > cut``: the window of cells a corner above the cut
    can reach, which of its cells are car, and the mixed cells' pixels, interpolated."""
    scores, extent = photo_scores(scores, extent)
    rows, cols = _Axis.of(size[0], scores.shape[0], extent[0]), _Axis.of(size[1], scores.shape[1], extent[1])
    above = scores > cut
    hit_rows = np.flatnonzero(above.any(axis=1))
    if hit_rows.size == 0:
        nothing, none = np.zeros((0, 0), bool), np.zeros(0, np.intp)
        return Outline(tuple(size), rows, cols, (0, 0), nothing, nothing, (none, none), none, none.astype(bool))
    i0, i1 = _cells_reaching(hit_rows)
    j0, j1 = _cells_reaching(np.flatnonzero(above[i0 : i1 + 1].any(axis=0)))
    all_above, any_above = _corner_extremes(above[i0 : i1 + 1, j0 : j1 + 1], (i1 - i0, j1 - j0))
    mixed = any_above != all_above
    cell_rows, cell_cols = np.divmod(true_at(mixed), j1 - j0)
    cells = (cell_rows + i0, cell_cols + j0)
    pixels, car = _interpolate_cells(scores, cut, cells, (rows, cols), size[1])
    return Outline(tuple(size), rows, cols, (i0, j0), all_above, mixed, cells, pixels, car)


def _cells_reaching(hits: np.ndarray) -> tuple[int, int]:
    """The cells (first, past the last) along one axis with a corner among the sorted source indices ``hits``."""
    return max(int(hits[0]) - 1, 0), int(hits[-1]) + 1


def _corner_extremes(above: np.ndarray, cells: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
    """(all four corners above, any corner above) of the first ``cells`` cells of ``above``, each (h, w) bool.

    ``above`` holds one more row (column) than ``cells`` or ends at the scores' last, which is clamped.
    """
    all_rows, any_rows = above.copy(), above.copy()
    np.logical_and(above[:-1], above[1:], out=all_rows[:-1])
    np.logical_or(above[:-1], above[1:], out=any_rows[:-1])
    all_above, any_above = all_rows.copy(), any_rows.copy()
    np.logical_and(all_rows[:, :-1], all_rows[:, 1:], out=all_above[:, :-1])
    np.logical_or(any_rows[:, :-1], any_rows[:, 1:], out=any_above[:, :-1])
    return all_above[: cells[0], : cells[1]], any_above[: cells[0], : cells[1]]


def _interpolate_cells(
    scores: np.ndarray, cut: float, cells: tuple[np.ndarray, np.ndarray], axes: tuple[_Axis, _Axis], width: int
) -> tuple[np.ndarray, np.ndarray]:
    """(flat index r * ``width`` + c, car) of every output pixel of ``cells`` (rows, cols): its exact thresholded
    bilinear value.

    Along columns first, once per (cell row, output column), then along rows per pixel: the same float32
    operations, in the same order, as :func:`bilinear_resize`.
    """
    (cell_rows, cell_cols), (rows, cols) = cells, axes
    wide, out_cols = cols.pixels(cell_cols)
    top_row = np.repeat(cell_rows, wide)
    bottom_row = np.minimum(top_row + 1, scores.shape[0] - 1)
    left, right, tx = cols.low[out_cols], cols.high[out_cols], cols.weight[out_cols]
    keep = 1 - tx
    top = scores[top_row, left] * keep + scores[top_row, right] * tx
    bottom = scores[bottom_row, left] * keep + scores[bottom_row, right] * tx
    tall, out_rows = rows.pixels(top_row)
    ty = rows.weight[out_rows]
    value = np.repeat(top, tall) * (1 - ty) + np.repeat(bottom, tall) * ty
    return out_rows * width + np.repeat(out_cols, tall), value > cut


def bilinear_resize(scores: np.ndarray, size: tuple[int, int], extent: Extent | None = None) -> np.ndarray:
    """Plain half-pixel bilinear resize of (h, w) -> (H, W) float32 (of the scores within ``extent``): the reference
    the tests check against."""
    scores, extent = photo_scores(scores, extent)
    y0, y1, wy = source_coordinates(size[0], scores.shape[0], extent[0])
    x0, x1, wx = source_coordinates(size[1], scores.shape[1], extent[1])
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
