"""Shared fixtures: tiny synthetic car photos and masks made on the fly, tiny models and checkpoints."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from batch.core.contract import IMAGENET_MEAN, IMAGENET_STD

REPO = Path(__file__).resolve().parents[1]
CARVANA = REPO.parent / "shared" / "data" / "carvana"

# ---- the CPU runtime: a cache of the session's own, and ONNX Runtime by default ---------------------------


@pytest.fixture(scope="session", autouse=True)
def runtime_cache(tmp_path_factory) -> Iterator[Path]:
    """``runtime auto``'s cache (batch.inference.runtime_choice) in a folder of the test session, never the user's
    ~/.cache; set in the environment, so command subprocesses and Ray workers use it too."""
    folder = tmp_path_factory.mktemp("xdg-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(folder))
        yield folder / "carvana-unet"


@pytest.fixture(autouse=True)
def onnxruntime_measured_faster(monkeypatch) -> None:
    """``runtime auto`` measures ONNX Runtime faster in every test (a fake measurement, cached like a real one), so
    that no test's masks depend on which runtime won a race on a busy machine. tests/test_runtime_choice.py
    measures for real."""
    from batch.inference import runtime_choice

    def fake(networks: dict, x: np.ndarray, rounds: int = runtime_choice.MEASURE_ROUNDS) -> dict[str, float]:
        return {label: 2.0 if label == "onnxruntime" else 1.0 for label in networks}

    monkeypatch.setattr(runtime_choice, "measure_rates", fake)


# ---- GPU hosts: a gpu test that skips there fails ---------------------------------------------------


def pytest_addoption(parser):
    parser.addoption(
        "--gpu-host",
        action="store_true",
        help="this host has a GPU: a gpu test that skips (CUDA that will not start, DALI missing) fails instead",
    )


def gpu_host(config) -> bool:
    """--gpu-host, or an NVIDIA GPU's device file: where a skipped gpu test means a broken setup, not a missing GPU."""
    return config.getoption("--gpu-host") or any(Path("/dev").glob("nvidia[0-9]*"))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.skipped and item.get_closest_marker("gpu") and gpu_host(item.config):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"a gpu test skipped on a GPU host ({reason}): the GPU setup is broken"


# ---------------------------------------------------------------------------------------------
# Batch runner (batch/, issue 4): tiny ONNX models built with onnx.helper (no torch), and folders
# of synthetic photos.

BRIGHTNESS_CUT = 160.0  # synthetic cars are darker than this, studio backgrounds brighter
LOGIT_GAIN = 0.1  # logit per grey level away from the cut


