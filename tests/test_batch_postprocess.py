"""Logits -> full-size masks: the fast numpy path, its reference, and the ONNX graph the GPU runs."""

from __future__ import annotations

import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from batch.core.images import pad_edges
from batch.core.masks import FullMask, area_fraction, dice
from batch.inference.postprocess import (
    average_flipped,
    bilinear_resize,
    build_postprocess_model,
    mask_confidence,
    photo_scores,
    score_extent,
    threshold_in_output_units,
    upsample_threshold,
    upsample_threshold_runs,
)
from batch.runs.formats import encode_png_mask
from benchmarks.host import car_scores


def smooth_scores(rng: np.random.Generator, shape: tuple[int, int]) -> np.ndarray:
    """A blobby logit field with a long boundary (like a car outline) plus texture."""
    yy, xx = np.mgrid[: shape[0], : shape[1]]
    field = np.sin(yy / max(shape[0], 2) * 7 + rng.uniform(0, 6)) + np.cos(xx / max(shape[1], 2) * 9 + rng.uniform(0, 6))
    return (4 * field + rng.normal(0, 0.5, shape)).astype(np.float32)


def run_graph(model: onnx.ModelProto, feeds: dict) -> np.ndarray:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, feeds)[0]


def test_bilinear_reference_matches_hand_computed_half_pixel_values():
    row = np.array([[0.0, 1.0]], dtype=np.float32)  # (1, 2) -> (1, 4): sample at -0.25, 0.25, 0.75, 1.25 (clamped)
    np.testing.assert_allclose(bilinear_resize(row, (1, 4)), [[0.0, 0.25, 0.75, 1.0]])
    column = np.array([[0.0], [4.0]], dtype=np.float32)  # (2, 1) -> (3, 1): -1/6, 1/2, 7/6 (clamped)
    np.testing.assert_allclose(bilinear_resize(column, (3, 1)), [[0.0], [2.0], [4.0]], atol=1e-6)


@pytest.mark.parametrize(
    "source, target",
    [
        ((80, 120), (1280, 1918)),
        ((32, 48), (100, 37)),
        ((40, 60), (40, 60)),
        ((64, 96), (20, 30)),
        ((1, 5), (3, 17)),
        ((16, 16), (1, 1)),
    ],
)
def test_fast_upsample_equals_full_bilinear_then_threshold(source, target):
    rng = np.random.default_rng(sum(source) + sum(target))
    scores = smooth_scores(rng, source)
    for cut in (0.0, 1.5):
        mask = upsample_threshold(scores, target, cut)
        assert mask.shape == target and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        np.testing.assert_array_equal(mask == 255, bilinear_resize(scores, target) > cut)


def random_case(rng: np.random.Generator, kind: int) -> tuple[np.ndarray, float]:
    """Scores of an odd size and a cut: noise, integers with many scores exactly at the cut, a car, noise with NaN."""
    shape = tuple(int(n) for n in rng.integers(1, 40, 2))
    if kind == 0:
        return rng.normal(0, 1, shape).astype(np.float32), 0.0
    if kind == 1:
        return rng.integers(-2, 3, shape).astype(np.float32), float(rng.integers(-1, 2))
    if kind == 2:
        return car_scores(shape), float(rng.choice([0.0, 1.0, -2.0]))
    scores = rng.normal(0, 1, shape).astype(np.float32)
    scores[rng.random(shape) < 0.3] = np.nan
    return scores, 0.0


def test_fast_upsample_is_exact_on_many_random_sizes_scales_and_ties():
    """Up- and downscales to odd sizes, cars touching the frame's edges, scores exactly at the cut, NaN."""
    rng = np.random.default_rng(24)
    for case in range(600):
        scores, cut = random_case(rng, case % 4)
        target = tuple(int(n) for n in rng.integers(1, 200, 2))
        mask = upsample_threshold(scores, target, cut)
        assert mask.shape == target and mask.dtype == np.uint8
        np.testing.assert_array_equal(mask, np.where(bilinear_resize(scores, target) > cut, 255, 0), err_msg=f"case {case}")
        np.testing.assert_array_equal(upsample_threshold_runs(scores, target, cut).pixels(), mask, err_msg=f"case {case}")


@pytest.mark.parametrize("source", [(352, 528), (640, 960), (320, 480)])
def test_fast_upsample_is_exact_on_a_car_at_the_runners_sizes(source):
    scores = car_scores(source)
    for cut in (0.0, 7.5, -3.0):
        expected = bilinear_resize(scores, (1280, 1918)) > cut
        np.testing.assert_array_equal(upsample_threshold(scores, (1280, 1918), cut) == 255, expected)
        runs = upsample_threshold_runs(scores, (1280, 1918), cut)  # the runner's PNG path: no pixels made
        np.testing.assert_array_equal(runs.pixels() == 255, expected)
        from_runs = FullMask(make_pixels=lambda: pytest.fail("the PNG needs no pixels"), make_runs=lambda runs=runs: runs)
        assert encode_png_mask(from_runs) == encode_png_mask(expected.astype(np.uint8) * 255)


def test_uniform_scores_need_no_interpolation():
    for value, expected in ((3.0, 255), (-3.0, 0)):
        scores = np.full((8, 12), value, np.float32)
        assert (upsample_threshold(scores, (50, 70), 0.0) == expected).all()
        runs = upsample_threshold_runs(scores, (50, 70), 0.0)
        assert runs.values.tolist() == [expected] * 50 and runs.starts.tolist() == list(range(0, 50 * 70, 70))


