"""The ONNX models a benchmark runs: random-weight U-Nets of each width, or the user's own model.

Speed does not depend on the weights, so the inference sweep exports freshly initialised U-Nets
with the project's real exporter (``export.onnx_export.export_model``: uint8 NHWC in, normalization
in the graph, FP16 or FP32). Exporting takes seconds per model, so exported files are cached,
keyed by everything that changes them, including a hash of the exporter's and the model's source.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path

from batch.core.contract import IMAGENET_MEAN, IMAGENET_STD, ContractError, ModelContract
from benchmarks.errors import BenchError
from benchmarks.flops import unet_gflops

log = logging.getLogger(__name__)

REPO = Path(__file__).resolve().parents[1]
EXPORT_SOURCES = (
    REPO / "export" / "onnx_export.py",
    REPO / "export" / "quantize.py",
    REPO / "unet" / "model.py",
    REPO / "batch" / "contract.py",
)
CALIBRATION_IMAGES = 8  # INT8 speed does not depend on the ranges; a few photos keep the quantization quick


class ModelError(BenchError):
    """A model that cannot be benchmarked; the message names the file and the fix."""


@dataclass(frozen=True)
class BenchModel:
    name: str  # e.g. "unet-w16" or the user's file name
    path: Path  # the .onnx file
    contract: ModelContract
    input_name: str  # the graph's input
    model_config: dict | None  # U-Net config (for FLOPs); None when the file does not say
    random_weights: bool

    @property
    def precision(self) -> str:
        return self.contract.precision

    @property
    def width(self) -> int | None:
        return int(self.model_config["width"]) if self.model_config else None

    def gflops(self, size: tuple[int, int]) -> float | None:
        """GFLOPs per image at ``size``, or None when the architecture is unknown."""
        return unet_gflops(self.model_config, size) if self.model_config else None


def read_model(path: str | Path, name: str | None = None, random_weights: bool = False) -> BenchModel:
    """Describe an exported model from its metadata (``docs/onnx-contract.md``)."""
    import onnx

    path = Path(path)
    if not path.is_file():
        raise ModelError(f"model {path} does not exist: export one with `unet-export to-onnx`")
    try:
        proto = onnx.load(str(path), load_external_data=False)
    except Exception as e:  # onnx raises DecodeError, ValueError, OSError... for a file that is not ONNX
        raise ModelError(f"{path} is not an ONNX model ({type(e).__name__}): export one with `unet-export to-onnx`") from e
    meta = {p.key: p.value for p in proto.metadata_props}
    try:
        contract = ModelContract.from_metadata(meta, source=str(path))
    except ContractError as e:
        raise ModelError(str(e)) from e
    if len(proto.graph.input) != 1:
        raise ModelError(f"{path} has {len(proto.graph.input)} graph inputs; the contract expects one (image)")
    config = None
    if "model_config" in contract.provenance:
        try:
            config = json.loads(contract.provenance["model_config"])
        except json.JSONDecodeError:
            log.warning("%s: metadata model_config is not JSON; FLOPs will not be reported", path)
    return BenchModel(name or path.stem, path, contract, proto.graph.input[0].name, config, random_weights)


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


def random_model(
    width: int, depth: int, size: tuple[int, int], *, fp16: bool, seed: int, folder: Path, cache_dir: Path | None
) -> BenchModel:
    """Export (or take from the cache) a U-Net of ``width`` with random weights."""
    precision = "fp16" if fp16 else "fp32"
    name = f"unet-w{width}-d{depth}-{size[0]}x{size[1]}-{precision}-seed{seed}"
    path = folder / f"{name}.onnx"
    cached = cache_dir / f"{name}-{source_hash()}.onnx" if cache_dir else None
    if cached and cached.is_file():
        log.info("model %s from the cache %s", name, cached)
        shutil.copyfile(cached, path)
    else:
        export_random(width, depth, size, fp16=fp16, seed=seed, out=path)
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, cached)
    return read_model(path, name=f"unet-w{width}", random_weights=True)


def export_random(width: int, depth: int, size: tuple[int, int], *, fp16: bool, seed: int, out: Path) -> None:
    try:
        import torch

        from export.onnx_export import export_model
        from unet.model import UNet, UNetConfig
    except ImportError as e:
        raise ModelError(
            f"building width-{width} models needs torch ({e}): install the train extra "
            "(pip install -e '.[train]') or pass --model with an exported .onnx"
        ) from e
    log.info("exporting a random-weight U-Net, width %d, %s (%dx%d)", width, "fp16" if fp16 else "fp32", *size)
    torch.manual_seed(seed)
    model = UNet(UNetConfig(width=width, depth=depth)).eval()
    export_model(
        model,
        out,
        input_size=size,
        pixel_mean=IMAGENET_MEAN,
        pixel_std=IMAGENET_STD,
        fp16=fp16,
        provenance={"benchmark": "random weights, exported by unet-bench"},
    )


def int8_model(fp32: BenchModel, photos: list[Path], *, folder: Path, cache_dir: Path | None) -> BenchModel:
    """``fp32`` quantized to INT8 the way ``unet-export --int8`` does it, calibrated on ``photos``.

    Random-weight models are cached like their FP32 files (whatever photos calibrated them: speed does
    not depend on the ranges); a model given with --model is quantized afresh.
    """
    from export.quantize import QuantizeError, quantize_model

    name = f"{fp32.path.stem}-int8"
    path = folder / f"{name}.onnx"
    cached = cache_dir / f"{name}-{source_hash()}.onnx" if cache_dir and fp32.random_weights else None
    if cached and cached.is_file():
        log.info("model %s from the cache %s", name, cached)
        shutil.copyfile(cached, path)
    else:
        log.info("quantizing %s to INT8 (calibrated on %d photos)", fp32.name, min(len(photos), CALIBRATION_IMAGES))
        try:
            quantize_model(fp32.path, path, photos, calibration_images=CALIBRATION_IMAGES)
        except QuantizeError as e:
            raise ModelError(f"INT8 of {fp32.name}: {e}") from e
        if cached:
            cached.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, cached)
    return read_model(path, name=fp32.name, random_weights=fp32.random_weights)


def user_model(path: Path, *, fp16: bool, input_size: tuple[int, int] | None, folder: Path) -> BenchModel:
    """The user's ``--model``: an .onnx file as it is, or a unet-train checkpoint exported here."""
    if path.suffix == ".onnx":
        model = read_model(path)
        if model.precision != ("fp16" if fp16 else "fp32"):
            log.info("%s is %s; it is benchmarked in that precision only", path.name, model.precision)
        return model
    try:
        from export.onnx_export import ExportError, export_checkpoint
        from unet.checkpoint import CheckpointError
    except ImportError as e:
        raise ModelError(f"--model {path}: exporting a checkpoint needs torch ({e}); pass an exported .onnx instead") from e
    out = folder / f"{path.stem}-{'fp16' if fp16 else 'fp32'}.onnx"
    try:
        export_checkpoint(path, out, fp16=fp16, input_size=input_size)
    except (ExportError, CheckpointError) as e:
        raise ModelError(f"--model {path}: {e}") from e
    return read_model(out, name=path.stem)
