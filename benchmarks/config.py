"""What a benchmark run measures (the suite presets and the run's own settings), and how it fails.

Every option reaches the measuring code as one of these frozen dataclasses, checked once in
``__post_init__``: a bad value is a ``ValueError`` naming the option before anything is measured.
This module imports no measuring library, so the CLI can build and check a config with no extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from batch.core.devices import DeviceError, parse_device
from batch.core.errors import CarvanaError
from batch.core.extras import require
from batch.core.logs import first_line

DEFAULT_INPUT_SIZE = (320, 480)  # (H, W): Carvana photos at scale 0.25, the project's training size
DEFAULT_WIDTH = 16  # width of the random-weight model run end to end when no --model is given

NEEDS = (  # (module, extra, what for): run and tradeoff need all of them, so they are checked before anything runs
    ("onnxruntime", "cpu", "ONNX Runtime inference"),
    ("onnx", "cpu", "reading the models' contracts"),
    ("torch", "train", "exporting the random-weight U-Nets of the inference sweep"),
    ("onnxscript", "train", "exporting the random-weight U-Nets of the inference sweep"),
)
PLOT_NEEDS = (("matplotlib", "bench", "drawing results.png"),)


class BenchError(CarvanaError):
    """A benchmark that cannot run as asked; the message names the file or option and the fix."""


def describe_error(error: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``: what results.json records for a failed benchmark."""
    return f"{type(error).__name__}: {first_line(error)}"[:limit]


def check_extras(command: str, *, plots: bool = False) -> None:
    """:class:`~batch.core.extras.MissingExtra` naming the extra to install, before any measurement (not after minutes)."""
    for module, extra, purpose in NEEDS + (PLOT_NEEDS if plots else ()):
        require(module, extra, what=f"{command} ({purpose})")


def fail_unless(checks: dict[str, bool], context: str) -> None:
    """``ValueError`` listing every message whose check is False."""
    failed = [message for message, ok in checks.items() if not ok]
    if failed:
        raise ValueError(f"{context}: " + "; ".join(failed))


@dataclass(frozen=True)
class SweepConfig:
    """How the inference sweep measures one model on one provider."""

    batch_sizes: tuple[int, ...]  # tried smallest first
    warmup: int = 1  # untimed calls before each measurement (at least one runs: the first call allocates)
    repeats: int = 3  # timed calls per batch size
    max_batch_seconds: float = 10.0  # the sweep stops before a batch predicted to take longer than this

    def __post_init__(self) -> None:
        fail_unless(sweep_checks(self), "inference sweep")


def sweep_checks(config: SweepConfig | SuiteConfig) -> dict[str, bool]:
    sizes = config.batch_sizes
    return {
        "batch sizes must be positive and increasing": bool(sizes) and min(sizes) >= 1 and list(sizes) == sorted(set(sizes)),
        "warmup must be >= 0 and repeats >= 1": config.warmup >= 0 and config.repeats >= 1,
        "max_batch_seconds must be positive": config.max_batch_seconds > 0,
    }


@dataclass(frozen=True)
class SuiteConfig:
    """How much of everything to measure on one kind of device (results.json records it as ``suite_config``)."""

    name: str
    images: int  # photos decoded per repeat, and the pool inference batches are drawn from
    warmup: int  # untimed calls before each measurement
    repeats: int  # timed calls per measurement
    widths: tuple[int, ...]  # U-Net widths of the inference sweep (random weights: speed does not depend on them)
    batch_sizes: tuple[int, ...]  # inference sweep
    max_batch_seconds: float  # the sweep stops before a batch predicted to take longer than this
    e2e_images: int  # photos per end-to-end run of `unet-batch segment`
    e2e_repeats: int  # end-to-end runs (each a fresh process)
    baseline_images: int  # photos through each naive per-image loop (after one warm-up photo)
    dali_batch: int  # DALI pipeline batch size in the decode benchmark
    tensorrt_all_widths: bool = False  # False: TensorRT only for the end-to-end model (engine builds are slow)

    def __post_init__(self) -> None:
        checks = {
            "images must be >= 1": self.images >= 1,
            "widths must be positive": bool(self.widths) and min(self.widths) >= 1,
            "e2e_images, e2e_repeats and baseline_images must be >= 1": min(self.e2e_images, self.e2e_repeats) >= 1
            and self.baseline_images >= 1,
            "dali_batch must be between 1 and images": 1 <= self.dali_batch <= self.images,
        }
        fail_unless(checks | sweep_checks(self), f"suite {self.name!r}")

    @property
    def sweep(self) -> SweepConfig:
        return SweepConfig(self.batch_sizes, self.warmup, self.repeats, self.max_batch_seconds)


WIDTHS = (16, 32, 64)

