"""The ONNX models a benchmark runs: random-weight U-Nets of each width, or the user's own model.

Speed does not depend on the weights, so the inference sweep exports freshly initialised U-Nets
with the project's real exporter (``export.onnx_export.export_model``: uint8 NHWC in, normalization
in the graph, FP16 or FP32). Exporting takes seconds per model, so exported files are cached,
keyed by everything that changes them, including a hash of the exporter's and the model's source.
Every file's contract is read by the batch runner's own reader, so a benchmark runs only what
``unet-batch`` would run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path

from batch.core.contract import IMAGENET_MEAN, IMAGENET_STD, ModelContract
from benchmarks.config import DEFAULT_INPUT_SIZE, BenchError, RunConfig
from benchmarks.flops import unet_gflops

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXPORT_SOURCES = [
    REPO / path for path in ("export/onnx_export.py", "export/quantize.py", "unet/model.py", "batch/core/contract.py")
]
CALIBRATION_IMAGES = 8  # INT8 speed does not depend on the ranges; a few photos keep the quantization quick


class ModelError(BenchError):
    """A model that cannot be benchmarked; the message names the file and the fix."""


@dataclass(frozen=True)
class BenchModel:
    name: str  # e.g. "unet-w16" or the user's file name
    path: Path  # the .onnx file
    contract: ModelContract
    random_weights: bool
    checkpoint: Path | None = None  # the unet-train checkpoint it was exported from, when the user gave one
    seed: int = 0  # of the random weights (a torch baseline rebuilds the network from it without a checkpoint)

    @property
    def precision(self) -> str:
        return self.contract.precision

    @property
    def model_config(self) -> dict | None:
        """The U-Net config the export recorded (for FLOPs and the torch baselines); None when the file does not say."""
        try:
            return json.loads(self.contract.provenance["model_config"])
        except (KeyError, json.JSONDecodeError):
            return None

    @property
    def width(self) -> int | None:
        config = self.model_config
        return int(config["width"]) if config else None

    def gflops(self, size: tuple[int, int]) -> float | None:
        """GFLOPs per image at ``size``, or None when the architecture is unknown."""
        config = self.model_config
        return unet_gflops(config, size) if config else None


def read_model(path: str | Path, name: str | None = None) -> BenchModel:
    """Describe an exported model by its contract, read and checked as ``unet-batch`` reads it."""
    from batch.inference.model import read_contract
    from batch.inference.runtime import ModelError as RunnerModelError

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist: export one with `unet-export to-onnx`")
    try:
        contract = read_contract(path)
    except RunnerModelError as e:
        raise ModelError(str(e)) from e
    return BenchModel(name or path.stem, path, contract, random_weights=False)


def model_input_size(config: RunConfig) -> tuple[int, int]:
    """The input size of a run: --size, else the model's own, else the project's training size."""
    if config.input_size is not None:
        return config.input_size
    if config.model is not None and config.model.suffix == ".onnx":
        return read_model(config.model).contract.input_size
    if config.model is not None:
        from unet.checkpoint import load_checkpoint

        return tuple(load_checkpoint(config.model)["input_size"])
    return DEFAULT_INPUT_SIZE


def source_hash() -> str:
    """Hash of the code that shapes an exported model: a cached file from older code is not reused."""
    digest = hashlib.sha256()
    for source in EXPORT_SOURCES:
        digest.update(source.read_bytes() if source.is_file() else b"missing")
    return digest.hexdigest()[:12]


def bundled_source(checkpoints: Path = REPO / "checkpoints") -> tuple[Path, tuple[int, int]]:
    """The checkpoint the bundled ``default.onnx`` was exported from, and the input size it was exported at.

    The checkpoint is found in ``checkpoints`` by the SHA-256 the export recorded, so benchmarks of "the
    bundled model's weights" (e.g. the PyTorch peer) never drift from the shipped file.
    """
    from batch.inference.bundled import DEFAULT_MODEL, models_folder

    bundled = read_model(models_folder() / DEFAULT_MODEL)
    wanted = bundled.contract.provenance.get("source_checkpoint_sha256")
    if wanted is None:
        raise ModelError(f"{bundled.path} does not record the SHA-256 of its checkpoint: re-export it with unet-export")
    for candidate in sorted(checkpoints.glob("*/*.pt")):
        with open(candidate, "rb") as f:
            if hashlib.file_digest(f, "sha256").hexdigest() == wanted:
                return candidate, bundled.contract.input_size
    raise ModelError(
        f"no checkpoint under {checkpoints} has the SHA-256 {wanted[:12]}... that {bundled.path.name} was exported "
        "from: commit the checkpoint beside the model (checkpoints/<run>/best.pt)"
    )


def cached(name: str, folder: Path, cache_dir: Path | None, make: Callable[[Path], None]) -> Path:
    """``folder/name.onnx``: copied from ``cache_dir`` when the same code exported it before, else made (and cached)."""
    path = folder / f"{name}.onnx"
    kept = cache_dir / f"{name}-{source_hash()}.onnx" if cache_dir else None
    if kept and kept.is_file():
        log.info("model %s from the cache %s", name, kept)
        shutil.copyfile(kept, path)
        return path
    make(path)
    if kept:
        kept.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, kept)
    return path


def random_model(
    width: int, depth: int, size: tuple[int, int], *, fp16: bool, seed: int, folder: Path, cache_dir: Path | None
) -> BenchModel:
    """Export (or take from the cache) a U-Net of ``width`` with random weights."""
    name = f"unet-w{width}-d{depth}-{size[0]}x{size[1]}-{'fp16' if fp16 else 'fp32'}-seed{seed}"
    path = cached(name, folder, cache_dir, lambda out: export_random(width, depth, size, fp16=fp16, seed=seed, out=out))
    return replace(read_model(path, name=f"unet-w{width}"), random_weights=True, seed=seed)


def export_random(width: int, depth: int, size: tuple[int, int], *, fp16: bool, seed: int, out: Path) -> None:
    try:
        import torch

        from export.config import ExportOptions
        from export.onnx_export import TrainedModel, export_model
        from unet.model import UNet, UNetConfig
    except ImportError as e:
        raise ModelError(
            f"building width-{width} models needs torch ({e}): install the train extra "
            "(pip install -e '.[train]') or pass --model with an exported .onnx"
        ) from e
    log.info("exporting a random-weight U-Net, width %d, %s (%dx%d)", width, "fp16" if fp16 else "fp32", *size)
    torch.manual_seed(seed)
    trained = TrainedModel(UNet(UNetConfig(width=width, depth=depth)).eval(), IMAGENET_MEAN, IMAGENET_STD,
                           provenance={"benchmark": "random weights, exported by unet-bench"})  # fmt: skip
    export_model(trained, out, ExportOptions(fp16=fp16, input_size=size))


def int8_model(fp32: BenchModel, photos: list[Path], *, folder: Path, cache_dir: Path | None) -> BenchModel:
    """``fp32`` quantized to INT8 the way ``unet-export --int8`` does it, calibrated on ``photos``.

    Random-weight models are cached like their FP32 files (whatever photos calibrated them: speed does
    not depend on the ranges); a model given with --model is quantized afresh.
    """
    from export.config import QuantizeOptions
    from export.quantize import QuantizeError, quantize_model

    def quantize(out: Path) -> None:
        log.info("quantizing %s to INT8 (calibrated on %d photos)", fp32.name, min(len(photos), CALIBRATION_IMAGES))
        try:
            quantize_model(fp32.path, out, photos, QuantizeOptions(CALIBRATION_IMAGES))
        except QuantizeError as e:
            raise ModelError(f"INT8 of {fp32.name}: {e}") from e

    path = cached(f"{fp32.path.stem}-int8", folder, cache_dir if fp32.random_weights else None, quantize)
    int8 = read_model(path, name=fp32.name)
    return replace(int8, random_weights=fp32.random_weights, checkpoint=fp32.checkpoint, seed=fp32.seed)


def user_model(path: Path, *, fp16: bool, input_size: tuple[int, int] | None, folder: Path, seed: int = 0) -> BenchModel:
    """The user's ``--model``: an .onnx file as it is, or a unet-train checkpoint exported here."""
    if path.suffix == ".onnx":
        model = read_model(path)
        if model.precision != ("fp16" if fp16 else "fp32"):
            log.info("%s is %s; it is benchmarked in that precision only", path.name, model.precision)
        return replace(model, seed=seed)
    try:
        from export.config import ExportOptions
        from export.onnx_export import ExportError, export_checkpoint
        from unet.checkpoint import CheckpointError
    except ImportError as e:
        raise ModelError(f"--model {path}: exporting a checkpoint needs torch ({e}); pass an exported .onnx instead") from e
    out = folder / f"{path.stem}-{'fp16' if fp16 else 'fp32'}.onnx"
    try:
        export_checkpoint(path, out, ExportOptions(fp16=fp16, input_size=input_size))
    except (ExportError, CheckpointError) as e:
        raise ModelError(f"--model {path}: {e}") from e
    return replace(read_model(out, name=path.stem), checkpoint=path, seed=seed)


