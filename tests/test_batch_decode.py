"""Header checks, Pillow decoding of odd images, and the DALI decoder (CPU mode) against Pillow."""

from __future__ import annotations

import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
from conftest import write_photo
from PIL import Image

from batch.core.contract import ModelContract, prepare_input
from batch.core.images import ImageError, draft_request, load_resized_rgb, probe_image
from batch.core.masks import dice
from batch.inference.decode import Batch, DaliDecoder, Failure, Item, PillowDecoder, dali_available
from batch.inference.model import CpuPredictor, load_model

needs_dali = pytest.mark.skipif(not dali_available(), reason="NVIDIA DALI is not installed (pip install '.[dali]')")


def items_in(folder: Path) -> list[Item]:
    """Every file under ``folder`` as an item to read, sorted by name."""
    return [Item.from_path(path) for path in sorted(p for p in folder.rglob("*") if p.is_file())]


def name_of(item: Item) -> str:
    return Path(item.name).name


def run_decoder(decoder, items: list[Item]) -> tuple[dict[str, np.ndarray], dict[str, str], list[str]]:
    """(file name -> model input (H, W, C), file name -> failure reason, decoder name of each batch)."""
    images, failures, kinds = {}, {}, []
    for entry in decoder.batches(items):
        if isinstance(entry, Failure):
            failures[name_of(entry.item)] = entry.reason
            continue
        kinds.append(entry.decoder)
        x = entry.model_input if entry.model_input is not None else entry.pixels
        images.update({name_of(item): x[i] for i, item in enumerate(entry.items)})
    return images, failures, kinds


def full_mask(engine: CpuPredictor, item: Item, pixels: np.ndarray) -> np.ndarray:
    """The (H, W) bool mask the engine makes for one photo from its model-sized pixels."""
    with Image.open(item.path) as im:
        size = (im.height, im.width)
    return engine.predict(Batch([item], [0], [size], "test", pixels=pixels[None]))[0].mask() == 255


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with (almost) no pixel data."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b"")


# ---- header checks ----------------------------------------------------------------------------


def test_probe_reads_format_mode_and_size(tmp_path: Path):
    write_photo(tmp_path / "a.jpg", (30, 40), seed=0)
    write_photo(tmp_path / "really_png.jpg", (20, 10), seed=0, fmt="PNG")
    info = probe_image((tmp_path / "a.jpg").read_bytes(), "a.jpg")
    assert (info.format, info.mode, info.size) == ("JPEG", "RGB", (30, 40))
    assert probe_image((tmp_path / "really_png.jpg").read_bytes(), "x").format == "PNG"  # content wins over the name


@pytest.mark.parametrize(
    "data, message",
    [
        (b"", "empty file"),
        (b"hello, this is a text file", "neither JPEG nor PNG"),
        (b"RIFF\x10\x00\x00\x00WEBPVP8 ", "a WebP file"),
        (b"\x00\x00\x00\x18ftypheic", "a HEIF/AVIF file"),
        (b"GIF89a\x01\x00\x01\x00", "a GIF file"),
        (b"\xff\xd8\xff\xe0\x00\x10JFIF", "unreadable JPEG header"),
        (png_header_only(20000, 20000), "too large to decode safely"),
    ],
)
def test_probe_rejects_bad_files_naming_them(data: bytes, message: str):
    with pytest.raises(ImageError, match=message) as error:
        probe_image(data, "/photos/x.jpg")
    assert str(error.value).startswith("/photos/x.jpg: ")


def test_probe_enforces_the_pixel_limit(tmp_path: Path):
    write_photo(tmp_path / "a.jpg", (100, 120), seed=0)
    data = (tmp_path / "a.jpg").read_bytes()
    assert probe_image(data, "a.jpg", max_pixels=12_000).size == (100, 120)
    with pytest.raises(ImageError, match="120x100 is 0 megapixels, more than the 0 MP limit; downscale it"):
        probe_image(data, "a.jpg", max_pixels=11_999)


# ---- Pillow: every colour mode becomes the right RGB ---------------------------------------------