def make_tiny_onnx(
    path: Path,
    layout: str = "NHWC",
    dtype: str = "uint8",
    output_kind: str = "logits",
    size: tuple[int, int] = (64, 96),
    output_dtype: str = "float32",
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN,
    pixel_std: tuple[float, float, float] = IMAGENET_STD,
) -> Path:
    """A 'U-Net' that finds dark cars on bright backgrounds: normalize -> 1x1 conv -> 3x3 mean conv.

    logit = LOGIT_GAIN * (BRIGHTNESS_CUT - mean RGB), smoothed over 3x3; the same function for every
    input layout and dtype (uint8 inputs are normalized inside the graph, float ones by the caller).
    Batch, height and width are dynamic; the metadata comes from ModelContract.to_metadata().
    """
    import onnx
    from onnx import TensorProto, helper

    from batch.core.contract import ModelContract

    mean, std = np.array(pixel_mean), np.array(pixel_std)
    # On normalized x_c = (p_c / 255 - m_c) / s_c: mean RGB = sum_c 255 (x_c s_c + m_c) / 3.
    weight = (-LOGIT_GAIN * 255 * std / 3).reshape(1, 3, 1, 1)
    bias = [LOGIT_GAIN * (BRIGHTNESS_CUT - 255 * mean.mean())]
    elem = {"uint8": TensorProto.UINT8, "float32": TensorProto.FLOAT, "float16": TensorProto.FLOAT16}
    shape = ["N", "H", "W", 3] if layout == "NHWC" else ["N", 3, "H", "W"]
    init = [
        helper.make_tensor("w", TensorProto.FLOAT, [1, 3, 1, 1], weight.ravel().tolist()),
        helper.make_tensor("b", TensorProto.FLOAT, [1], bias),
        helper.make_tensor("smooth", TensorProto.FLOAT, [1, 1, 3, 3], [1 / 9] * 9),
        helper.make_tensor("mean255", TensorProto.FLOAT, [1, 3, 1, 1], (255 * mean).tolist()),
        helper.make_tensor("std255", TensorProto.FLOAT, [1, 3, 1, 1], (255 * std).tolist()),
    ]
    nodes = [helper.make_node("Cast", ["image"], ["x"], to=TensorProto.FLOAT)]
    if layout == "NHWC":
        nodes.append(helper.make_node("Transpose", ["x"], ["nchw"], perm=[0, 3, 1, 2]))
    else:
        nodes.append(helper.make_node("Identity", ["x"], ["nchw"]))
    if dtype == "uint8":
        nodes += [
            helper.make_node("Sub", ["nchw", "mean255"], ["centred"]),
            helper.make_node("Div", ["centred", "std255"], ["normalized"]),
        ]
    else:
        nodes.append(helper.make_node("Identity", ["nchw"], ["normalized"]))
    nodes += [
        helper.make_node("Conv", ["normalized", "w", "b"], ["raw"]),
        helper.make_node("Conv", ["raw", "smooth"], ["logits32"], pads=[1, 1, 1, 1]),
    ]
    last = "logits32"
    if output_kind == "probabilities":
        nodes.append(helper.make_node("Sigmoid", [last], ["probs32"]))
        last = "probs32"
    nodes.append(helper.make_node("Cast", [last], ["scores"], to=elem[output_dtype]))
    graph = helper.make_graph(
        nodes,
        "tiny_segmenter",
        [helper.make_tensor_value_info("image", elem[dtype], shape)],
        [helper.make_tensor_value_info("scores", elem[output_dtype], ["N", 1, "H", "W"])],
        initializer=init,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], producer_name="tests")
    model.ir_version = 8
    contract = ModelContract(
        input_height=size[0],
        input_width=size[1],
        input_layout=layout,
        input_dtype=dtype,
        input_multiple=16,
        pixel_mean=pixel_mean,
        pixel_std=pixel_std,
        output_kind=output_kind,
        threshold=0.5,
        precision="fp32",
        provenance={"model_config": {"width": 0, "depth": 0}},
    )
    helper.set_model_props(model, contract.to_metadata())
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return path


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory) -> Path:
    """The default tiny model: uint8 NHWC input, logits output, 64x96."""
    return make_tiny_onnx(tmp_path_factory.mktemp("onnx") / "tiny.onnx")


@pytest.fixture(scope="module")
def cuda_model(tiny_onnx: Path):
    """The tiny model on CUDA GPU 0; skips without a usable GPU (which fails the test on a GPU host)."""
    from batch.core.devices import DeviceError
    from batch.inference.model import load_model

    try:
        return load_model(tiny_onnx, "cuda")
    except DeviceError as e:
        pytest.skip(f"no usable CUDA GPU: {e}")


