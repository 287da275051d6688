"""The Python API: ``from batch import Segmenter``, the same masks as ``unet-batch segment``, errors, lifetime."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import REPO, write_photo
from PIL import Image

import batch
from batch import ImageError, InferenceError, Item, Segmenter, default_model_path
from batch.cli import main
from batch.inference.decode import Failure, dali_available
from batch.runs.formats import encode_png_mask

GOOD = ["a.jpg", "b.JPEG", "c.png", "day1/d.jpg", "day1/deep/f.jpeg", "day1/e.jpg", "day2/g.png"]  # photo_tree, sorted


@pytest.fixture
def segmenter(tiny_onnx: Path):
    with Segmenter(tiny_onnx, device="cpu") as segmenter:
        yield segmenter


def segment_folder(photos: Path, out: Path, *options: str) -> None:
    args = ["segment", str(photos), str(out), "--no-progress", *options]
    result = CliRunner().invoke(main, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output


def written_mask(out: Path, name: str) -> bytes:
    return (out / name).with_suffix(".png").read_bytes()


# ---- the same masks as the folder runner ---------------------------------------------------------------


def test_masks_of_files_are_byte_identical_to_the_runners(photo_tree: Path, tmp_path: Path, tiny_onnx: Path, segmenter):
    segment_folder(photo_tree, tmp_path / "out", "--model", str(tiny_onnx))
    paths = [photo_tree / name for name in GOOD]
    one_by_one = [segmenter(path) for path in paths]  # batches of one
    as_a_list = segmenter([str(path) for path in paths])  # str works as well as Path
    from_bytes = segmenter([path.read_bytes() for path in paths])  # what the Ray engine hands over
    for name, *masks in zip(GOOD, one_by_one, as_a_list, from_bytes):
        expected = written_mask(tmp_path / "out", name)
        for mask in masks:
            assert mask.dtype == np.uint8 and set(np.unique(mask)) <= {0, 255}
            assert encode_png_mask(mask) == expected, name


def test_the_bundled_model_gives_the_runners_masks(tmp_path: Path):
    for i, size in enumerate([(320, 480), (256, 384)]):
        write_photo(tmp_path / "photos" / f"{i}.jpg", size, seed=40 + i)
    segment_folder(tmp_path / "photos", tmp_path / "out", "--device", "cpu")
    with Segmenter(device="cpu") as segmenter:
        assert segmenter.model.path == default_model_path("cpu")
        for i in range(2):
            mask = segmenter(tmp_path / "photos" / f"{i}.jpg")
            assert encode_png_mask(mask) == written_mask(tmp_path / "out", f"{i}.jpg")


def test_batch_segment_and_evaluate_take_str_or_path_and_match_the_commands(photo_tree: Path, tmp_path: Path, tiny_onnx: Path):
    segment_folder(photo_tree, tmp_path / "cli", "--model", str(tiny_onnx))
    import batch.cli  # noqa: F401  (imports the runner: batch.segment must stay the function)

    as_str = batch.segment(str(photo_tree), str(tmp_path / "str"), model=str(tiny_onnx), device="cpu", progress=False)
    as_path = batch.segment(photo_tree, tmp_path / "path", model=tiny_onnx, device="cpu", progress=False)
    for report in (as_str, as_path):
        assert isinstance(report, batch.Report) and report.processed == len(GOOD)
    for name in GOOD:
        expected = written_mask(tmp_path / "cli", name)
        assert written_mask(tmp_path / "str", name) == written_mask(tmp_path / "path", name) == expected, name
    same = batch.evaluate(str(tmp_path / "str"), tmp_path / "cli")
    assert isinstance(same, batch.Evaluation) and same.mean_dice == 1.0
    with pytest.raises(TypeError, match="colour"):
        batch.segment(photo_tree, tmp_path / "bad", colour="red")  # an unknown option is named


def test_pil_images_and_arrays_are_masked_at_their_own_size(tmp_path: Path, segmenter):
    truth = write_photo(tmp_path / "car.png", (96, 144), seed=3)
    photo = Image.open(tmp_path / "car.png")
    mask_of_file, mask_of_pil, mask_of_array = segmenter([tmp_path / "car.png", photo, np.asarray(photo)])
    np.testing.assert_array_equal(mask_of_pil, mask_of_file)  # a PNG has no draft mode: the same pixels
    np.testing.assert_array_equal(mask_of_array, mask_of_file)
    assert mask_of_file.shape == truth.shape and ((mask_of_file == 255) == truth).mean() > 0.97


def test_tta_and_threshold_change_the_masks(tmp_path: Path, tiny_onnx: Path):
    write_photo(tmp_path / "car.jpg", (96, 144), seed=5)
    with (
        Segmenter(tiny_onnx, device="cpu", threshold=0.2) as low,
        Segmenter(tiny_onnx, device="cpu", threshold=0.8, tta=True) as high,
    ):
        assert (low.threshold, high.threshold, high.tta) == (0.2, 0.8, True)
        assert (low(tmp_path / "car.jpg") == 255).sum() > (high(tmp_path / "car.jpg") == 255).sum()


# ---- errors ----------------------------------------------------------------------------------------------


def test_a_bad_image_raises_an_error_naming_it(tmp_path: Path, segmenter):
    write_photo(tmp_path / "good.jpg", (64, 96), seed=0)
    (tmp_path / "empty.jpg").write_bytes(b"")
    with pytest.raises(ImageError, match=f"^{tmp_path / 'empty.jpg'}: empty file"):
        segmenter(tmp_path / "empty.jpg")
    with pytest.raises(ImageError, match="^image at index 1 of the list: is neither JPEG nor PNG"):
        segmenter([tmp_path / "good.jpg", b"not an image"])
    with pytest.raises(ImageError, match="^the image: a float64 array of shape \\(4, 4, 3\\); pass an \\(H, W, 3\\) uint8"):
        segmenter(np.zeros((4, 4, 3)))
    with pytest.raises(ImageError, match="cannot read"):
        segmenter(tmp_path / "missing.jpg")
    with pytest.raises(TypeError, match="image at index 0 of the list is a int; pass a path"):
        segmenter([3])
    with pytest.raises(ValueError, match="errors must be"):
        segmenter(tmp_path / "good.jpg", errors="ignore")


def test_errors_return_gives_each_failed_image_its_error(tmp_path: Path, segmenter):
    write_photo(tmp_path / "good.jpg", (64, 96), seed=0)
    results = segmenter([b"", tmp_path / "good.jpg", np.zeros((5, 5), np.uint8)], errors="return")
    assert isinstance(results[0], ImageError) and str(results[0]).startswith("image at index 0 of the list: empty file")
    assert results[1].shape == (64, 96)
    assert isinstance(results[2], ImageError) and "uint8 array of shape (5, 5)" in str(results[2])


def test_an_inference_error_fails_its_batch_and_three_in_a_row_stop(
    tmp_path: Path, tiny_onnx: Path, failing_inference, monkeypatch
):
    for i in range(5):
        write_photo(tmp_path / f"{i}.jpg", (64, 96), seed=i)
    photos = [tmp_path / f"{i}.jpg" for i in range(5)]
    out_of_memory = RuntimeError("Failed to allocate memory for requested buffer of size 123")
    with Segmenter(tiny_onnx, device="cpu", batch_size=2, threads=1) as segmenter:  # one stream: whole batches
        failing_inference(out_of_memory, when=lambda call: call == 2)
        results = segmenter(photos, errors="return")
        assert [type(r).__name__ for r in results] == ["ndarray", "ndarray", "InferenceError", "InferenceError", "ndarray"]
        assert str(results[2]) == (
            f"{photos[2]}: inference failed on its batch of 2 (Failed to allocate memory for "
            "requested buffer of size 123); a smaller batch size may fit"
        )
        failing_inference(out_of_memory, when=lambda call: call > 0)
        with pytest.raises(InferenceError, match="failed on 3 batches in a row"):
            segmenter(photos, errors="return")
        monkeypatch.undo()
        assert len(segmenter(photos)) == 5  # the Segmenter is still usable afterwards


# ---- the stream that the folder runner and the Ray engine drive ------------------------------------------


def test_stream_yields_every_item_once_in_input_order(photo_tree: Path, tiny_onnx: Path):
    (photo_tree / "bad.jpg").write_bytes(b"garbage")
    paths = sorted(p for p in photo_tree.rglob("*") if p.is_file())
    items = [Item(str(path), data=path.read_bytes(), tag=i) for i, path in enumerate(paths)]
    decoders = ["pillow"] + (["dali"] if dali_available() else [])
    for decoder in decoders:
        with Segmenter(tiny_onnx, device="cpu", batch_size=2, decoder=decoder) as segmenter:
            results = list(segmenter.stream(items))
        assert [item.tag for item, _ in results] == list(range(len(paths))), decoder
        failures = [item.name for item, result in results if isinstance(result, Failure)]
        assert failures == [str(photo_tree / "bad.jpg")]
        masks = {item.name: result.mask() for item, result in results if not isinstance(result, Failure)}
        assert all(masks[str(path)].shape == Image.open(path).size[::-1] for path in paths if path.name != "bad.jpg")


def test_predict_returns_masks_and_errors_for_items(photo_tree: Path, segmenter):
    items = [Item.from_path(photo_tree / "a.jpg"), Item("upload 7", data=b"\x89PNG\r\n\x1a\n broken")]
    mask, error = segmenter.predict(items)
    assert mask.shape == (96, 144) and isinstance(error, ImageError) and str(error).startswith("upload 7: unreadable PNG")


def test_one_stream_at_a_time(photo_tree: Path, segmenter):
    items = [Item.from_path(photo_tree / name) for name in GOOD]
    first = segmenter.stream(items)
    next(first)
    with pytest.raises(RuntimeError, match="already streaming"):
        next(segmenter.stream(items))
    first.close()
    assert len(list(segmenter.stream(items))) == len(GOOD)


def test_close_releases_the_decoder_and_refuses_more_work(photo_tree: Path, tiny_onnx: Path):
    decoder = "dali" if dali_available() else "pillow"
    with Segmenter(tiny_onnx, device="cpu", decoder=decoder) as segmenter:
        segmenter(photo_tree / "a.jpg")
    assert segmenter.closed
    if decoder == "dali":
        assert segmenter.decoder.pipeline is None
    with pytest.raises(RuntimeError, match="closed"):
        segmenter(photo_tree / "a.jpg")
    segmenter.close()  # twice is fine


def test_bad_options_are_refused_before_loading_anything(tiny_onnx: Path):
    for options, message in [
        ({"batch_size": 0}, "batch_size must be a positive integer"),
        ({"threshold": 1.0}, "threshold must be a probability"),
        ({"device": "tpu"}, "is not one of auto, cpu, cuda"),
        ({"decoder": "nvjpeg"}, "decoder must be one of auto, dali, pillow"),
    ]:
        with pytest.raises(ValueError, match=message):
            Segmenter(tiny_onnx, **options)


# ---- the bundled model, and a cheap import -----------------------------------------------------------------


def test_default_model_path_picks_the_devices_file(tmp_path: Path, monkeypatch):
    monkeypatch.setattr("batch.inference.bundled.models_folder", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match="no bundled model"):
        default_model_path()
    (tmp_path / "default.onnx").write_bytes(b"fp32")
    assert default_model_path() == default_model_path("cuda:1") == tmp_path / "default.onnx"
    (tmp_path / "default-int8.onnx").write_bytes(b"int8")
    assert default_model_path("CPU") == tmp_path / "default-int8.onnx"
    assert default_model_path("cuda") == tmp_path / "default.onnx"  # no FP16 file: the FP32 one
    (tmp_path / "default-fp16.onnx").write_bytes(b"fp16")
    assert default_model_path("cuda:0") == tmp_path / "default-fp16.onnx"
    assert default_model_path("auto") in (tmp_path / "default-int8.onnx", tmp_path / "default-fp16.onnx")


def test_import_batch_is_cheap_and_the_api_comes_on_first_use():
    script = (
        "import sys, batch\n"
        "assert not any(m.startswith(('onnxruntime', 'onnx', 'torch')) for m in sys.modules), 'eager import'\n"
        "assert batch.Segmenter.__module__ == 'batch.inference.segmenter' and 'onnxruntime' in sys.modules\n"
        "print(sorted(batch.__all__))\n"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == str(sorted(batch.__all__))
    with pytest.raises(AttributeError, match="no attribute 'Segmentor'"):
        batch.Segmentor  # noqa: B018


# ---- docs/api.md: its examples run ----------------------------------------------------------------------


def python_blocks(markdown: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", markdown, flags=re.MULTILINE | re.DOTALL)


def test_the_examples_of_docs_api_run(tmp_path: Path, monkeypatch):
    """Every Python block of docs/api.md, in order, with the bundled model, in a folder of synthetic photos."""
    write_photo(tmp_path / "car.jpg", (320, 480), seed=50)
    for i in range(3):
        truth = write_photo(tmp_path / "photos" / f"{i}.jpg", (160, 240), seed=51 + i)
        (tmp_path / "truth").mkdir(exist_ok=True)
        Image.fromarray(truth.astype(np.uint8) * 255).save(tmp_path / "truth" / f"{i}.png")
    monkeypatch.chdir(tmp_path)
    blocks = python_blocks((REPO / "docs" / "api.md").read_text())
    assert len(blocks) >= 5
    namespace: dict = {}
    for block in blocks:
        exec(compile(block, "docs/api.md", "exec"), namespace)  # noqa: S102  (our own documentation)
    namespace["segmenter"].close()
    with Image.open(tmp_path / "car_cutout.png") as cutout:
        assert cutout.mode == "RGBA" and cutout.size == (480, 320)
    assert (tmp_path / "masks" / "submission.csv").is_file() and (tmp_path / "masks" / "0.png").is_file()
