"""What a benchmark run measures: the suite presets and the run's own settings."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path

from batch.core.devices import DeviceError, parse_device
from batch.core.extras import require

DEFAULT_INPUT_SIZE = (320, 480)  # (H, W): Carvana photos at scale 0.25, the project's training size
DEFAULT_WIDTH = 16  # width of the random-weight model run end to end when no --model is given


NEEDS = (  # (module, extra, what for): run and tradeoff need all of them, so they are checked before anything runs
    ("onnxruntime", "cpu", "ONNX Runtime inference"),
    ("onnx", "cpu", "reading the models' contracts"),
    ("torch", "train", "exporting the random-weight U-Nets of the inference sweep"),
    ("onnxscript", "train", "exporting the random-weight U-Nets of the inference sweep"),
)


def check_extras(command: str) -> None:
    """:class:`~batch.core.extras.MissingExtra` naming the extra to install, before any measurement."""
    for module, extra, purpose in NEEDS:
        require(module, extra, what=f"{command} ({purpose})")


@dataclass(frozen=True)
class SuiteConfig:
    """How much of everything to measure on one kind of device."""

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
            "warmup must be >= 0": self.warmup >= 0,
            "repeats must be >= 1": self.repeats >= 1,
            "widths must be positive": bool(self.widths) and min(self.widths) >= 1,
            "batch sizes must be positive and increasing": bool(self.batch_sizes)
            and min(self.batch_sizes) >= 1
            and list(self.batch_sizes) == sorted(set(self.batch_sizes)),
            "max_batch_seconds must be positive": self.max_batch_seconds > 0,
            "e2e_images, e2e_repeats and baseline_images must be >= 1": min(
                self.e2e_images, self.e2e_repeats, self.baseline_images
            )
            >= 1,
            "dali_batch must be between 1 and images": 1 <= self.dali_batch <= self.images,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError(f"suite {self.name!r}: " + "; ".join(failed))


WIDTHS = (16, 32, 64)

# Each suite has a CPU and a GPU preset: a GPU needs bigger batches and many more photos end to end
# (the runner's first batch includes cuDNN's algorithm search, which a few photos would not amortize).
SUITES: dict[str, dict[str, SuiteConfig]] = {
    # About two minutes on a shared 2-core CPU.
    "quick": {
        "cpu": SuiteConfig(
            name="quick",
            images=16,
            warmup=1,
            repeats=3,
            widths=WIDTHS,
            batch_sizes=(1, 2, 4),
            max_batch_seconds=2.5,
            e2e_images=96,
            e2e_repeats=2,
            baseline_images=6,
            dali_batch=8,
        ),
        "cuda": SuiteConfig(
            name="quick",
            images=64,
            warmup=3,
            repeats=5,
            widths=WIDTHS,
            batch_sizes=(1, 8, 32, 64),
            max_batch_seconds=5.0,
            e2e_images=512,
            e2e_repeats=2,
            baseline_images=16,
            dali_batch=32,
        ),
    },
    "full": {
        "cpu": SuiteConfig(
            name="full",
            images=32,
            warmup=2,
            repeats=5,
            widths=WIDTHS,
            batch_sizes=(1, 2, 4, 8, 16),
            max_batch_seconds=20.0,
            e2e_images=64,
            e2e_repeats=3,
            baseline_images=16,
            dali_batch=16,
        ),
        "cuda": SuiteConfig(
            name="full",
            images=256,
            warmup=5,
            repeats=10,
            widths=WIDTHS,
            batch_sizes=(1, 2, 4, 8, 16, 32, 64, 128, 256),
            max_batch_seconds=10.0,
            e2e_images=1600,
            e2e_repeats=3,
            baseline_images=64,
            dali_batch=64,
            tensorrt_all_widths=True,
        ),
    },
    # The classic width-64 U-Net alone, for `--size 640x960 --width 64`: few photos, since one takes
    # seconds on a CPU; the end-to-end / inference / naive-loop ratios are what it is for.
    "classic": {
        "cpu": SuiteConfig(
            name="classic",
            images=4,
            warmup=1,
            repeats=2,
            widths=(64,),
            batch_sizes=(1, 2),
            max_batch_seconds=120.0,
            e2e_images=6,
            e2e_repeats=1,
            baseline_images=3,
            dali_batch=4,
        ),
        "cuda": SuiteConfig(
            name="classic",
            images=64,
            warmup=3,
            repeats=5,
            widths=(64,),
            batch_sizes=(1, 8, 32, 64),
            max_batch_seconds=5.0,
            e2e_images=1024,
            e2e_repeats=2,
            baseline_images=16,
            dali_batch=32,
        ),
    },
    # Seconds: checks that every stage runs (CI). Its figures mean nothing; use it with --size 32x48.
    "smoke": {
        kind: SuiteConfig(
            name="smoke",
            images=4,
            warmup=0,
            repeats=2,
            widths=(4, 8),
            batch_sizes=(1, 2),
            max_batch_seconds=5.0,
            e2e_images=2,
            e2e_repeats=1,
            baseline_images=2,
            dali_batch=2,
        )
        for kind in ("cpu", "cuda")
    },
}


@dataclass(frozen=True)
class RunConfig:
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
        except DeviceError as e:
            raise ValueError(str(e)) from e
        if self.width < 1 or not 1 <= self.depth <= 8:
            raise ValueError(f"width must be >= 1 and depth 1..8, got width={self.width}, depth={self.depth}")
        if self.input_size is not None:
            height, width = self.input_size
            multiple = 2**self.depth
            if height <= 0 or width <= 0 or height % multiple or width % multiple:
                raise ValueError(f"input size {height}x{width} must be positive multiples of 2**depth = {multiple}")
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

    def preset(self, kind: str) -> SuiteConfig:
        """The suite for ``kind`` ("cpu" or "cuda"), with ``widths`` applied."""
        suite = SUITES[self.suite][kind]
        return replace(suite, widths=self.widths) if self.widths else suite
