"""Training loop: cached data, BCE + soft Dice, AdamW with warm-up and cosine decay, full-resolution validation.

A run folder holds ``config.json``, ``metrics.jsonl`` (one object per epoch), ``last.pt`` (every epoch,
and on Ctrl-C) and ``best.pt`` (best validation Dice at full resolution).
"""

from __future__ import annotations

import ctypes
import json
import logging
import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batch.core.devices import DeviceError, parse_device
from unet import __version__
from unet.checkpoint import compact_optimizer_state, load_checkpoint, save_checkpoint
from unet.config import TrainConfig, UNetConfig
from unet.data import (
    DataError,
    cache_samples,
    default_val_cars,
    pair_files,
    resolve_size,
    split_by_car,
)
from unet.losses import LOSSES, bce_dice_loss, boundary_weights
from unet.metrics import full_resolution_dice, mean_dice
from unet.model import UNet, refold

log = logging.getLogger(__name__)


@dataclass
class RunState:
    epoch: int = 0  # completed epochs
    step: int = 0  # optimizer steps taken
    best_val_dice: float = -1.0
    history: list[dict] = field(default_factory=list)


class TrainingInterrupted(Exception):
    """Ctrl-C during training; ``last.pt`` was saved."""

    def __init__(self, checkpoint: Path):
        super().__init__(f"interrupted: saved {checkpoint}")
        self.checkpoint = checkpoint


def keep_freed_memory() -> None:
    """Stop glibc from returning large freed blocks to the OS after every step.

    PyTorch's CPU tensors come from malloc; glibc serves blocks above its mmap threshold with fresh
    mmap calls and unmaps them on free, so every training step page-faults its activations in anew.
    On a 2-core machine that doubled the step time of a width-16 U-Net at 320x480. No-op off glibc.
    """
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return
    m_trim_threshold, m_mmap_threshold = -1, -3
    libc.mallopt(m_mmap_threshold, 1 << 30)
    libc.mallopt(m_trim_threshold, 2**31 - 1)


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present; an explicit ``cuda`` without a usable GPU is an error."""
    device = parse_device(name)
    if device.kind == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.kind == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError(f"--device {device}: this torch build sees no CUDA GPU. Use --device cpu or auto.")
    if device.index >= torch.cuda.device_count():
        raise DeviceError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) present")
    return torch.device("cuda", device.index)


def init_architecture(source: UNetConfig, fold: int) -> UNetConfig:
    """The architecture of an ``--init`` run: the checkpoint's, folded when the run asks for a fold (``refold``)."""
    if fold in (1, source.fold):
        return source
    if source.fold != 1:
        raise DataError(f"the --init checkpoint is folded {source.fold}x{source.fold}: it cannot be refolded to {fold}")
    return replace(source, fold=fold)


def lr_at(step: int, total_steps: int, warmup_steps: int, peak: float) -> float:
    """Linear warm-up from peak/10 to peak, then cosine decay to peak/100."""
    if step < warmup_steps:
        return peak * (0.1 + 0.9 * step / warmup_steps)
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * progress)))