class Models:
    """The exported models of one run by (name, graph precision), made on first use; INT8 ones quantized from FP32."""

    def __init__(self, config: RunConfig, folder: Path, cache_dir: Path | None, calibration: list[Path]):
        self.config, self.folder, self.cache_dir, self.calibration = config, folder, cache_dir, calibration
        self.size = model_input_size(config)
        self._made: dict[tuple[str, str], BenchModel] = {}

    def random(self, width: int, precision: str) -> BenchModel:
        key = (f"w{width}", precision)
        if key in self._made:
            return self._made[key]
        if precision == "int8":
            model = self.int8(self.random(width, "fp32"))
        else:
            fp16, seed, depth = precision == "fp16", self.config.seed, self.config.depth
            model = random_model(width, depth, self.size, fp16=fp16, seed=seed, folder=self.folder, cache_dir=self.cache_dir)
        return self._made.setdefault(key, model)

    def user(self, precision: str) -> BenchModel:
        path = self.config.model
        key = ("user", precision if path.suffix == ".pt" or precision == "int8" else "as-is")
        if key in self._made:
            return self._made[key]
        if precision == "int8":
            model = self.int8(self.user("fp32"))
        else:
            fp16, seed = precision == "fp16", self.config.seed
            model = user_model(path, fp16=fp16, input_size=self.size, folder=self.folder, seed=seed)
        return self._made.setdefault(key, model)

    def int8(self, model: BenchModel) -> BenchModel:
        """``model`` quantized to INT8; a user's INT8 or FP16 file as it is (only FP32 graphs are quantized)."""
        if model.precision != "fp32":
            return model
        return int8_model(model, self.calibration, folder=self.folder, cache_dir=self.cache_dir)

    def for_e2e(self, precision: str) -> BenchModel:
        """The model run end to end: the user's, else the random-weight one of the run's width."""
        return self.user(precision) if self.config.model else self.random(self.config.width, precision)
