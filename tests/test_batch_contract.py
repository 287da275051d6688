"""The model contract (batch.core.contract): one set of defaults, metadata round trip, input preparation, thresholds."""

from __future__ import annotations

import math

import numpy as np
import pytest

from batch.core.contract import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    ContractError,
    ModelContract,
    prepare_input,
    probability_to_logit,
)


def test_missing_keys_take_the_dataclass_defaults():
    """A model that states only its size reads exactly as ModelContract(height, width): one set of defaults."""
    assert ModelContract.from_metadata({"input_height": "32", "input_width": "48"}) == ModelContract(32, 48)
    assert ModelContract(32, 48).pixel_mean == IMAGENET_MEAN and ModelContract(32, 48).pixel_std == IMAGENET_STD


def test_metadata_round_trip_keeps_provenance_apart():
    contract = ModelContract(
        64,
        96,
        input_layout="NCHW",
        input_dtype="float16",
        input_multiple=16,
        threshold=0.3,
        precision="fp32",
        provenance={"val_dice": "0.99", "note": "hand-made"},
    )
    assert ModelContract.from_metadata(contract.to_metadata()) == contract


@pytest.mark.parametrize(
    ("meta", "message"),
    [
        ({"input_width": "48"}, "m.onnx has no 'input_height' in its metadata: export it with `unet-export to-onnx`"),
        (
            {"input_height": "32", "input_width": "48", "pixel_mean": "a,b,c"},
            "m.onnx: metadata 'pixel_mean' = 'a,b,c' is malformed",
        ),
        ({"input_height": "32", "input_width": "x"}, "m.onnx: metadata 'input_width' = 'x' is malformed"),
        ({"input_height": "32", "input_width": "48", "threshold": "2"}, r"m.onnx: 'threshold' must be a probability in \(0, 1\)"),
    ],
)
def test_bad_metadata_names_the_file_and_the_key(meta, message):
    with pytest.raises(ContractError, match=message):
        ModelContract.from_metadata(meta, source="m.onnx")


SIZE = {"input_height": "32", "input_width": "48"}


@pytest.mark.parametrize(
    ("meta", "key"),
    [
        ({"input_height": "100000", "input_width": "48"}, "'input_height' x 'input_width' = 100000x48 is past"),
        ({"input_height": "8192", "input_width": "8192"}, "'input_height' x 'input_width' = 8192x8192 is past"),  # 67 MP
        ({"input_height": "\u0663\u0662", "input_width": "48"}, "'input_height' = '\u0663\u0662' is malformed"),  # Arabic 32
        ({"input_height": "1_024", "input_width": "48"}, "'input_height' = '1_024' is malformed"),
        (SIZE | {"pixel_std": "nan,0.2,0.2"}, "'pixel_std' must be three finite numbers"),
        (SIZE | {"pixel_std": "inf,0.2,0.2"}, "'pixel_std' must be three finite numbers"),
        (SIZE | {"pixel_std": "1e-30,0.2,0.2"}, r"'pixel_std' \(1e-30, 0.2, 0.2\) must lie in"),  # inf in float16
        (SIZE | {"pixel_std": "0,0.2,0.2"}, "'pixel_std' .* must lie in"),
        (SIZE | {"pixel_mean": "nan,0.4,0.4"}, "'pixel_mean' must be three finite numbers"),
        (SIZE | {"pixel_mean": "1e9,0.4,0.4"}, "'pixel_mean' .* is past"),
        (SIZE | {"precision": "bf16"}, "'precision' must be fp32, fp16, int8, unknown, not 'bf16'"),
        (SIZE | {"contract_version": "2"}, "'contract_version' = '2' is not the version this package reads"),
        (SIZE | {"note": "x" * 100_000}, "'note' has a 4-character key or 100000-character value"),
        (SIZE | {"input_layout": "N" * 10_000}, "'input_layout' has a 12-character key or 10000-character value"),
        (SIZE | {f"k{i}": "" for i in range(2000)}, "metadata has 2002 keys, more than 1000"),
    ],
)
def test_absurd_or_hostile_metadata_is_refused_naming_the_file_and_the_key(meta, key):
    """What a model file says sizes the work: values no exporter writes are refused before anything is made from them."""
    with pytest.raises(ContractError, match=f"^m.onnx.*{key}") as caught:
        ModelContract.from_metadata(meta, source="m.onnx")
    assert "unet-export" in str(caught.value)


@pytest.mark.parametrize(
    "options",
    [
        {"threshold": "0.5"},  # a string where a number belongs: once a TypeError
        {"pixel_std": (0.2, 0.2, "x")},
        {"input_multiple": True},
        {"input_multiple": 16.0},
    ],
)
def test_values_of_the_wrong_type_are_a_contract_error(options):
    with pytest.raises(ContractError, match=f"'{next(iter(options))}'"):
        ModelContract(32, 48, **options)


def test_prepare_input_follows_layout_dtype_and_normalization():
    pixels = np.arange(2 * 4 * 6 * 3, dtype=np.uint8).reshape(2, 4, 6, 3)  # (N, H, W, 3)
    np.testing.assert_array_equal(prepare_input(pixels, ModelContract(4, 6)), pixels)  # uint8 NHWC: as it is
    contract = ModelContract(
        4, 6, input_layout="NCHW", input_dtype="float32", pixel_mean=(0.5, 0.4, 0.3), pixel_std=(0.2, 0.25, 0.5)
    )
    x = prepare_input(pixels, contract)
    assert x.shape == (2, 3, 4, 6) and x.dtype == np.float32 and x.flags.c_contiguous
    expected = (pixels[1, 2, 3] / 255 - np.array(contract.pixel_mean)) / np.array(contract.pixel_std)
    np.testing.assert_allclose(x[1, :, 2, 3], expected, rtol=1e-5)
    assert prepare_input(pixels, ModelContract(4, 6, input_dtype="float16")).dtype == np.float16


def test_probability_to_logit_for_numbers_and_arrays():
    assert probability_to_logit(0.5) == 0.0 and isinstance(probability_to_logit(0.5), float)
    assert probability_to_logit(0.9) == pytest.approx(math.log(9))
    fractions = np.array([[0.1, 0.5], [0.75, 0.999]], dtype=np.float32)
    logits = probability_to_logit(fractions)
    assert logits.shape == (2, 2) and logits.dtype == np.float32
    np.testing.assert_allclose(1 / (1 + np.exp(-logits)), fractions, rtol=1e-5)