def synthetic_pair(rng: np.random.Generator, height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    """A photo with one bright-ish ellipse 'car' on a textured studio background, and its bool mask."""
    yy, xx = np.mgrid[:height, :width]
    cy, cx = rng.uniform(0.35, 0.65) * height, rng.uniform(0.35, 0.65) * width
    ry, rx = rng.uniform(0.15, 0.3) * height, rng.uniform(0.2, 0.35) * width
    mask = ((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2 <= 1
    background = 200 + 20 * np.sin(xx / 7.0)[..., None] + rng.normal(0, 6, (height, width, 3))
    car = rng.uniform(20, 120, 3) + rng.normal(0, 6, (height, width, 3))
    photo = np.where(mask[..., None], car, background)
    return np.clip(photo, 0, 255).astype(np.uint8), mask


def write_kaggle_folder(root: Path, cars: int, views: int, size: tuple[int, int], seed: int = 0) -> Path:
    """``root/train/<car>_NN.jpg`` and ``root/train_masks/<car>_NN_mask.gif`` (palette 0/1), like Kaggle's."""
    rng = np.random.default_rng(seed)
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    for c in range(cars):
        car = f"{c:012x}"
        for v in range(1, views + 1):
            photo, mask = synthetic_pair(rng, *size)
            Image.fromarray(photo).save(root / "train" / f"{car}_{v:02d}.jpg", quality=95)
            gif = Image.fromarray(mask.astype(np.uint8), mode="L").convert("P")
            gif.putpalette([0, 0, 0, 255, 255, 255])
            gif.save(root / "train_masks" / f"{car}_{v:02d}_mask.gif")
    return root


@pytest.fixture
def kaggle_dir(tmp_path: Path) -> Path:
    """4 cars x 4 views of 64x96 synthetic photos in the Kaggle layout."""
    return write_kaggle_folder(tmp_path / "carvana", cars=4, views=4, size=(64, 96))


@pytest.fixture
def carvana_dir() -> Path:
    """The real shared Carvana photos; skips the test when the folder is absent."""
    if not (CARVANA / "train").is_dir():
        pytest.skip(
            f"real Carvana data not found at {CARVANA}: put the Kaggle train/ and train_masks/ folders there to run this test"
        )
    return CARVANA


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """A checkpoint of a width-4, depth-2 U-Net trained for one epoch on synthetic photos (64x96)."""
    from unet.model import UNetConfig
    from unet.train import TrainConfig, train

    root = tmp_path_factory.mktemp("tiny")
    data = write_kaggle_folder(root / "data", cars=3, views=4, size=(64, 96))
    cfg = TrainConfig(data_dir=str(data), out_dir=str(root / "run"), epochs=1, batch_size=4, scale=1.0, device="cpu", val_cars=1)
    train(cfg, UNetConfig(width=4, depth=2), progress=False)
    return root / "run" / "best.pt"


@pytest.fixture
def make_onnx(tmp_path: Path):
    """Factory: make_onnx(name, **make_tiny_onnx options) -> path of a tiny model in tmp_path."""
    return lambda name="model.onnx", **options: make_tiny_onnx(tmp_path / name, **options)


def write_photo(path: Path, size: tuple[int, int], seed: int, fmt: str | None = None, mode: str = "RGB") -> np.ndarray:
    """A synthetic car photo at ``path`` (format from the suffix unless ``fmt``); returns its true mask."""
    photo, mask = synthetic_pair(np.random.default_rng(seed), *size)
    path.parent.mkdir(parents=True, exist_ok=True)
    image = Image.fromarray(photo)
    if mode != "RGB":
        image = image.convert(mode)
    image.save(path, format=fmt, **({"quality": 95} if (fmt or path.suffix.lower()) in ("JPEG", ".jpg", ".jpeg") else {}))
    return mask


@pytest.fixture
def failing_inference(monkeypatch):
    """failing_inference(error, when): CpuPredictor.predict raises ``error`` on the calls (1, 2, ...) where
    ``when(call)`` is true and runs normally otherwise; returns the list of batch sizes it was called with.
    ``monkeypatch.undo()`` restores it."""
    from batch.inference.model import CpuPredictor

    real_predict = CpuPredictor.predict

    def install(error: BaseException, when) -> list[int]:
        calls: list[int] = []

        def predict(engine, batch):
            calls.append(len(batch))
            if when(len(calls)):
                raise error
            return real_predict(engine, batch)

        monkeypatch.setattr(CpuPredictor, "predict", predict)
        return calls

    return install


@pytest.fixture
def photo_tree(tmp_path: Path) -> Path:
    """A nested folder of synthetic photos of mixed sizes and formats (7 good images)."""
    root = tmp_path / "photos"
    write_photo(root / "a.jpg", (96, 144), seed=1)
    write_photo(root / "b.JPEG", (120, 180), seed=2)
    write_photo(root / "c.png", (80, 120), seed=3)
    write_photo(root / "day1" / "d.jpg", (96, 144), seed=4)
    write_photo(root / "day1" / "e.jpg", (64, 96), seed=5)
    write_photo(root / "day1" / "deep" / "f.jpeg", (150, 100), seed=6)
    write_photo(root / "day2" / "g.png", (96, 144), seed=7)
    return root


# ---------------------------------------------------------------------------------------------
# Export (export/, issue 3): a tiny checkpoint with real mask boundaries, its ONNX exports, photos.


@pytest.fixture(scope="session")
def parity_photos(tmp_path_factory) -> Path:
    """6 synthetic photos (2 cars x 3 views) at 128x192, twice the tiny model's input size; masks in ../train_masks."""
    root = write_kaggle_folder(tmp_path_factory.mktemp("parity"), cars=2, views=3, size=(128, 192), seed=1)
    return root / "train"


@pytest.fixture(scope="session")
def sharp_checkpoint(tiny_checkpoint: Path, parity_photos: Path, tmp_path_factory) -> Path:
    """tiny_checkpoint fine-tuned (60 full-batch steps) on the parity photos until its masks fit them (Dice ~0.99).

    One epoch of unet-train leaves the tiny net's logits nearly flat (every pixel car, |logit| < 0.4);
    FP16 parity and blank-mask checks need real boundaries on the photos they check, with logits of a
    trained net's size (~ +-5). Same file format as unet-train's (unet.checkpoint.save_checkpoint).
    """
    from unet.checkpoint import load_checkpoint

    return fine_tune(load_checkpoint(tiny_checkpoint), parity_photos, steps=60, lr=2e-2, out=tmp_path_factory.mktemp("sharp"))


def fine_tune(state: dict, parity_photos: Path, steps: int, lr: float, out: Path) -> Path:
    """``state``'s network trained ``steps`` full-batch steps on the parity photos (at half their size), saved as
    ``out/best.pt`` in unet-train's format. One thread and a fixed seed: the same weights on every machine."""
    import torch
    import torch.nn.functional as F

    from batch.core.images import load_resized_rgb
    from batch.core.masks import read_mask
    from unet.checkpoint import model_from_checkpoint, save_checkpoint

    photos = sorted(parity_photos.glob("*.jpg"))
    images = np.stack([load_resized_rgb(p, (64, 96)).pixels for p in photos])  # (6, 64, 96, 3)
    masks = np.stack([read_mask(parity_photos.parent / "train_masks" / f"{p.stem}_mask.gif")[::2, ::2] for p in photos])
    mean, std = (torch.tensor(state[key]).view(1, 3, 1, 1) for key in ("pixel_mean", "pixel_std"))
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255 - mean) / std  # (6, 3, 64, 96)
    y = torch.from_numpy(masks).float()[:, None]  # (6, 1, 64, 96)
    model = model_from_checkpoint(state).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny tensors: one thread beats two fighting over shared cores
    torch.manual_seed(0)
    try:
        for _ in range(steps):
            loss = F.binary_cross_entropy_with_logits(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    path = out / "best.pt"
    fields = {key: value for key, value in state.items() if key not in ("kind", "format")}
    save_checkpoint({**fields, "model": model.eval().state_dict()}, path)
    return path


@pytest.fixture(scope="session")
def exported_onnx(sharp_checkpoint: Path, tmp_path_factory) -> dict[str, Path]:
    """sharp_checkpoint exported by unet-export (uint8 NHWC, 64x96, default opset): {"fp16": path, "fp32": path}."""
    from export.config import ExportOptions
    from export.onnx_export import export_checkpoint

    folder = tmp_path_factory.mktemp("exported")
    paths = {"fp16": folder / "tiny-fp16.onnx", "fp32": folder / "tiny-fp32.onnx"}
    for precision, path in paths.items():
        export_checkpoint(sharp_checkpoint, path, ExportOptions(fp16=precision == "fp16"))
    return paths


# ---- benchmarks (unet-bench) ------------------------------------------------------------------------


@pytest.fixture(scope="session")
def bench_cache(tmp_path_factory) -> Path:
    """unet-bench's model cache for the whole test session: each tiny model is exported once."""
    return tmp_path_factory.mktemp("bench-cache")


@pytest.fixture(scope="session")
def bench_model(bench_cache: Path, tmp_path_factory):
    """A random-weight width-4, depth-4 U-Net exported FP32 at 32x48 (a benchmarks.models.BenchModel).

    The same file the `--suite smoke --size 32x48 --width 4 --widths 4` CLI run takes from bench_cache.
    """
    from benchmarks.models import random_model

    return random_model(4, 4, (32, 48), fp16=False, seed=0, folder=tmp_path_factory.mktemp("bench-model"), cache_dir=bench_cache)


@pytest.fixture(scope="session")
def bench_photos(tmp_path_factory) -> Path:
    """A folder of 5 synthetic studio-car JPEGs at 64x96 (benchmarks.synthetic)."""
    from benchmarks.synthetic import write_synthetic_photos

    folder = tmp_path_factory.mktemp("bench-photos")
    write_synthetic_photos(folder, 5, size=(64, 96), seed=3)
    return folder


# ---- object storage and Ray (issue 12) ------------------------------------------------------------


@pytest.fixture(scope="session")
def s3_endpoint() -> str:
    """A real S3-compatible server (moto's) on 127.0.0.1 for the test session; its URL."""
    moto_server = pytest.importorskip("moto.server", reason="the S3 tests need moto[server] (the 'dev' extra)")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3_bucket(s3_endpoint: str, monkeypatch, request) -> str:
    """A new empty bucket on the test server, with the standard AWS_* variables pointing at it; its URI."""
    for name, value in {
        "AWS_ENDPOINT_URL": s3_endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "eu-west-1",
    }.items():
        monkeypatch.setenv(name, value)
    from batch.runs.storage import open_location

    bucket = "test-" + "".join(c if c.isalnum() else "-" for c in request.node.name.lower())[:50].strip("-")
    store = open_location(f"s3://{bucket}")
    store.fs.mkdir(bucket)
    return f"s3://{bucket}"