# Each suite has a CPU and a GPU preset: a GPU needs bigger batches and many more photos end to end
# (the runner's first batch includes cuDNN's algorithm search, which a few photos would not amortize).
# quick: about two minutes on a shared 2-core CPU. classic: the width-64 U-Net alone, for `--size
# 640x960 --width 64`, with few photos on a CPU, where one takes seconds. smoke: seconds, to check that
# every stage runs (CI); its figures mean nothing, use it with --size 32x48.
PRESET_FIELDS = ("images", "warmup", "repeats", "widths", "batch_sizes", "max_batch_seconds")
PRESET_FIELDS += ("e2e_images", "e2e_repeats", "baseline_images", "dali_batch", "tensorrt_all_widths")
PRESETS = {  # (suite, device kind): the values of PRESET_FIELDS
    ("quick", "cpu"): (16, 1, 3, WIDTHS, (1, 2, 4), 2.5, 96, 2, 6, 8, False),
    ("quick", "cuda"): (64, 3, 5, WIDTHS, (1, 8, 32, 64), 5.0, 512, 2, 16, 32, False),
    ("full", "cpu"): (32, 2, 5, WIDTHS, (1, 2, 4, 8, 16), 20.0, 64, 3, 16, 16, False),
    ("full", "cuda"): (256, 5, 10, WIDTHS, (1, 2, 4, 8, 16, 32, 64, 128, 256), 10.0, 1600, 3, 64, 64, True),
    ("classic", "cpu"): (4, 1, 2, (64,), (1, 2), 120.0, 6, 1, 3, 4, False),
    ("classic", "cuda"): (64, 3, 5, (64,), (1, 8, 32, 64), 5.0, 1024, 2, 16, 32, False),
    ("smoke", "cpu"): (4, 0, 2, (4, 8), (1, 2), 5.0, 2, 1, 2, 2, False),
    ("smoke", "cuda"): (4, 0, 2, (4, 8), (1, 2), 5.0, 2, 1, 2, 2, False),
}


def suites_from_presets() -> dict[str, dict[str, SuiteConfig]]:
    suites: dict[str, dict[str, SuiteConfig]] = {}
    for (name, kind), values in PRESETS.items():
        suites.setdefault(name, {})[kind] = SuiteConfig(name, **dict(zip(PRESET_FIELDS, values)))
    return suites


SUITES = suites_from_presets()  # suite -> device kind -> SuiteConfig


@dataclass(frozen=True)
class RunConfig:
    """The options of ``unet-bench run``."""

    suite: str  # a key of SUITES; the CPU or GPU preset is chosen once the device is known
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    images_dir: Path | None = None  # real photos; None: synthesize Carvana-like JPEGs
    model: Path | None = None  # an exported .onnx (or a unet-train .pt) to run end to end; None: random weights
    input_size: tuple[int, int] | None = None  # (H, W); None: the model's own, else DEFAULT_INPUT_SIZE
    width: int = DEFAULT_WIDTH  # U-Net width run end to end when no model is given
    depth: int = 4  # U-Net depth of the random-weight models
    seed: int = 0  # synthetic photos and random weights
    widths: tuple[int, ...] = field(default=())  # override the suite's sweep widths (tests use tiny ones)

    def __post_init__(self) -> None:
        if self.suite not in SUITES:
            raise ValueError(f"suite {self.suite!r} is not one of {', '.join(SUITES)}")
        try:
            object.__setattr__(self, "device", str(parse_device(self.device)))
        except DeviceError as e:  # a malformed value, like every other option's
            raise ValueError(str(e)) from e
        if self.width < 1 or not 1 <= self.depth <= 8:
            raise ValueError(f"width must be >= 1 and depth 1..8, got width={self.width}, depth={self.depth}")
        height, width = self.input_size or (2**self.depth, 2**self.depth)
        if height <= 0 or width <= 0 or height % 2**self.depth or width % 2**self.depth:
            raise ValueError(f"input size {height}x{width} must be positive multiples of 2**depth = {2**self.depth}")
        if self.images_dir is not None and not Path(self.images_dir).is_dir():
            raise ValueError(f"--images {self.images_dir} is not a folder of photos")
        if self.model is not None and Path(self.model).suffix not in (".onnx", ".pt"):
            raise ValueError(f"--model {self.model}: expected an exported .onnx file or a unet-train .pt checkpoint")
        if self.model is not None and Path(self.model).suffix == ".onnx" and self.input_size is not None:
            raise ValueError(
                f"--size cannot change the input size of {self.model}: unet-batch resizes photos to the size "
                "in its metadata. Drop --size, or re-export it with `unet-export to-onnx --input-size`"
            )
        if self.widths and min(self.widths) < 1:
            raise ValueError(f"widths must be positive, got {self.widths}")

    @property
    def checkpoint(self) -> Path | None:
        """The unet-train checkpoint given as --model, whose weights the torch baselines load."""
        return self.model if self.model is not None and self.model.suffix == ".pt" else None

    def preset(self, kind: str) -> SuiteConfig:
        """The suite for ``kind`` ("cpu" or "cuda"), with ``widths`` applied."""
        suite = SUITES[self.suite][kind]
        return replace(suite, widths=self.widths) if self.widths else suite