def test_jpeg_decodes_at_the_smallest_dct_scale_that_covers_the_model_size(tmp_path: Path):
    assert draft_request((1280, 1918), (320, 480)) == (479, 320)  # libjpeg's 1/4 scale rounds up to 480x320
    assert draft_request((1280, 1918), (160, 240)) == (239, 160)  # 1/8
    assert draft_request((1280, 1918), (640, 960)) == (959, 640)  # 1/2 gives 959 columns: near enough to pad to 960
    assert draft_request((1280, 1918), (640, 990)) == (1918, 1280)  # 959 is 3% short of 990: full size
    assert draft_request((1280, 1918), (352, 528)) == (959, 640)  # 1/4's 480 is 9% short of 528: 1/2
    assert draft_request((5, 7), (64, 96)) == (7, 5)  # upscaling: full size
    write_photo(tmp_path / "car.jpg", (1280, 1918), seed=0)
    with Image.open(tmp_path / "car.jpg") as im:
        im.draft("RGB", draft_request((1280, 1918), (320, 480)))
        assert im.size == (480, 320)
        im.load()
    fitted = load_resized_rgb(tmp_path / "car.jpg", (320, 480))
    fast, original = fitted.pixels, fitted.shown
    with Image.open(tmp_path / "car.jpg") as im:
        full = np.asarray(im.convert("RGB").resize((480, 320), Image.Resampling.BILINEAR))
    assert original == (1280, 1918) and fast.shape == full.shape
    assert np.abs(fast.astype(int) - full.astype(int)).mean() < 3  # grey levels


