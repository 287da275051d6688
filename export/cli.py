"""``unet-export``: turn a ``unet-train`` checkpoint into a self-describing ONNX model.

torch is imported inside the command, so ``--help`` and ``--version`` work with any extras installed.
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import click
from click.core import ParameterSource

from batch.cli.options import DEVICE, SIZE, Group, exit_on, setup_logging, version_option
from batch.core.contract import ModelContract
from batch.core.devices import DeviceError
from batch.core.extras import require
from export.config import (
    LAYOUTS,
    MAX_OPSET,
    MIN_OPSET,
    OPENVINO_PRECISIONS,
    VERIFY_RUNTIMES,
    ExportError,
    ExportOptions,
    QuantizeOptions,
    VerifyOptions,
)

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(cls=Group, context_settings=CONTEXT)
@version_option
def main() -> None:
    """Export trained U-Net checkpoints for the batch runner."""


@main.command("to-onnx", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option(
    "--fp16/--fp32", default=ExportOptions.fp16, help="Weights and compute in FP16 (inputs uint8, logits FP32 either way)."
)
@click.option(
    "--int8", is_flag=True, help="Quantize to INT8 for the CPU (ONNX Runtime static quantization, QDQ); needs --calibrate."
)
@click.option(
    "--calibrate",
    "calibrate_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="With --int8: folder of training photos to calibrate on (the checkpoint's validation cars are left out).",
)
@click.option(
    "--calibration-images",
    type=click.IntRange(min=1),
    default=QuantizeOptions.calibration_images,
    help="With --int8: photos to calibrate on (spread over the folder).",
)
@click.option(
    "--input-size",
    type=SIZE,
    default=None,
    help="Input size HxW to record for the batch runner [default: the checkpoint's training size].",
)
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=ExportOptions.opset, help="ONNX opset.")
@click.option("--layout", type=click.Choice(LAYOUTS), default=ExportOptions.layout, help="Layout of the uint8 graph input.")
@click.option(
    "--verify",
    "verify_dir",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=None,
    help="Folder of photos: check the export against PyTorch there; OUT is written only if it passes.",
)
@click.option(
    "--verify-limit", type=click.IntRange(min=1), default=VerifyOptions.limit, help="Photos to check (spread over the folder)."
)
@click.option("--device", type=DEVICE, default="auto", help="ONNX Runtime device for --verify (cuda: CUDA provider).")
@click.option(
    "--runtime",
    type=click.Choice(VERIFY_RUNTIMES),
    default=VerifyOptions.runtime,
    help="What runs the file for --verify: ONNX Runtime on --device, or OpenVINO on the CPU.",
)
@click.option(
    "--openvino-precision",
    type=click.Choice(OPENVINO_PRECISIONS),
    default=VerifyOptions.openvino_precision,
    help="With --runtime openvino: the precision OpenVINO computes in. A bf16 check that passes is recorded, and "
    "unet-batch --runtime auto may then run the file at bf16 on this CPU.",
)
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
def to_onnx(
    checkpoint,
    out,
    fp16,
    int8,
    calibrate_dir,
    calibration_images,
    input_size,
    opset,
    layout,
    verify_dir,
    verify_limit,
    device,
    runtime,
    openvino_precision,
    no_progress,
    verbose,
):
    """Export CHECKPOINT (best.pt or last.pt from unet-train) to an ONNX model at --out."""
    check_int8_options(int8, calibrate_dir)
    check_verify_options(verify_dir)
    require("torch", "train", what="unet-export")
    require("onnx", "train", what="unet-export")
    if verify_dir is not None or int8:
        require("onnxruntime", "cpu", what="unet-export --int8" if int8 else "unet-export --verify")
    if verify_dir is not None and runtime == "openvino":
        require("openvino", "cpu", what="unet-export --verify --runtime openvino")
    from export.verify import VerifyError, export_verified
    from unet.checkpoint import CheckpointError

    with setup_logging(verbose), exit_on(CheckpointError, DeviceError, ExportError, VerifyError):
        options = ExportOptions(fp16=fp16 and not int8, opset=opset, layout=layout, input_size=input_size)  # INT8: of FP32
        quantization = QuantizeOptions(calibration_images) if int8 else None
        export = choose_exporter(options, quantization, calibrate_dir, progress=not no_progress)
        if verify_dir is None:
            contract, report = export(checkpoint, out), None
        else:
            verify = VerifyOptions(
                limit=verify_limit,
                device=device if runtime == "openvino" else choose_verify_device(device, int8, out),
                runtime=runtime,
                openvino_precision=openvino_precision,
            )
            contract, report = export_verified(checkpoint, out, verify_dir, export, verify, progress=not no_progress)
    if report is not None:
        click.echo("\n".join(report.lines()))
        if not report.passed:
            raise click.ClickException(explain_failure(report, out, int8, verify.runtime))
        if verify.openvino_precision == "bf16":
            click.echo(record_bf16(out, report))
    click.echo(describe(out, contract))


def record_bf16(out: Path, report) -> str:
    """Record on this machine how OpenVINO's bf16 masks of ``out`` did, so that ``--runtime auto`` may use them."""
    from batch.inference.runtime_choice import MIN_BF16_DICE, cache_folder, record_verification

    if record_verification(out, "bf16", report.min_dice, len(report.images)):
        return f"recorded in {cache_folder()}: unet-batch --runtime auto may run {out.name} at bf16 on this CPU"
    return (
        f"recorded in {cache_folder()}: the bf16 masks' min Dice {report.min_dice:.6f} is below the {MIN_BF16_DICE} that "
        f"unet-batch --runtime auto asks, so it runs {out.name} at f32"
    )


