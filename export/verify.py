"""Parity of an exported ONNX model with its PyTorch checkpoint, on real photos.

For each photo: PyTorch FP32 logits (the reference, on CPU) against the ONNX model's on the chosen ONNX
Runtime provider, both fed the same pixels (``batch.core.images.load_resized_rgb``: training's own
preprocessing, at the model's recorded input size). Criteria (``ImageParity.failures``):

- every precision: the ONNX logits are finite, and the mask is not blank where PyTorch finds a car;
- FP32: ``max |onnx - torch| / max |torch|`` over the image's logits <= ``rtol`` (1e-4);
- FP16: the Dice of the two masks at the photo's full resolution >= ``min_dice`` (0.999), the masks
  made like the Kaggle metric: logits resized bilinearly to the photo's size, then thresholded.

Blank or NaN masks from a naively converted FP16 U-Net on the CUDA provider (onnxruntime issue #23797)
fail the first two criteria; run with ``device="cuda"`` on the GPU host that will serve the model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from PIL import UnidentifiedImageError
from tqdm import tqdm

from batch.core.contract import ContractError, ModelContract, probability_to_logit
from batch.core.devices import DeviceError
from batch.core.files import spread_evenly, temporary_path
from batch.core.images import is_image_file, load_resized_rgb
from batch.core.masks import dice
from batch.inference.runtime import ModelError, check_device, session_options
from batch.inference.runtime import open_session as open_runtime_session
from export.config import VerifyOptions
from export.onnx_export import (
    FP16_MAX,
    check_output_path,
    conv_bn_pairs,
    export_checkpoint,
    load_hashed,
    rebuild_model,
    require,
)
from unet.metrics import upsample_logits

log = logging.getLogger(__name__)


class VerifyError(ValueError):
    """Verification that cannot run (no photos, no such provider, ...); the message names the fix."""


@dataclass(frozen=True)
class ImageParity:
    name: str
    photo_size: tuple[int, int]  # (H, W) of the original photo, where the masks are compared
    rel_logit_diff: float  # max |onnx - torch| / max |torch| over the image's logits
    dice: float  # full-resolution Dice of the ONNX mask against the PyTorch mask
    reference_car: float  # fraction of the photo that PyTorch calls car
    onnx_car: float  # same for the ONNX model
    finite: bool  # no NaN or Inf in the ONNX logits
    peak_activation: float  # largest |activation| of the FP32 reference that the exported graph holds
    onnx_ms: float  # ONNX Runtime time for this image (batch 1), after a warm-up run
    failures: tuple[str, ...]  # why it is out of tolerance; empty when it passes

    @property
    def passed(self) -> bool:
        return not self.failures


@dataclass(frozen=True)
class ParityReport:
    onnx_path: str
    checkpoint: str
    precision: str  # of the ONNX model: decides which criterion applies
    providers: tuple[str, ...]  # ONNX Runtime providers the session actually uses
    input_size: tuple[int, int]
    rtol: float
    min_dice: float
    images: tuple[ImageParity, ...]

    @property
    def passed(self) -> bool:
        return bool(self.images) and all(image.passed for image in self.images)

    @property
    def failed(self) -> tuple[ImageParity, ...]:
        return tuple(image for image in self.images if not image.passed)

    def lines(self) -> list[str]:
        """The report as text: one row per photo, then a summary."""
        criterion = f"logits within {self.rtol:g} relative" if self.precision == "fp32" else f"mask Dice >= {self.min_dice}"
        rows = [
            f"parity of {self.onnx_path} ({self.precision}, {', '.join(self.providers)}) with {self.checkpoint} "
            f"(PyTorch FP32, CPU) at {self.input_size[0]}x{self.input_size[1]}; criterion: {criterion}, finite, not blank",
            f"{'photo':<28} {'rel. diff':>9} {'Dice':>8} {'car% ref':>8} {'car% onnx':>9} {'peak act.':>9} "
            f"{'onnx ms':>8}  result",
        ]
        for im in self.images:
            verdict = "ok" if im.passed else "FAIL: " + "; ".join(im.failures)
            rows.append(
                f"{im.name:<28} {im.rel_logit_diff:>9.2e} {im.dice:>8.6f} {100 * im.reference_car:>8.2f} "
                f"{100 * im.onnx_car:>9.2f} {im.peak_activation:>9.4g} {im.onnx_ms:>8.1f}  {verdict}"
            )
        peak = max((i.peak_activation for i in self.images), default=math.nan)
        rows.append(
            f"summary: {len(self.images) - len(self.failed)}/{len(self.images)} photos pass; "
            f"max rel. diff {max((i.rel_logit_diff for i in self.images), default=math.nan):.2e}, "
            f"min Dice {min((i.dice for i in self.images), default=math.nan):.6f}, "
            f"peak activation {peak:.4g} ({FP16_MAX / peak if peak else math.inf:.0f}x below FP16's max), "
            f"median ONNX time {float(np.median([i.onnx_ms for i in self.images])) if self.images else math.nan:.1f} ms/img"
            f" -> {'PASS' if self.passed else 'FAIL'}"
        )
        return rows


def verify_parity(
    checkpoint: str | Path,
    onnx_path: str | Path,
    images_dir: str | Path,
    *,
    limit: int = VerifyOptions.limit,
    device: str = "auto",
    rtol: float = VerifyOptions.rtol,
    min_dice: float = VerifyOptions.min_dice,
    progress: bool = True,
) -> ParityReport:
    """Compare ``onnx_path`` with ``checkpoint`` on up to ``limit`` photos of ``images_dir`` (spread over it).

    ``device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when ONNX Runtime has it). An explicit
    CUDA request that ONNX Runtime cannot honour raises ``VerifyError``.
    """
    if limit < 1:
        raise VerifyError(f"limit must be at least 1 photo, not {limit}")
    photos = pick_photos(Path(images_dir), limit)
    checkpoint = Path(checkpoint)
    state, sha256 = load_hashed(checkpoint)
    model = rebuild_model(state, checkpoint)
    session = open_session(onnx_path, device)
    contract = read_contract(session, onnx_path)
    exported_from = contract.provenance.get("source_checkpoint_sha256")
    if exported_from and exported_from != sha256:
        raise VerifyError(
            f"{onnx_path} was exported from another checkpoint than {checkpoint} (SHA-256 {exported_from[:12]}... "
            f"vs {sha256[:12]}...): verify it against its own checkpoint, or export again"
        )
    mean = torch.tensor(require(state, "pixel_mean", checkpoint), dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(require(state, "pixel_std", checkpoint), dtype=torch.float32).view(1, 3, 1, 1)
    log.debug("checking %s against %s on %s with %d photos", onnx_path, checkpoint, session.get_providers()[0], len(photos))
    warm_up(session, contract)
    results = []
    for photo in tqdm(photos, desc="verify", unit="img", disable=not progress):
        rgb, original = load_photo(photo, contract.input_size)  # (h, w, 3) uint8
        with peak_activation(model) as peak:
            reference = reference_logits(model, rgb, mean, std)  # (1, 1, h, w) float32
        logits, ms = onnx_logits(session, rgb, contract)  # (1, 1, h, w) float32
        results.append(compare(photo.name, reference, logits, original, contract, rtol, min_dice, ms, peak[0]))
    return ParityReport(
        onnx_path=str(onnx_path),
        checkpoint=str(checkpoint),
        precision=contract.precision,
        providers=tuple(session.get_providers()),
        input_size=contract.input_size,
        rtol=rtol,
        min_dice=min_dice,
        images=tuple(results),
    )


def export_verified(
    checkpoint: str | Path,
    out: str | Path,
    images_dir: str | Path,
    *,
    limit: int = VerifyOptions.limit,
    device: str = "auto",
    progress: bool = True,
    export: Callable[..., ModelContract] = export_checkpoint,
    **export_options,
) -> tuple[ModelContract, ParityReport]:
    """``export`` (``export_checkpoint``, or ``export.quantize.quantize_checkpoint`` for INT8) to a staging file next
    to ``out``, verify it, and rename it to ``out`` only if it passes.

    A model that fails verification never lands at ``out`` (an older file there stays as it was).
    """
    out = Path(out)
    check_output_path(out)  # the cheap checks first: the export takes seconds
    try:
        check_device(device)
    except DeviceError as e:
        raise VerifyError(str(e)) from e
    pick_photos(Path(images_dir), limit)
    staged = temporary_path(out)
    try:
        contract = export(checkpoint, staged, **export_options)
        report = verify_parity(checkpoint, staged, images_dir, limit=limit, device=device, progress=progress)
        report = replace(report, onnx_path=str(out))
        if report.passed:
            os.replace(staged, out)
        return contract, report
    finally:
        staged.unlink(missing_ok=True)


# ---- steps ----------------------------------------------------------------------------------------


def pick_photos(folder: Path, limit: int) -> list[Path]:
    """Up to ``limit`` photos spread evenly over the sorted folder (Carvana's 16 views of a car sort together)."""
    return spread_evenly(list_photos(folder, "--verify"), limit)


def list_photos(folder: Path, option: str) -> list[Path]:
    """The photos directly in ``folder``, sorted; :class:`VerifyError` naming ``option`` when there are none."""
    if not folder.is_dir():
        raise VerifyError(f"{option} {folder}: not a folder of photos")
    photos = sorted(p for p in folder.iterdir() if p.is_file() and is_image_file(p))
    if not photos:
        raise VerifyError(f"no photos (.jpg, .jpeg, .png) in {folder}: point {option} at a folder of car photos")
    return photos


def open_session(onnx_path: str | Path, device: str):
    """An ONNX Runtime session on ``device`` (batch.inference.runtime: explicit providers, no silent CPU fallback)."""
    try:
        return open_runtime_session(onnx_path, device, session_options())
    except (DeviceError, ModelError) as e:
        raise VerifyError(str(e)) from e


def read_contract(session, onnx_path: str | Path) -> ModelContract:
    try:
        contract = ModelContract.from_metadata(session.get_modelmeta().custom_metadata_map, source=str(onnx_path))
    except ContractError as e:
        raise VerifyError(str(e)) from e
    if contract.input_dtype != "uint8" or contract.output_kind != "logits":
        raise VerifyError(
            f"{onnx_path} takes {contract.input_dtype} and gives {contract.output_kind}; parity checks models from "
            "unet-export (uint8 in, logits out)"
        )
    return contract


def warm_up(session, contract: ModelContract) -> None:
    """One untimed run: the first one allocates arenas (and, on CUDA, searches cuDNN algorithms)."""
    blank = np.zeros((*contract.input_size, 3), dtype=np.uint8)
    onnx_logits(session, blank, contract)


def load_photo(photo: Path, size: tuple[int, int]) -> tuple[np.ndarray, tuple[int, int]]:
    try:
        return load_resized_rgb(photo, size)
    except (OSError, UnidentifiedImageError, ValueError) as e:
        raise VerifyError(f"cannot read photo {photo}: {e}. Remove it from the folder or re-save it as JPEG/PNG.") from e


@torch.inference_mode()
def reference_logits(model: torch.nn.Module, rgb: np.ndarray, mean: torch.Tensor, std: torch.Tensor) -> np.ndarray:
    """PyTorch FP32 logits, normalized exactly as training does: ``(pixel / 255 - mean) / std``."""
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div(255)  # (1, 3, h, w) in [0, 1]
    return model((x - mean) / std).numpy()  # (1, 1, h, w)


def onnx_logits(session, rgb: np.ndarray, contract: ModelContract) -> tuple[np.ndarray, float]:
    image = rgb[None] if contract.input_layout == "NHWC" else rgb.transpose(2, 0, 1)[None]  # (1, h, w, 3) | (1, 3, h, w)
    feed = {session.get_inputs()[0].name: np.ascontiguousarray(image)}
    start = time.perf_counter()
    (logits,) = session.run(None, feed)  # (1, 1, h, w) float32
    return logits, 1000 * (time.perf_counter() - start)


def compare(name, reference, logits, original, contract, rtol, min_dice, ms, peak) -> ImageParity:
    """Score one photo's ONNX logits against the reference; list what is out of tolerance."""
    if logits.shape != reference.shape:
        return ImageParity(
            name,
            original,
            math.inf,
            0.0,
            math.nan,
            math.nan,
            False,
            peak,
            ms,
            (f"output shape {logits.shape}, expected {reference.shape}",),
        )
    finite = bool(np.isfinite(logits).all())
    scale = float(np.abs(reference).max()) or 1.0
    rel = float(np.abs(logits.astype(np.float64) - reference).max()) / scale if finite else math.inf
    cut = probability_to_logit(contract.threshold)
    ref_mask = full_resolution_mask(reference, original, cut)  # (H, W) bool
    onnx_mask = full_resolution_mask(np.nan_to_num(logits, nan=-1e4, posinf=1e4, neginf=-1e4), original, cut)
    score = dice(onnx_mask, ref_mask)
    failures = []
    if not finite:
        failures.append(f"{int((~np.isfinite(logits)).sum())} NaN/Inf logits")
    if ref_mask.any() and not onnx_mask.any():
        failures.append("blank mask where PyTorch finds a car")
    if contract.precision == "fp32" and rel > rtol:
        failures.append(f"logits differ by {rel:.2e} relative (> {rtol:g})")
    if contract.precision != "fp32" and score < min_dice:
        failures.append(f"mask Dice {score:.6f} < {min_dice}")
    if contract.precision == "fp16" and peak > FP16_MAX:  # the CPU provider computes much of FP16 in FP32 and hides it
        failures.append(f"activations reach {peak:.4g}, beyond FP16's {FP16_MAX:.0f}: export with --fp32")
    ref_car, onnx_car = float(ref_mask.mean()), float(onnx_mask.mean())
    return ImageParity(name, original, rel, score, ref_car, onnx_car, finite, peak, ms, tuple(failures))


@contextmanager
def peak_activation(model: torch.nn.Module) -> Iterator[list[float]]:
    """Track the largest |value| among the tensors the exported graph materializes, in ``peak[0]``.

    FP16 overflows past 65504; on the GPU that turns into Inf, then NaN or blank masks. Hooks every
    leaf module except convolutions whose BatchNorm is folded into them at export (their raw output
    never exists in the exported graph).
    """
    folded = {id(getattr(sequential, conv)) for sequential, conv, _ in conv_bn_pairs(model)}
    peak = [0.0]

    def record(module, inputs, output):
        peak[0] = max(peak[0], float(output.detach().abs().max()))

    leaves = [m for m in model.modules() if not any(m.children()) and id(m) not in folded]
    handles = [m.register_forward_hook(record) for m in leaves]
    try:
        yield peak
    finally:
        for handle in handles:
            handle.remove()


def full_resolution_mask(logits: np.ndarray, size: tuple[int, int], cut: float) -> np.ndarray:
    """(1, 1, h, w) logits -> (H, W) bool mask: bilinear resize to the photo's size, then threshold."""
    full = upsample_logits(torch.from_numpy(np.ascontiguousarray(logits)), size)  # (1, 1, H, W)
    return (full[0, 0] > cut).numpy()
