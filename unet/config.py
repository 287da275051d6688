"""Configurations of the network and of a training run: frozen dataclasses, importable without torch.

Their defaults are the defaults of ``unet-train`` (its options read them from here).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

from batch.core.contract import IMAGENET_MEAN, IMAGENET_STD
from batch.core.devices import parse_device

Upsample = Literal["transpose", "bilinear"]
LOSS_NAMES = ("bce-dice", "bce-lovasz")  # unet.losses.LOSSES: BCE + soft Dice, or BCE + Lovász hinge


@dataclass(frozen=True)
class UNetConfig:
    in_channels: int = 3  # channels of the input image (RGB)
    out_channels: int = 1  # one logit per pixel: car vs background
    width: int = 64  # channels of the first stage; stage k has width * 2**k
    depth: int = 4  # number of 2x poolings; input sides must be multiples of 2**depth
    upsample: Upsample = "transpose"  # "transpose": learned 2x2 transposed conv; "bilinear": resize + 1x1 conv
    fold: int = 1  # space-to-depth factor: the U-Net computes on a grid `fold` times coarser than its input and output

    def __post_init__(self) -> None:
        if self.in_channels < 1 or self.out_channels < 1:
            raise ValueError("in_channels and out_channels must be positive")
        if self.width < 1:
            raise ValueError(f"width must be a positive channel count, got {self.width}")
        if not 1 <= self.depth <= 8:
            raise ValueError(f"depth must be between 1 and 8 poolings, got {self.depth}")
        if self.upsample not in ("transpose", "bilinear"):
            raise ValueError(f"upsample must be 'transpose' or 'bilinear', got {self.upsample!r}")
        if not 1 <= self.fold <= 4:
            raise ValueError(f"fold must be between 1 (off) and 4 pixels per side, got {self.fold}")

    @property
    def multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth * self.fold

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> UNetConfig:
        known = {k: d[k] for k in cls.__dataclass_fields__ if k in d}
        return cls(**known)


@dataclass(frozen=True)
class TrainConfig:
    data_dir: str  # Kaggle (train/, train_masks/) or generic (images/, masks/) folder
    out_dir: str  # run folder for checkpoints and metrics
    epochs: int = 10  # total epochs (a resumed run continues up to this many)
    batch_size: int = 8  # images per optimizer step
    scale: float | None = 0.25  # training size as a fraction of the photo's size (ignored when size is set)
    size: tuple[int, int] | None = None  # training size (H, W), multiples of 2**depth
    lr: float = 1e-3  # peak AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    warmup_epochs: float = 0.5  # linear warm-up from lr/10, then cosine decay to lr/100
    val_cars: int | None = None  # cars held out for validation (default: ~10% of the cars)
    seed: int = 0  # split, initialisation and shuffling
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    workers: int = 2  # threads decoding photos into the cache
    limit: int | None = None  # use only the first N pairs (quick runs)
    hflip: bool = True  # random horizontal flips
    color_jitter: float = 0.1  # max relative change of brightness, contrast and saturation
    scale_jitter: float = 0.0  # max relative zoom in or out, with a random shift of up to as much of the half-size
    pixel_mean: tuple[float, float, float] = IMAGENET_MEAN  # input normalisation: (pixel/255 - mean) / std
    pixel_std: tuple[float, float, float] = IMAGENET_STD
    init: str | None = None  # start from this checkpoint's weights and architecture, on a new schedule (fine-tuning)
    loss: str = "bce-dice"  # training loss (validation always reports bce-dice, so runs compare): one of LOSS_NAMES
    boundary_weight: float = 0.0  # extra BCE weight on pixels near the true outline (0: off); see unet.losses

    def __post_init__(self) -> None:
        if self.init is not None:
            object.__setattr__(self, "init", str(self.init))
        object.__setattr__(self, "device", str(parse_device(self.device)))  # a DeviceError names the choices
        checks = {
            "epochs must be >= 1": self.epochs >= 1,
            "batch size must be >= 2 (BatchNorm needs more than one image)": self.batch_size >= 2,
            "learning rate must be positive": self.lr > 0,
            "weight decay must be >= 0": self.weight_decay >= 0,
            "warm-up must be >= 0 epochs": self.warmup_epochs >= 0,
            "workers must be >= 1": self.workers >= 1,
            "limit must be >= 2": self.limit is None or self.limit >= 2,
            "val_cars must be >= 1": self.val_cars is None or self.val_cars >= 1,
            "color_jitter must be in [0, 1)": 0 <= self.color_jitter < 1,
            "scale_jitter must be in [0, 0.5)": 0 <= self.scale_jitter < 0.5,
            "pixel_std must be positive": all(s > 0 for s in self.pixel_std),
            f"loss must be one of {', '.join(LOSS_NAMES)}": self.loss in LOSS_NAMES,
            "boundary_weight must be >= 0": self.boundary_weight >= 0,
        }
        failed = [message for message, ok in checks.items() if not ok]
        if failed:
            raise ValueError("; ".join(failed))

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
