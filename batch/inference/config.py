"""How images are segmented: the options of :class:`batch.inference.segmenter.Segmenter`.

A plain frozen dataclass, checked when it is made, importable without ONNX Runtime: the command line
takes its option defaults from it, so ``unet-batch --help`` works with any extras installed. A folder
run's options extend it (:class:`batch.runs.config.RunConfig`).
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, fields
from pathlib import Path

from batch.core.devices import DeviceError, parse_device

DECODERS = ("auto", "dali", "pillow")
RUNTIMES = ("auto", "onnxruntime", "openvino")  # what runs the model on the CPU (a GPU always runs ONNX Runtime's CUDA)
OPENVINO_PRECISIONS = ("f32", "bf16")  # OpenVINO's inference precisions used here (its INFERENCE_PRECISION_HINT)
DEFAULT_BATCH_SIZE = {"cpu": 8, "cuda": 32}  # photos per inference batch when none is given


@dataclass(frozen=True, kw_only=True)
class SegmenterConfig:
    """How images are segmented: the model, where it runs, how photos are decoded, and the batch sizes."""

    model: Path | None = None  # ONNX file from unet-export; None: the bundled model (batch.default_model_path)
    device: str = "auto"  # auto | cpu | cuda | cuda:N (any case; kept in canonical form)
    tta: bool = False  # average with the prediction for the horizontally mirrored photo (2x the inference)
    threshold: float | None = None  # car probability cut; None: the model's metadata
    batch_size: int | None = None  # None: 32 on a GPU, 8 on the CPU
    decoder: str = "auto"  # auto (DALI on a GPU, Pillow on the CPU) | dali | pillow
    workers: int | None = None  # decode and post-processing (writer) threads each; None: CPU cores
    threads: int | None = None  # inference threads (ONNX Runtime's intra-op, OpenVINO's); None: CPU cores
    streams: int | None = None  # CPU batches run at once, the threads split among them; None: the runtime's choice
    runtime: str = "auto"  # auto (the faster on this CPU for this model, measured once) | onnxruntime | openvino
    read_timeout: float = 60.0  # seconds one photo's read may take before it is failed (a hung network filesystem)

    def __post_init__(self) -> None:
        if self.model is not None:
            object.__setattr__(self, "model", Path(self.model))
        try:
            object.__setattr__(self, "device", str(parse_device(self.device)))
        except DeviceError as e:
            raise ValueError(str(e)) from e
        if self.decoder not in DECODERS:
            raise ValueError(f"decoder must be one of {', '.join(DECODERS)}, not {self.decoder!r}")
        object.__setattr__(self, "runtime", str(self.runtime).strip().lower())
        if self.runtime not in RUNTIMES:
            raise ValueError(f"runtime must be one of {', '.join(RUNTIMES)}, not {self.runtime!r}")
        conflict = runtime_device_conflict(self.runtime, self.device)
        if conflict:
            raise ValueError(conflict)
        for name in ("batch_size", "workers", "threads", "streams"):
            check_positive(name, getattr(self, name))
        if not 0 < self.read_timeout <= 24 * 3600:
            raise ValueError(f"read_timeout must be between 0 and a day, in seconds, not {self.read_timeout}")
        if self.threshold is not None and not 0 < self.threshold < 1:
            raise ValueError(f"threshold must be a probability strictly between 0 and 1, not {self.threshold}")


def runtime_device_conflict(runtime: str, device: str) -> str | None:
    """Why ``runtime`` cannot run on ``device`` (OpenVINO on a CUDA GPU), or None when it can."""
    if runtime == "openvino" and device.startswith("cuda"):
        return (
            f"runtime openvino runs on the CPU only, not on {device}: a GPU runs ONNX Runtime's CUDA provider. "
            "Use --device cpu with --runtime openvino, or --runtime onnxruntime (or auto) on the GPU"
        )
    return None


def check_positive(name: str, value: int | None) -> None:
    if value is not None and value < 1:
        raise ValueError(f"{name} must be a positive integer, not {value}")


def defaults(config: type) -> dict[str, object]:
    """Field name -> default value of a config dataclass (the command line's option defaults)."""
    return {f.name: f.default for f in fields(config) if f.default is not MISSING}


def segmenter_options(config: SegmenterConfig) -> dict[str, object]:
    """The :class:`SegmenterConfig` fields of ``config`` (also of a run's config, which extends it), as keyword arguments."""
    return {f.name: getattr(config, f.name) for f in fields(SegmenterConfig)}