def test_sixteen_bit_grayscale_is_scaled_not_clipped(tmp_path: Path):
    values = np.linspace(0, 65535, 48 * 64).reshape(48, 64).astype(np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    fitted = load_resized_rgb(tmp_path / "g16.png", (48, 64))
    rgb, original = fitted.pixels, fitted.shown
    assert original == (48, 64)
    np.testing.assert_array_equal(rgb[..., 0], (values >> 8).astype(np.uint8))
    assert (rgb[..., 0] == rgb[..., 2]).all()


@pytest.mark.parametrize("mode, fmt", [("L", "JPEG"), ("CMYK", "JPEG"), ("RGBA", "PNG"), ("P", "PNG"), ("LA", "PNG")])
def test_odd_modes_decode_close_to_the_rgb_photo(tmp_path: Path, mode: str, fmt: str):
    reference = tmp_path / "ref.png"
    write_photo(reference, (64, 96), seed=3)
    odd = tmp_path / f"odd.{fmt.lower()}"
    write_photo(odd, (64, 96), seed=3, fmt=fmt, mode=mode)
    expected = load_resized_rgb(reference, (32, 48)).pixels
    fitted = load_resized_rgb(odd, (32, 48))
    got, original = fitted.pixels, fitted.shown
    assert got.shape == (32, 48, 3) and got.dtype == np.uint8 and original == (64, 96)
    if mode in ("L", "LA"):
        expected = np.repeat(np.asarray(Image.fromarray(expected).convert("L"))[..., None], 3, axis=2)
    tolerance = 40 if mode == "P" else 6  # the palette quantizes colours
    assert np.abs(got.astype(int) - expected.astype(int)).mean() < tolerance


def test_pillow_decoder_batches_good_files_and_reports_bad_ones(tmp_path: Path):
    folder = tmp_path / "in"
    for i in range(5):
        write_photo(folder / f"{i}.jpg", (40 + 8 * i, 60), seed=i)
    (folder / "5_empty.jpg").write_bytes(b"")
    good = (folder / "0.jpg").read_bytes()
    (folder / "6_truncated.jpg").write_bytes(good[: len(good) // 2])
    images, failures, kinds = run_decoder(PillowDecoder((32, 48), batch_size=2, workers=2), items_in(folder))
    assert sorted(images) == [f"{i}.jpg" for i in range(5)]
    assert all(x.shape == (32, 48, 3) for x in images.values())
    assert set(kinds) == {"pillow"}
    assert "empty file" in failures["5_empty.jpg"]
    assert "truncated" in failures["6_truncated.jpg"]


# ---- DALI (CPU backend) ---------------------------------------------------------------------------


@pytest.fixture
def photo_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "in"
    for i in range(6):
        write_photo(folder / f"{i}.jpg", (192 + 16 * (i % 2), 288), seed=10 + i)
    return folder


@needs_dali
@pytest.mark.dali
def test_dali_cpu_and_pillow_agree(photo_folder: Path, tiny_onnx: Path):
    """Decode differently (full decode + antialiased resize vs DCT scaling), segment the same."""
    model = load_model(tiny_onnx, "cpu")
    contract = model.contract
    items = items_in(photo_folder)
    dali_images, dali_failures, kinds = run_decoder(DaliDecoder(contract, 4, 2, device_id=None, tta=False), items)
    pillow_images, _, _ = run_decoder(PillowDecoder(contract.input_size, 4, 2), items)
    assert not dali_failures and set(kinds) == {"dali-cpu"} and dali_images.keys() == pillow_images.keys()
    engine = CpuPredictor(model, threshold=0.5, tta=False)
    for item in items:
        dali_pixels, pillow_pixels = dali_images[name_of(item)], pillow_images[name_of(item)]
        assert np.abs(dali_pixels.astype(int) - pillow_pixels.astype(int)).mean() < 4  # grey levels
        assert dice(full_mask(engine, item, dali_pixels), full_mask(engine, item, pillow_pixels)) > 0.99


@needs_dali
@pytest.mark.dali
@pytest.mark.parametrize("layout, dtype", [("NCHW", "float32"), ("NHWC", "float16"), ("NCHW", "uint8")])
def test_dali_prepares_the_model_input_like_numpy(photo_folder: Path, layout: str, dtype: str):
    contract = ModelContract(64, 96, input_layout=layout, input_dtype=dtype)
    items = items_in(photo_folder)[:3]
    decoder = DaliDecoder(contract, 3, 2, device_id=None, tta=True)
    batch = next(entry for entry in decoder.batches(items) if isinstance(entry, Batch))
    dali_plain = DaliDecoder(ModelContract(64, 96), 3, 2, device_id=None, tta=False)
    pixels = next(entry for entry in dali_plain.batches(items) if isinstance(entry, Batch)).model_input  # (3, 64, 96, 3) uint8
    expected = prepare_input(pixels, contract)
    mirrored = prepare_input(np.ascontiguousarray(pixels[:, :, ::-1]), contract)
    assert batch.model_input.dtype == expected.dtype and batch.model_input.shape == expected.shape
    tolerance = 1 if dtype == "uint8" else 1e-2
    np.testing.assert_allclose(batch.model_input.astype(np.float32), expected.astype(np.float32), atol=tolerance)
    np.testing.assert_allclose(batch.model_input_flipped.astype(np.float32), mirrored.astype(np.float32), atol=tolerance)


@needs_dali
@pytest.mark.dali
def test_dali_routes_odd_files_to_pillow_and_lists_bad_ones(photo_folder: Path):
    write_photo(photo_folder / "cmyk.jpg", (96, 144), seed=1, mode="CMYK")
    write_photo(photo_folder / "pic.png", (96, 144), seed=2)
    good = (photo_folder / "0.jpg").read_bytes()
    (photo_folder / "truncated.jpg").write_bytes(good[: len(good) // 2])
    (photo_folder / "text.jpg").write_text("not an image")
    decoder = DaliDecoder(ModelContract(64, 96), 4, 2, device_id=None, tta=False)
    images, failures, kinds = run_decoder(decoder, items_in(photo_folder))
    assert sorted(failures) == ["text.jpg", "truncated.jpg"]
    assert "truncated" in failures["truncated.jpg"] and "neither JPEG nor PNG" in failures["text.jpg"]
    assert {"cmyk.jpg", "pic.png", "0.jpg", "5.jpg"} <= images.keys()
    assert decoder.pillow_fallbacks == 2 and set(kinds) == {"dali-cpu", "pillow"}


@needs_dali
@pytest.mark.dali
def test_dali_batch_error_retries_files_one_by_one(photo_folder: Path):
    data = bytearray((photo_folder / "0.jpg").read_bytes())
    huffman = data.find(b"\xff\xc4")
    data[huffman + 5 : huffman + 21] = b"\xff" * 16  # a Huffman table no decoder accepts; the header still parses
    (photo_folder / "2_bad.jpg").write_bytes(bytes(data))
    decoder = DaliDecoder(ModelContract(64, 96), 8, 2, device_id=None, tta=False)
    images, failures, kinds = run_decoder(decoder, items_in(photo_folder))
    assert list(failures) == ["2_bad.jpg"]  # DALI refused it alone, then Pillow too
    assert sorted(images) == [f"{i}.jpg" for i in range(6)]
    assert kinds == ["dali-cpu"] * 6  # the good ones of the failed batch, one by one


@needs_dali
@pytest.mark.dali
def test_files_dali_refuses_go_to_pillow(photo_folder: Path, monkeypatch):
    """What nvJPEG does with some JPEGs it cannot take, simulated: DALI errors, Pillow decodes."""
    decoder = DaliDecoder(ModelContract(64, 96), 8, 2, device_id=None, tta=False)
    real_outputs = decoder._outputs
    three = (photo_folder / "3.jpg").read_bytes()

    def refuse_three(batch):
        outputs = real_outputs(batch)
        if three in [p.data for p in batch.probed]:
            raise RuntimeError(
                "Critical error in pipeline:\nnvJPEG: unsupported sampling\nCurrent pipeline object is no longer valid."
            )
        return outputs

    monkeypatch.setattr(decoder, "_outputs", refuse_three)
    images, failures, kinds = run_decoder(decoder, items_in(photo_folder))
    assert not failures and sorted(images) == [f"{i}.jpg" for i in range(6)]
    assert decoder.pillow_fallbacks == 1 and kinds.count("pillow") == 1


# ---- items: files to read, bytes already read, images already decoded ----------------------------------


def test_an_item_has_exactly_one_source(tmp_path: Path):
    with pytest.raises(ValueError, match="exactly one of path, data or image"):
        Item("x", path=tmp_path / "x.jpg", data=b"...")
    with pytest.raises(ValueError, match="exactly one"):
        Item("x")


def test_bytes_in_memory_decode_like_the_file(photo_folder: Path):
    files = items_in(photo_folder)
    in_memory = [Item(f"memory/{name_of(item)}", data=item.path.read_bytes()) for item in files]
    decoder = PillowDecoder((64, 96), batch_size=4, workers=2)
    from_files, _, _ = run_decoder(decoder, files)
    from_bytes, _, _ = run_decoder(decoder, in_memory)
    assert from_files.keys() == from_bytes.keys()
    for name in from_files:
        np.testing.assert_array_equal(from_files[name], from_bytes[name])


def test_decoded_images_are_resized_and_bad_arrays_named(tmp_path: Path):
    write_photo(tmp_path / "a.png", (48, 72), seed=0)
    pil = Image.open(tmp_path / "a.png")
    items = [
        Item("pil", image=pil),
        Item("array", image=np.asarray(pil.convert("RGB"))),
        Item("gray array", image=np.zeros((48, 72), np.uint8)),
        Item("float array", image=np.zeros((48, 72, 3), np.float32)),
    ]
    images, failures, kinds = run_decoder(PillowDecoder((32, 48), batch_size=4, workers=2), items)
    assert sorted(images) == ["array", "pil"] and set(kinds) == {"pillow"}
    np.testing.assert_array_equal(images["pil"], images["array"])
    expected = load_resized_rgb(tmp_path / "a.png", (32, 48)).pixels  # a PNG has no draft mode: the file's own pixels
    np.testing.assert_array_equal(images["pil"], expected)
    assert (
        failures["gray array"] == "a uint8 array of shape (48, 72); pass an (H, W, 3) uint8 RGB array "
        "(or a PIL image, a path, or the encoded bytes); for several images pass a list"
    )
    assert "float32 array of shape (48, 72, 3)" in failures["float array"]


def test_pillow_entries_carry_their_input_positions(photo_folder: Path):
    (photo_folder / "2_empty.jpg").write_bytes(b"")
    items = items_in(photo_folder)
    order = []
    for entry in PillowDecoder((32, 48), batch_size=2, workers=2).batches(items):
        order += [entry.position] if isinstance(entry, Failure) else entry.positions
    assert sorted(order) == list(range(len(items)))
    assert all(abs(position - index) <= 2 for index, position in enumerate(order))  # a failure can overtake its batch
    empty = next(i for i, item in enumerate(items) if name_of(item) == "2_empty.jpg")
    assert [position for position in order if position != empty] == [i for i in range(len(items)) if i != empty]


@needs_dali
@pytest.mark.dali
def test_dali_strays_from_the_input_order_by_a_batch_at_most(photo_folder: Path):
    """PNGs go to Pillow, JPEGs to DALI; both groups are flushed together so neither waits for the end."""
    for i in range(6):
        write_photo(photo_folder / f"{i}.png", (96, 144), seed=30 + i)
    items = items_in(photo_folder)  # 0.jpg 0.png 1.jpg 1.png ...
    decoder = DaliDecoder(ModelContract(64, 96), 2, 2, device_id=None, tta=False)
    order = []
    for entry in decoder.batches(items):
        order += entry.positions
    assert sorted(order) == list(range(len(items)))
    assert all(abs(position - index) <= 2 for index, position in enumerate(order))
    assert decoder.pillow_fallbacks == 6


@needs_dali
@pytest.mark.dali
def test_dali_streams_of_any_length_and_a_stream_closed_early_leave_nothing_behind(photo_folder: Path):
    """DALI runs a few batches ahead: a stream shorter than that still comes out whole, and batches in flight
    when a stream is closed never reach the next one."""
    decoder = DaliDecoder(ModelContract(64, 96), 2, 2, device_id=None, tta=False)
    items = items_in(photo_folder)
    one, _, _ = run_decoder(decoder, items[:1])
    assert list(one) == ["0.jpg"]
    stream = decoder.batches(items)
    first = next(stream)
    assert [name_of(item) for item in first.items] == ["0.jpg", "1.jpg"]
    stream.close()  # 2.jpg .. 5.jpg were in flight
    later, failures, _ = run_decoder(decoder, items[4:])
    assert sorted(later) == ["4.jpg", "5.jpg"] and not failures
    np.testing.assert_array_equal(later["4.jpg"], run_decoder(decoder, items[4:5])[0]["4.jpg"])


def test_a_dct_scale_just_short_of_the_model_size_is_padded_not_stretched(tmp_path: Path):
    """190x128 at DCT 1/2 is 95x64: one column short of 96x64, so the decode is padded with its last column."""
    write_photo(tmp_path / "car.jpg", (128, 190), seed=4)
    fitted = load_resized_rgb(tmp_path / "car.jpg", (64, 96))
    with Image.open(tmp_path / "car.jpg") as im:
        im.draft("RGB", draft_request((128, 190), (64, 96)))
        half = np.asarray(im.convert("RGB"))  # (64, 95, 3): libjpeg's 1/2 scale, nothing resampled
    assert fitted.shown == (128, 190) and fitted.content == (64, 95) and fitted.pixels.shape == (64, 96, 3)
    np.testing.assert_array_equal(fitted.pixels[:, :95], half)
    np.testing.assert_array_equal(fitted.pixels[:, 95], half[:, 94])
    sideways = tmp_path / "sideways.jpg"  # stored 128x190 and shown upright as 190x128: the padding follows the view
    with Image.open(tmp_path / "car.jpg") as im:
        exif = Image.Exif()
        exif[0x0112] = 6
        im.transpose(Image.Transpose.ROTATE_90).save(sideways, quality=95, exif=exif)
    turned = load_resized_rgb(sideways, (64, 96))
    assert turned.shown == (128, 190) and turned.content == (64, 95)
    np.testing.assert_array_equal(turned.pixels[:, 95], turned.pixels[:, 94])
    far = load_resized_rgb(tmp_path / "car.jpg", (64, 100))  # 95 is 5% short of 100: resized, all of it the photo
    assert far.content == (64, 100)


def test_the_pillow_decoder_tells_what_of_each_input_is_the_photo(tmp_path: Path, tiny_onnx: Path):
    truth = write_photo(tmp_path / "short.jpg", (128, 190), seed=5)
    write_photo(tmp_path / "exact.jpg", (128, 192), seed=6)
    items = [Item.from_path(tmp_path / "short.jpg"), Item.from_path(tmp_path / "exact.jpg")]
    (batch,) = PillowDecoder((64, 96), batch_size=2, workers=1).batches(items)
    assert batch.contents == [(64, 95), (64, 96)] and batch.pixels.shape == (2, 64, 96, 3)
    short, exact = CpuPredictor(load_model(tiny_onnx, "cpu"), threshold=0.5, tta=False).predict(batch)
    assert short.extent == (64.0, 95.0) and exact.extent is None  # the tiny model's scores are its input's size
    assert short.mask().shape == (128, 190) and dice(short.mask() > 0, truth) > 0.9