def test_thresholds_in_output_units():
    assert threshold_in_output_units(0.5, "logits") == 0.0
    assert threshold_in_output_units(0.8, "logits") == pytest.approx(math.log(4))
    assert threshold_in_output_units(0.8, "probabilities") == 0.8


def test_average_flipped_undoes_the_mirror():
    scores = np.arange(24, dtype=np.float32).reshape(1, 1, 4, 6)
    np.testing.assert_array_equal(average_flipped(scores, scores[..., ::-1]), scores)


@pytest.mark.parametrize("score_type", [onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16])
def test_postprocess_graph_agrees_with_numpy(score_type):
    """The graph the CUDA provider runs, here on the CPU provider: same masks as upsample_threshold."""
    rng = np.random.default_rng(0)
    dtype = np.float16 if score_type == onnx.TensorProto.FLOAT16 else np.float32
    scores = np.stack([smooth_scores(rng, (48, 72)) for _ in range(3)])[:, None].astype(dtype)  # (3, 1, 48, 72)
    cut = 0.7
    masks = run_graph(
        build_postprocess_model(score_type, cut, tta=False), {"scores": scores, "sizes": np.array([3, 1, 130, 201])}
    )
    assert masks.shape == (3, 1, 130, 201) and masks.dtype == np.uint8
    for i in range(3):
        expected = upsample_threshold(scores[i, 0].astype(np.float32), (130, 201), cut)
        assert (masks[i, 0] != expected).mean() < 1e-4  # float rounding at exact ties only


def test_postprocess_graph_averages_the_flipped_prediction():
    rng = np.random.default_rng(1)
    scores = smooth_scores(rng, (32, 48))[None, None]  # (1, 1, 32, 48)
    flipped = smooth_scores(rng, (32, 48))[None, None]
    graph = build_postprocess_model(onnx.TensorProto.FLOAT, 0.0, tta=True)
    masks = run_graph(graph, {"scores": scores, "flipped": flipped, "sizes": np.array([1, 1, 64, 96])})
    expected = upsample_threshold(average_flipped(scores, flipped)[0, 0], (64, 96), 0.0)
    assert (masks[0, 0] != expected).mean() < 1e-4
    # and the flip matters: without un-flipping, the masks would differ
    assert not np.array_equal(expected, upsample_threshold((scores + flipped)[0, 0] / 2, (64, 96), 0.0))


@pytest.mark.parametrize("extent", [(40, 59), (40, 59.5), (39.25, 60), (1, 1)])
def test_scores_of_a_padded_photo_are_upsampled_from_the_photos_part_only(extent):
    scores = smooth_scores(np.random.default_rng(7), (40, 60))
    scores[:, 59:] = 1e6 if extent[1] <= 59 else scores[:, 59:]  # padding's scores: never read past the extent
    expected = bilinear_resize(scores, (123, 187), extent) > 0.3
    np.testing.assert_array_equal(upsample_threshold(scores, (123, 187), 0.3, extent) > 0, expected)
    if extent == (40, 59):  # a whole number of columns: exactly the scores cut to them
        np.testing.assert_array_equal(expected, bilinear_resize(scores[:, :59], (123, 187)) > 0.3)


def test_bilinear_reference_over_a_fractional_extent_by_hand():
    row = np.array([[0.0, 1.0, 9.0]], dtype=np.float32)  # 1.5 columns -> 3: sample at -0.25, 0.25, 0.75 (1 clamped to 1)
    np.testing.assert_allclose(bilinear_resize(row, (1, 3), (1, 1.5)), [[0.0, 0.25, 0.75]])


def test_an_extent_outside_the_scores_is_refused():
    with pytest.raises(ValueError, match="not within"):
        photo_scores(np.zeros((4, 6), np.float32), (4, 7))
    assert score_extent((64, 96), (64, 96), (32, 48)) is None
    assert score_extent((64, 95), (64, 96), (32, 48)) == (32.0, 47.5)


def test_a_perfect_model_on_a_padded_decode_puts_the_outline_where_it_is():
    """Scores that are the truth at the model's size (a 190x128 photo decoded 95x64, padded to 96x64): read over
    the photo's 95 columns they give back its mask; read over all 96 they stretch it to the right."""
    yy, xx = np.mgrid[:128, :190]
    mask = ((yy - 70) / 40) ** 2 + ((xx - 120) / 68) ** 2 < 1  # a car reaching towards the right edge
    fraction = pad_edges(area_fraction(mask, (64, 95)), (64, 96)) / 255
    logits = np.log(np.clip(fraction, 1e-3, 1 - 1e-3) / np.clip(1 - fraction, 1e-3, 1)).astype(np.float32)
    extent = score_extent((64, 95), (64, 96), logits.shape)
    placed = dice(upsample_threshold(logits, mask.shape, 0.0, extent) > 0, mask)
    stretched = dice(upsample_threshold(logits, mask.shape, 0.0) > 0, mask)
    assert placed > 0.995 and placed > stretched + 0.002
    assert mask_confidence(photo_scores(logits, extent)[0], 0.0, (-1.0, 1.0)) > 0.9
