"""Parity of an exported ONNX model with its PyTorch checkpoint, on real photos.

For each photo: PyTorch FP32 logits (the reference, on CPU) against the ONNX model's on the chosen ONNX
Runtime provider, or under OpenVINO on the CPU (``VerifyOptions.runtime``), both fed the same pixels
(``batch.core.images.load_resized_rgb``: training's own preprocessing, at the model's recorded input
size). Criteria (``ImageParity.failures``):

- every precision: the ONNX logits are finite, and the mask is not blank where PyTorch finds a car;
- FP32: ``max |onnx - torch| / max |torch|`` over the image's logits <= ``rtol`` (1e-4);
- FP16 and INT8: the Dice of the two masks at the photo's full resolution >= ``min_dice`` (0.999), the
  masks made like the Kaggle metric: logits resized bilinearly to the photo's size, then thresholded;
  FP16 also: the reference's activations within FP16's range. An FP32 file that OpenVINO computes in
  bf16 is judged like them, by its masks: that check is what lets ``--runtime auto`` run it at bf16
  (``batch.inference.runtime_choice.record_verification``).

A mask comparison can only fail where PyTorch's mask has both car and background (``min_car``): two
empty masks have Dice 1 whatever the export computes. Such a photo is *not tested*
(``ImageParity.untested``); an FP16 or INT8 file, judged by its masks, does not pass on it, while an
FP32 file, judged by its logits, still does.

Blank or NaN masks from a naively converted FP16 U-Net on the CUDA provider (onnxruntime issue #23797)
fail the first two criteria; run with ``device="cuda"`` on the GPU host that will serve the model.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from batch.core.contract import ContractError, ModelContract, prepare_input, probability_to_logit
from batch.core.devices import DeviceError
from batch.core.errors import CarvanaError
from batch.core.files import spread_evenly, temporary_path
from batch.core.images import DECODE_ERRORS, Fitted, is_image_file, load_resized_rgb
from batch.core.masks import dice
from batch.inference import openvino_runtime
from batch.inference.model import read_contract as read_file_contract
from batch.inference.runtime import ModelError, OnnxRuntimeNetwork, check_device, session_options
from batch.inference.runtime import open_session as open_runtime_session
from export.config import VERIFY_DEFAULTS, VerifyOptions
from export.onnx_export import FP16_MAX, TrainedModel, check_output_path, export_checkpoint, find_conv_bn_pairs, read_checkpoint
from unet.metrics import upsample_logits

log = logging.getLogger(__name__)


class VerifyError(CarvanaError):
    """Verification that cannot run (no photos, no such provider, ...); the message names the fix."""


Exporter = Callable[[Path, Path], ModelContract]  # (checkpoint, out) -> the contract written: options bound in


@dataclass(frozen=True)
class Outputs:
    """One photo through both models: what is compared."""

    name: str
    photo_size: tuple[int, int]  # (H, W) of the original photo, where the masks are compared
    reference: np.ndarray  # (1, 1, h, w) PyTorch FP32 logits
    logits: np.ndarray  # (1, 1, h, w) the ONNX model's
    peak_activation: float  # largest |activation| of the reference that the exported graph holds
    onnx_ms: float  # ONNX Runtime time (batch 1), after a warm-up run


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
    failures: tuple[str, ...]  # why it is out of tolerance; empty when it is within
    untested: str = ""  # why its masks test nothing (PyTorch's mask is empty or full); "" when they do
    judged_by_masks: bool = False  # FP16 and INT8: the masks are the criterion, so an untested photo does not pass

    @property
    def passed(self) -> bool:
        return not self.failures and not (self.untested and self.judged_by_masks)

    @property
    def verdict(self) -> str:
        if self.failures:
            return "FAIL: " + "; ".join(self.failures)
        if self.untested and self.judged_by_masks:
            return f"NOT TESTED: {self.untested}"
        return f"ok (logits; masks not compared: {self.untested})" if self.untested else "ok"


@dataclass(frozen=True)
class ParityReport:
    onnx_path: str
    checkpoint: str
    precision: str  # the numbers' (the file's, or bf16 where OpenVINO computes an FP32 file so): decides the criterion
    providers: tuple[str, ...]  # ONNX Runtime providers the session actually uses, or OpenVINO and its precision
    input_size: tuple[int, int]
    options: VerifyOptions
    images: tuple[ImageParity, ...]

    @property
    def passed(self) -> bool:
        return bool(self.images) and all(image.passed for image in self.images)

    @property
    def failed(self) -> tuple[ImageParity, ...]:
        """Photos out of tolerance."""
        return tuple(image for image in self.images if image.failures)

    @property
    def untested(self) -> tuple[ImageParity, ...]:
        """Photos within tolerance whose masks could not be compared (PyTorch's mask is empty or full)."""
        return tuple(image for image in self.images if image.untested and not image.failures)

    @property
    def min_dice(self) -> float:
        """The lowest mask Dice over the photos whose masks were compared (nan when none were)."""
        return min((image.dice for image in self.images if not image.untested), default=math.nan)

    def lines(self) -> list[str]:
        """The report as text: one row per photo, then a summary."""
        return [*self.header(), *map(format_row, self.images), *self.untested_note(), self.summary()]

    def header(self) -> list[str]:
        criterion = (
            f"logits within {self.options.rtol:g} relative"
            if self.precision == "fp32"
            else f"mask Dice >= {self.options.min_dice} on photos where PyTorch finds car and background"
        )
        return [
            f"parity of {self.onnx_path} ({self.precision}, {', '.join(self.providers)}) with {self.checkpoint} "
            f"(PyTorch FP32, CPU) at {self.input_size[0]}x{self.input_size[1]}; criterion: {criterion}, finite, not blank",
            f"{'photo':<28} {'rel. diff':>9} {'Dice':>8} {'car% ref':>8} {'car% onnx':>9} {'peak act.':>9} "
            f"{'onnx ms':>8}  result",
        ]

    def untested_note(self) -> list[str]:
        """A line saying on how many photos the masks tested nothing, and what that means for this precision."""
        if not self.untested:
            return []
        counts = Counter(image.untested for image in self.untested)
        where = ", ".join(f"{reason} on {count} of {len(self.images)} photos" for reason, count in counts.items())
        if self.precision == "fp32":
            return [f"masks not compared: {where} (the FP32 criterion, the logits, was checked there)"]
        return [
            f"not tested: {where}: two such masks agree whatever the export computes, so the {self.precision} file "
            "is not verified there. Verify a trained checkpoint on photos of cars."
        ]

    def summary(self) -> str:
        peak = max((i.peak_activation for i in self.images), default=math.nan)
        median_ms = float(np.median([i.onnx_ms for i in self.images])) if self.images else math.nan
        verdict = "PASS" if self.passed else "FAIL" if self.failed or not self.images else "NOT TESTED"
        return (
            f"summary: {sum(i.passed for i in self.images)}/{len(self.images)} photos pass; "
            f"max rel. diff {max((i.rel_logit_diff for i in self.images), default=math.nan):.2e}, "
            f"min Dice {'n/a (no masks compared)' if math.isnan(self.min_dice) else f'{self.min_dice:.6f}'}, "
            f"peak activation {peak:.4g} ({FP16_MAX / peak if peak else math.inf:.0f}x below FP16's max), "
            f"median ONNX time {median_ms:.1f} ms/img -> {verdict}"
        )


def format_row(im: ImageParity) -> str:
    return (
        f"{im.name:<28} {im.rel_logit_diff:>9.2e} {im.dice:>8.6f} {100 * im.reference_car:>8.2f} "
        f"{100 * im.onnx_car:>9.2f} {im.peak_activation:>9.4g} {im.onnx_ms:>8.1f}  {im.verdict}"
    )


def verify_parity(
    checkpoint: str | Path,
    onnx_path: str | Path,
    images_dir: str | Path,
    options: VerifyOptions = VERIFY_DEFAULTS,
    *,
    progress: bool = True,
) -> ParityReport:
    """Compare ``onnx_path`` with ``checkpoint`` on up to ``options.limit`` photos of ``images_dir`` (spread over it).

    ``options.device``: ``cpu``, ``cuda``, ``cuda:N`` or ``auto`` (CUDA when ONNX Runtime has it). An
    explicit CUDA request that ONNX Runtime cannot honour raises ``VerifyError``.
    """
    photos = pick_photos(Path(images_dir), options.limit)
    checkpoint = Path(checkpoint)
    trained = read_checkpoint(checkpoint)
    network, contract, providers = open_network(onnx_path, options)
    check_same_checkpoint(contract, trained, onnx_path)
    log.debug("checking %s against %s on %s with %d photos", onnx_path, checkpoint, providers[0], len(photos))
    warm_up(network, contract)
    images = tuple(
        compare(run_both(photo, trained, network, contract), contract, options)
        for photo in tqdm(photos, desc="verify", unit="img", disable=not progress)
    )
    return ParityReport(
        onnx_path=str(onnx_path),
        checkpoint=str(checkpoint),
        precision=judged_precision(contract, options),
        providers=providers,
        input_size=contract.input_size,
        options=options,
        images=images,
    )


def export_verified(
    checkpoint: str | Path,
    out: str | Path,
    images_dir: str | Path,
    export: Exporter = export_checkpoint,
    options: VerifyOptions = VERIFY_DEFAULTS,
    *,
    progress: bool = True,
) -> tuple[ModelContract, ParityReport]:
    """``export`` (``export_checkpoint``, or ``export.quantize.quantize_checkpoint`` for INT8, with their options
    bound) to a staging file next to ``out``, verify it, and rename it to ``out`` only if it passes.

    A model that fails verification never lands at ``out`` (an older file there stays as it was).
    """
    out = Path(out)
    check_output_path(out)  # the cheap checks first: the export takes seconds
    try:
        check_device(options.device)
    except DeviceError as e:
        raise VerifyError(str(e)) from e
    check_openvino_precision(options.runtime, options.openvino_precision, out)
    pick_photos(Path(images_dir), options.limit)
    staged = temporary_path(out)
    try:
        contract = export(Path(checkpoint), staged)
        report = verify_parity(checkpoint, staged, images_dir, options, progress=progress)
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


def check_same_checkpoint(contract: ModelContract, trained: TrainedModel, onnx_path: str | Path) -> None:
    """Refuse to compare a file with a checkpoint it was not exported from (their SHA-256s differ)."""
    exported_from = contract.provenance.get("source_checkpoint_sha256")
    sha256 = trained.provenance.get("source_checkpoint_sha256", "")
    if exported_from and exported_from != sha256:
        raise VerifyError(
            f"{onnx_path} was exported from another checkpoint than {trained.source} (SHA-256 {exported_from[:12]}... "
            f"vs {sha256[:12]}...): verify it against its own checkpoint, or export again"
        )


def open_network(onnx_path: str | Path, options: VerifyOptions):
    """The file as ``options.runtime`` runs it (a network with ``run(x)``), its contract, and what runs it."""
    check_openvino_precision(options.runtime, options.openvino_precision, onnx_path)
    if options.runtime == "openvino":
        return open_openvino(Path(onnx_path), options.openvino_precision)
    session = open_session(onnx_path, options.device)
    return OnnxRuntimeNetwork(session), read_contract(session, onnx_path), tuple(session.get_providers())


def check_openvino_precision(runtime: str, precision: str, onnx_path: str | Path) -> None:
    """bf16 is checked only on a CPU that computes it: elsewhere OpenVINO would quietly compute f32, and the check
    would vouch for what it did not test. Checked before the export too, which takes seconds to minutes."""
    if runtime == "openvino" and precision == "bf16" and not openvino_runtime.computes_bf16():
        raise VerifyError(f"this CPU has no bf16 instructions, so OpenVINO cannot check {onnx_path} at bf16: verify at f32")


def open_openvino(onnx_path: Path, precision: str):
    """The file compiled by OpenVINO for this CPU at ``precision``."""
    try:
        contract = check_verifiable(read_file_contract(onnx_path), onnx_path)
        network = openvino_runtime.OpenVinoNetwork(onnx_path, contract, precision=precision)
    except ModelError as e:
        raise VerifyError(str(e)) from e
    return network, contract, (f"{openvino_runtime.PROVIDER} {precision}",)


def judged_precision(contract: ModelContract, options: VerifyOptions) -> str:
    """The precision of the numbers, which decides the criterion: the file's, or bf16 where OpenVINO computes an FP32
    file in bf16."""
    if options.runtime == "openvino" and options.openvino_precision == "bf16" and contract.precision == "fp32":
        return "bf16"
    return contract.precision


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
    return check_verifiable(contract, onnx_path)


def check_verifiable(contract: ModelContract, onnx_path: str | Path) -> ModelContract:
    """``contract``, when it is one parity can check: uint8 in, logits out."""
    if contract.input_dtype != "uint8" or contract.output_kind != "logits":
        raise VerifyError(
            f"{onnx_path} takes {contract.input_dtype} and gives {contract.output_kind}; parity checks models from "
            "unet-export (uint8 in, logits out)"
        )
    return contract


def warm_up(network, contract: ModelContract) -> None:
    """One untimed run: the first one allocates arenas (and, on CUDA, searches cuDNN algorithms)."""
    blank = np.zeros((*contract.input_size, 3), dtype=np.uint8)
    run_onnx(network, blank, contract)


def load_photo(photo: Path, size: tuple[int, int]) -> Fitted:
    try:
        return load_resized_rgb(photo, size)
    except DECODE_ERRORS as e:
        raise VerifyError(f"cannot read photo {photo}: {e}. Remove it from the folder or re-save it as JPEG/PNG.") from e


def run_both(photo: Path, trained: TrainedModel, network, contract: ModelContract) -> Outputs:
    """The photo, as the runner would feed it, through PyTorch (FP32, CPU, with activations tracked) and the file's runtime."""
    fitted = load_photo(photo, contract.input_size)  # pixels (h, w, 3) uint8
    with track_peak_activation(trained.net) as peak:
        reference = run_reference(trained, fitted.pixels)  # (1, 1, h, w) float32
    logits, ms = run_onnx(network, fitted.pixels, contract)  # (1, 1, h, w) float32
    height, width = fitted.content  # the photo's part (a padded decode); a U-Net's logits are its input's size
    crop = (..., slice(height), slice(width))
    return Outputs(photo.name, fitted.shown, reference[crop], logits[crop], peak[0], ms)


@torch.inference_mode()
def run_reference(trained: TrainedModel, rgb: np.ndarray) -> np.ndarray:
    """PyTorch FP32 logits, normalized exactly as training does: ``(pixel / 255 - mean) / std``."""
    mean = torch.tensor(trained.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1)
    std = torch.tensor(trained.pixel_std, dtype=torch.float32).view(1, 3, 1, 1)
    x = torch.from_numpy(rgb.copy()).permute(2, 0, 1)[None].float().div(255)  # (1, 3, h, w) in [0, 1]
    return trained.net((x - mean) / std).numpy()  # (1, 1, h, w)


def run_onnx(network, rgb: np.ndarray, contract: ModelContract) -> tuple[np.ndarray, float]:
    """The ONNX model's logits for one (h, w, 3) photo, and the milliseconds the run took."""
    image = prepare_input(rgb[None], contract)  # (1, h, w, 3) | (1, 3, h, w) uint8 (check_verifiable)
    start = time.perf_counter()
    logits = network.run(image)  # (1, 1, h, w) float32
    return logits, 1000 * (time.perf_counter() - start)


def compare(outputs: Outputs, contract: ModelContract, options: VerifyOptions) -> ImageParity:
    """Score one photo's ONNX logits against the reference: what is out of tolerance, and whether its masks test anything."""
    reference, logits = outputs.reference, outputs.logits
    measured = {"name": outputs.name, "photo_size": outputs.photo_size, "peak_activation": outputs.peak_activation}
    precision = judged_precision(contract, options)
    measured |= {"onnx_ms": outputs.onnx_ms, "judged_by_masks": precision != "fp32"}
    if logits.shape != reference.shape:
        mismatch = f"output shape {logits.shape}, expected {reference.shape}"
        return ImageParity(
            **measured,
            rel_logit_diff=math.inf,
            dice=0.0,
            reference_car=math.nan,
            onnx_car=math.nan,
            finite=False,
            failures=(mismatch,),
        )
    finite = bool(np.isfinite(logits).all())
    scale = float(np.abs(reference).max()) or 1.0
    cut = probability_to_logit(contract.threshold)
    ref_mask = full_resolution_mask(reference, outputs.photo_size, cut)  # (H, W) bool
    onnx_mask = full_resolution_mask(np.nan_to_num(logits, nan=-1e4, posinf=1e4, neginf=-1e4), outputs.photo_size, cut)
    image = ImageParity(
        **measured,
        rel_logit_diff=float(np.abs(logits.astype(np.float64) - reference).max()) / scale if finite else math.inf,
        dice=dice(onnx_mask, ref_mask),
        reference_car=float(ref_mask.mean()),
        onnx_car=float(onnx_mask.mean()),
        finite=finite,
        failures=(),
    )
    failures = find_failures(image, int((~np.isfinite(logits)).sum()), precision, options)
    return replace(image, failures=failures, untested=find_untested(image, options))


def find_failures(image: ImageParity, nonfinite: int, precision: str, options: VerifyOptions) -> tuple[str, ...]:
    """What puts ``image`` out of tolerance for a file of ``precision``; ``nonfinite``: its NaN/Inf logits."""
    rel, peak = image.rel_logit_diff, image.peak_activation
    checks = (
        (nonfinite > 0, f"{nonfinite} NaN/Inf logits"),
        (image.reference_car > 0 and image.onnx_car == 0, "blank mask where PyTorch finds a car"),
        (precision == "fp32" and rel > options.rtol, f"logits differ by {rel:.2e} relative (> {options.rtol:g})"),
        (precision != "fp32" and image.dice < options.min_dice, f"mask Dice {image.dice:.6f} < {options.min_dice}"),
        # the CPU provider computes much of FP16 in FP32 and hides an overflow
        (
            precision == "fp16" and peak > FP16_MAX,
            f"activations reach {peak:.4g}, beyond FP16's {FP16_MAX:.0f}: export with --fp32",
        ),
    )
    return tuple(message for failed, message in checks if failed)


def find_untested(image: ImageParity, options: VerifyOptions) -> str:
    """Why this photo's masks cannot fail a comparison however wrong the export is, or "" when they can.

    Where PyTorch finds no car, an export that finds none either (a blank FP16 mask, onnxruntime
    #23797) scores Dice 1; where it finds only car, so does an export that calls every pixel car.
    """
    if image.reference_car <= options.min_car:
        return "PyTorch predicts no car"
    if image.reference_car >= 1 - options.min_car:
        return "PyTorch predicts car everywhere"
    return ""


@contextmanager
def track_peak_activation(model: torch.nn.Module) -> Iterator[list[float]]:
    """Track the largest |value| among the tensors the exported graph materializes, in ``peak[0]``.

    FP16 overflows past 65504; on the GPU that turns into Inf, then NaN or blank masks. Hooks every
    leaf module except convolutions whose BatchNorm is folded into them at export (their raw output
    never exists in the exported graph).
    """
    folded = {id(getattr(sequential, conv)) for sequential, conv, _ in find_conv_bn_pairs(model)}
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