def choose_exporter(options: ExportOptions, quantization: QuantizeOptions | None, calibrate_dir: Path | None, progress: bool):
    """(checkpoint, out) -> contract: the FP16/FP32 export, or with ``quantization`` the INT8 one (calibrated on
    ``calibrate_dir``), its options bound: what ``export_verified`` stages and checks."""
    from export.onnx_export import export_checkpoint

    if quantization is None:
        return partial(export_checkpoint, options=options)
    from export.quantize import quantize_checkpoint

    return partial(quantize_checkpoint, calibrate=calibrate_dir, options=options, quantization=quantization, progress=progress)


def choose_verify_device(device: str, int8: bool, out: Path) -> str:
    """The ONNX Runtime device to verify on: an INT8 file runs on the CPU only (DeviceError for an explicit CUDA)."""
    from batch.inference.runtime import device_for_precision

    return str(device_for_precision(device, "int8", out)) if int8 else device


def explain_failure(report, out: Path, int8: bool, runtime: str) -> str:
    """Why ``out`` was not written, and what to try instead."""
    instead = "an FP32 export (--fp32 without --int8)" if int8 else "--fp32"
    if report.failed and runtime == "openvino":
        return (
            f"{len(report.failed)} of {len(report.images)} photos out of tolerance under OpenVINO: {out} was not written. "
            "Verify under ONNX Runtime (--runtime onnxruntime): if that passes, OpenVINO computes this graph differently "
            "from PyTorch, and unet-batch should run it with --runtime onnxruntime."
        )
    if report.failed:
        return (
            f"{len(report.failed)} of {len(report.images)} photos out of tolerance: {out} was not written. "
            f"Try {instead}, or run without --verify to inspect the model."
        )
    return (
        f"the masks of {len(report.untested)} of {len(report.images)} photos test nothing (PyTorch predicts no car on "
        f"them, or car everywhere): {out} was not written. Verify a trained checkpoint on photos of cars, or try "
        f"{instead}, which is verified by its logits."
    )


def check_int8_options(int8: bool, calibrate_dir: Path | None) -> None:
    """--int8 and --calibrate go together; --int8 quantizes the FP32 graph, so --fp16/--fp32 do not apply."""
    if int8 and calibrate_dir is None:
        raise click.UsageError("--int8 needs --calibrate DIR: a folder of training photos to calibrate on")
    if calibrate_dir is not None and not int8:
        raise click.UsageError("--calibrate is for --int8 exports: add --int8, or leave out --calibrate")
    if int8 and click.get_current_context().get_parameter_source("fp16") is ParameterSource.COMMANDLINE:
        raise click.UsageError("--int8 quantizes the FP32 graph: leave out --fp16/--fp32")


def check_verify_options(verify_dir: Path | None) -> None:
    """--runtime and --openvino-precision say how to verify: without --verify they would do nothing."""
    context = click.get_current_context()
    given = [f"--{name.replace('_', '-')}" for name in ("runtime", "openvino_precision")
             if context.get_parameter_source(name) is ParameterSource.COMMANDLINE]  # fmt: skip
    if given and verify_dir is None:
        raise click.UsageError(f"{' and '.join(given)} choose how --verify checks the file: add --verify DIR")


def describe(out: Path, contract: ModelContract) -> str:
    return (
        f"wrote {out}: {contract.precision}, {out.stat().st_size / 1e6:.1f} MB, input uint8 {contract.input_layout} "
        f"{contract.input_height}x{contract.input_width} (any multiple of {contract.input_multiple}), "
        f"opset {contract.provenance.get('opset')}"
    )