def augment(x: torch.Tensor, y: torch.Tensor, cfg: TrainConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random horizontal flip, zoom and shift, and colour jitter. x: (B, 3, H, W) in [0, 1]; y: (B, 1, H, W)."""
    batch = x.shape[0]
    draw = lambda: torch.rand(batch, 1, 1, 1, generator=gen).to(x.device)  # noqa: E731
    if cfg.hflip:
        flip = draw() < 0.5
        x, y = torch.where(flip, x.flip(-1), x), torch.where(flip, y.flip(-1), y)
    if cfg.scale_jitter:
        x, y = zoom_and_shift(x, y, cfg.scale_jitter, draw)
    if cfg.color_jitter:
        jitter = lambda: 1 + (2 * draw() - 1) * cfg.color_jitter  # noqa: E731
        x = x * jitter()
        mean = x.mean(dim=(1, 2, 3), keepdim=True)
        x = (x - mean) * jitter() + mean
        gray = x.mean(dim=1, keepdim=True)
        x = (x - gray) * jitter() + gray
        x = x.clamp(0, 1)
    return x, y


def zoom_and_shift(x: torch.Tensor, y: torch.Tensor, jitter: float, draw) -> tuple[torch.Tensor, torch.Tensor]:
    """The same random zoom (1 +- ``jitter``) and shift (up to ``jitter`` of the half-size) for photo and target.

    Bilinear for both, so the soft target stays the car's area fraction; edges are extended (the
    studio backdrop), never padded with black.
    """
    uniform = lambda: (2 * draw() - 1).view(-1) * jitter  # noqa: E731  (B,) in [-jitter, jitter]
    zoom, shift_x, shift_y = 1 + uniform(), uniform(), uniform()
    theta = torch.zeros(x.shape[0], 2, 3, device=x.device)  # output -> input sampling, normalized coordinates
    theta[:, 0, 0] = theta[:, 1, 1] = 1 / zoom
    theta[:, 0, 2], theta[:, 1, 2] = shift_x, shift_y
    grid = torch.nn.functional.affine_grid(theta, list(x.shape), align_corners=False)  # (B, H, W, 2)
    sample = lambda t: torch.nn.functional.grid_sample(t, grid, mode="bilinear", padding_mode="border", align_corners=False)  # noqa: E731
    return sample(x), sample(y)


def to_input(images: np.ndarray, device: torch.device, channels_last: bool) -> torch.Tensor:
    """(B, H, W, 3) uint8 -> (B, 3, H, W) float in [0, 1] on ``device``."""
    x = torch.from_numpy(images).to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x.contiguous()


def normalize(x: torch.Tensor, cfg: TrainConfig) -> torch.Tensor:
    mean = torch.tensor(cfg.pixel_mean, device=x.device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.pixel_std, device=x.device).view(1, 3, 1, 1)
    return (x - mean) / std


class Trainer:
    def __init__(self, cfg: TrainConfig, model_cfg: UNetConfig, resume: str | Path | None = None, progress: bool = True):
        self.cfg, self.progress = cfg, progress
        self.out = Path(cfg.out_dir)
        self.device = resolve_device(cfg.device)
        self.cuda = self.device.type == "cuda"
        if not self.cuda:
            keep_freed_memory()
        resumed = load_checkpoint(resume, map_location="cpu") if resume else None
        initial = load_checkpoint(cfg.init, map_location="cpu") if cfg.init and resumed is None else None
        if resumed is not None:
            model_cfg = UNetConfig.from_dict(resumed["model_config"])
        elif initial is not None:
            model_cfg = init_architecture(UNetConfig.from_dict(initial["model_config"]), model_cfg.fold)
        self.model_cfg = model_cfg
        torch.manual_seed(cfg.seed)
        self.gen = torch.Generator().manual_seed(cfg.seed)
        self.model = UNet(model_cfg).to(self.device)
        if self.cuda:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.amp_dtype = (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16) if self.cuda else None
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.state = RunState()
        self.prepare_data(resumed)
        if initial is not None:
            self.initialize(initial)
        if resumed is not None:
            self.restore(resumed)

    # ---- data -------------------------------------------------------------------------------
    def prepare_data(self, resumed: dict | None) -> None:
        cfg = self.cfg
        pairing = pair_files(cfg.data_dir)
        for label, names in (
            ("photos without a mask", pairing.images_without_mask),
            ("masks without a photo", pairing.masks_without_image),
        ):
            if names:
                shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
                log.warning("skipping %d %s: %s", len(names), label, shown)
        samples = pairing.samples[: cfg.limit] if cfg.limit else pairing.samples
        val_cars = cfg.val_cars or default_val_cars(samples)
        train, val = split_by_car(samples, val_cars, cfg.seed)
        if len(train) < 2:
            raise DataError(f"only {len(train)} training photo(s) after the split: add photos or raise --limit")
        if resumed is not None:
            self.size = tuple(resumed["input_size"])
            if sorted({s.car_id for s in val}) != sorted(resumed["val_cars"]):
                log.warning("the validation cars differ from the resumed run's: its best Dice is not comparable")
        else:
            self.size = resolve_size(samples[0].image, self.model_cfg.multiple, cfg.scale, cfg.size)
        self.train_samples, self.val_samples = train, val
        log.info(
            "%d training photos (%d cars), %d validation photos (%d cars), training size %dx%d",
            len(train),
            len({s.car_id for s in train}),
            len(val),
            val_cars,
            *self.size,
        )
        self.train_set = cache_samples(train, self.size, False, cfg.workers, "caching train", self.progress)
        self.val_set = cache_samples(val, self.size, True, cfg.workers, "caching val", self.progress)

    # ---- checkpoints ------------------------------------------------------------------------
    def checkpoint_state(self, val_dice: float, with_optimizer: bool) -> dict:
        state = {
            "model": self.model.state_dict(),
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "input_size": list(self.size),
            "pixel_mean": list(self.cfg.pixel_mean),
            "pixel_std": list(self.cfg.pixel_std),
            "train_images": len(self.train_samples),
            "val_images": len(self.val_samples),
            "val_cars": sorted({s.car_id for s in self.val_samples}),
            "val_dice": float(val_dice),
            "epoch": self.state.epoch,
            "version": __version__,
        }
        if with_optimizer:
            state |= {
                "optimizer": compact_optimizer_state(self.optimizer.state_dict()),
                "scaler": self.scaler.state_dict(),
                "step": self.state.step,
                "best_val_dice": self.state.best_val_dice,
                "rng": self.gen.get_state(),
                "history": self.state.history,
            }
        return state

    def initialize(self, initial: dict) -> None:
        """Start from ``cfg.init``'s weights (fine-tuning): refused when its validation cars or input
        normalisation differ from this run's, since its validation photos may then have been trained on."""
        val_cars = sorted({s.car_id for s in self.val_samples})
        if sorted(initial.get("val_cars", [])) != val_cars:
            raise DataError(
                f"--init {self.cfg.init} was validated on other cars than this run's ({', '.join(val_cars)}): "
                "this run's validation photos may be in its training set. Use the same data, --seed and --val-cars."
            )
        for key in ("pixel_mean", "pixel_std"):
            if [round(v, 6) for v in initial[key]] != [round(v, 6) for v in getattr(self.cfg, key)]:
                raise DataError(
                    f"--init {self.cfg.init} was trained with {key} {initial[key]}, not {list(getattr(self.cfg, key))}"
                )
        weights, source = initial["model"], UNetConfig.from_dict(initial["model_config"])
        if source.fold != self.model_cfg.fold:
            weights = refold(weights, source, self.model_cfg)
        self.model.load_state_dict(weights)
        log.info(
            "starting from the weights of %s (epoch %d, validation Dice %.4f at %dx%d, fold %d -> %d)",
            self.cfg.init,
            initial["epoch"],
            initial["val_dice"],
            *initial["input_size"],
            source.fold,
            self.model_cfg.fold,
        )

    def restore(self, resumed: dict) -> None:
        if "optimizer" not in resumed:
            raise DataError("--resume needs last.pt (it holds the optimizer state); best.pt has only the weights")
        self.model.load_state_dict(resumed["model"])
        self.optimizer.load_state_dict(resumed["optimizer"])
        self.scaler.load_state_dict(resumed["scaler"])
        self.gen.set_state(resumed["rng"])
        self.state = RunState(resumed["epoch"], resumed["step"], resumed["best_val_dice"], list(resumed["history"]))
        log.info("resumed from epoch %d (best validation Dice %.4f)", self.state.epoch, self.state.best_val_dice)

    def write_config(self) -> None:
        config = {
            "model_config": self.model_cfg.to_dict(),
            "train_config": self.cfg.to_dict(),
            "input_size": list(self.size),
            "train_images": [s.name for s in self.train_samples],
            "val_images": [s.name for s in self.val_samples],
            "version": __version__,
        }
        (self.out / "config.json").write_text(json.dumps(config, indent=2) + "\n")

    # ---- loop -------------------------------------------------------------------------------
    def run(self, stop_after: int | None = None) -> RunState:
        """Train up to ``cfg.epochs``, or only ``stop_after`` more epochs of that schedule (resume later)."""
        if stop_after is not None and stop_after < 1:
            raise ValueError(f"stop_after must be >= 1 epoch, got {stop_after}")
        target = self.cfg.epochs if stop_after is None else min(self.cfg.epochs, self.state.epoch + stop_after)
        self.out.mkdir(parents=True, exist_ok=True)
        self.write_config()
        metrics = self.out / "metrics.jsonl"
        if self.state.history and not metrics.exists():  # resumed into a new folder: carry the earlier epochs over
            metrics.write_text("".join(json.dumps(record) + "\n" for record in self.state.history))
        try:
            while self.state.epoch < target:
                record = self.run_epoch()
                with open(self.out / "metrics.jsonl", "a") as f:
                    f.write(json.dumps(record) + "\n")
                log.info("epoch %d: %s", record["epoch"], json.dumps(record))
        except KeyboardInterrupt:
            last = self.out / "last.pt"
            save_checkpoint(self.checkpoint_state(float("nan"), with_optimizer=True), last)
            raise TrainingInterrupted(last) from None
        return self.state

    def run_epoch(self) -> dict:
        start = time.perf_counter()
        train_loss, images_per_second = self.train_epoch()
        self.state.epoch += 1
        val_loss, scores = self.validate()
        val_dice = mean_dice(scores)
        improved = val_dice > self.state.best_val_dice
        if improved:
            self.state.best_val_dice = val_dice
            save_checkpoint(self.checkpoint_state(val_dice, with_optimizer=False), self.out / "best.pt")
        record = {
            "epoch": self.state.epoch,
            "train_loss": round(train_loss, 6),
            "val_loss": round(val_loss, 6),
            "val_dice": round(val_dice, 6),
            "val_dice_min": round(min(scores), 6),
            "lr": self.optimizer.param_groups[0]["lr"],
            "train_images_per_second": round(images_per_second, 2),
            "seconds": round(time.perf_counter() - start, 2),
        }
        self.state.history.append(record)
        save_checkpoint(self.checkpoint_state(val_dice, with_optimizer=True), self.out / "last.pt")
        return record

    def batches(self) -> list[np.ndarray]:
        order = torch.randperm(len(self.train_set), generator=self.gen).numpy()
        n_full = len(order) // self.cfg.batch_size
        if n_full == 0:  # fewer photos than one batch: use them all
            return [np.sort(order)]
        return [np.sort(order[i * self.cfg.batch_size : (i + 1) * self.cfg.batch_size]) for i in range(n_full)]

    def train_epoch(self) -> tuple[float, float]:
        cfg, model = self.cfg, self.model
        model.train()
        batches = self.batches()
        total_steps = math.ceil(cfg.epochs * len(batches))
        warmup_steps = round(cfg.warmup_epochs * len(batches))
        losses, seen, start = [], 0, time.perf_counter()
        bar = tqdm(
            total=sum(len(b) for b in batches),
            desc=f"epoch {self.state.epoch + 1}/{cfg.epochs}",
            unit="img",
            disable=not self.progress,
        )
        with bar:
            for idx in batches:
                lr = lr_at(self.state.step, total_steps, warmup_steps, cfg.lr)
                for group in self.optimizer.param_groups:
                    group["lr"] = lr
                x = to_input(self.train_set.images[idx], self.device, self.cuda)
                y = torch.from_numpy(self.train_set.targets[idx]).to(self.device)[:, None].float().div_(255)
                x, y = augment(x, y, cfg, self.gen)
                with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                    logits = model(normalize(x, cfg))  # (B, 1, H, W)
                weight = boundary_weights(y, cfg.boundary_weight) if cfg.boundary_weight else None
                loss = LOSSES[cfg.loss](logits, y, weight)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"loss became {loss.item()} at step {self.state.step}: lower --lr")
                self.optimizer.zero_grad(set_to_none=True)
                self.scaler.scale(loss).backward()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                self.state.step += 1
                losses.append(loss.item())
                seen += len(idx)
                bar.update(len(idx))
                bar.set_postfix(loss=f"{np.mean(losses[-20:]):.4f}", lr=f"{lr:.2e}")
        return float(np.mean(losses)), seen / (time.perf_counter() - start)

    @torch.no_grad()
    def validate(self) -> tuple[float, list[float]]:
        """Validation loss (BCE + Dice whatever ``cfg.loss`` is, so runs compare) at training size, and Dice per
        image at full resolution (logits upsampled first)."""
        cfg, model, data = self.cfg, self.model, self.val_set
        model.eval()
        losses, scores = [], []
        for first in tqdm(range(0, len(data), cfg.batch_size), desc="validate", unit="batch", disable=not self.progress):
            idx = np.arange(first, min(first + cfg.batch_size, len(data)))
            x = to_input(data.images[idx], self.device, self.cuda)
            y = torch.from_numpy(data.targets[idx]).to(self.device)[:, None].float().div_(255)
            with torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.amp_dtype is not None):
                logits = model(normalize(x, cfg)).float()
            losses.append(bce_dice_loss(logits, y).item() * len(idx))
            for j, i in enumerate(idx):
                height, width = data.contents[i]  # the photo's part of the input; U-Net scores are the input's size
                scores.append(full_resolution_dice(logits[j, :, :height, :width], data.full_mask(i)))
        return sum(losses) / len(data), scores


def train(
    cfg: TrainConfig,
    model_cfg: UNetConfig,
    resume: str | Path | None = None,
    progress: bool = True,
    stop_after: int | None = None,
) -> RunState:
    """Train a U-Net as ``cfg`` says; return the run's state (epochs done, best Dice, per-epoch history).

    ``stop_after`` pauses after that many epochs of this call, on the schedule of ``cfg.epochs``: a
    run spread over sessions, or several configurations compared at the same point of one schedule.
    """
    return Trainer(cfg, model_cfg, resume=resume, progress=progress).run(stop_after)
