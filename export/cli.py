"""``unet-export``: turn a ``unet-train`` checkpoint into a self-describing ONNX model."""

from __future__ import annotations

from pathlib import Path

import click

from batch.clitypes import DEVICE, SIZE, InputError, setup_logging
from batch.contract import ModelContract
from export.onnx_export import DEFAULT_OPSET, LAYOUTS, MAX_OPSET, MIN_OPSET, ExportError, export_checkpoint
from export.verify import VerifyError, export_verified
from unet.checkpoint import CheckpointError

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}


@click.group(context_settings=CONTEXT)
def main() -> None:
    """Export trained U-Net checkpoints for the batch runner."""


@main.command("to-onnx", context_settings=CONTEXT)
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("-o", "--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The .onnx file to write.")
@click.option("--fp16/--fp32", default=True, help="Weights and compute in FP16 (inputs uint8, logits FP32 either way).")
@click.option("--input-size", type=SIZE, default=None,
              help="Input size HxW to record for the batch runner [default: the checkpoint's training size].")
@click.option("--opset", type=click.IntRange(MIN_OPSET, MAX_OPSET), default=DEFAULT_OPSET, help="ONNX opset.")
@click.option("--layout", type=click.Choice(LAYOUTS), default="NHWC", help="Layout of the uint8 graph input.")
@click.option("--verify", "verify_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Folder of photos: check the export against PyTorch there; OUT is written only if it passes.")
@click.option("--verify-limit", type=click.IntRange(min=1), default=8, help="Photos to check (spread over the folder).")
@click.option("--device", type=DEVICE, default="auto", help="ONNX Runtime device for --verify (cuda: CUDA provider).")
@click.option("--no-progress", is_flag=True, help="Hide the progress bar.")
@click.option("-v", "--verbose", is_flag=True)
def to_onnx(checkpoint, out, fp16, input_size, opset, layout, verify_dir, verify_limit, device, no_progress, verbose):
    """Export CHECKPOINT (best.pt or last.pt from unet-train) to an ONNX model at --out."""
    options = {"fp16": fp16, "input_size": input_size, "opset": opset, "layout": layout}
    try:
        with setup_logging(verbose):
            if verify_dir is None:
                contract, report = export_checkpoint(checkpoint, out, **options), None
            else:
                contract, report = export_verified(
                    checkpoint, out, verify_dir, limit=verify_limit, device=device, progress=not no_progress, **options
                )
    except (CheckpointError, ExportError, VerifyError) as e:
        raise InputError(str(e)) from e
    if report is not None:
        click.echo("\n".join(report.lines()))
        if not report.passed:
            raise click.ClickException(
                f"{len(report.failed)} of {len(report.images)} photos out of tolerance: {out} was not written. "
                "Try --fp32, or run without --verify to inspect the model."
            )
    click.echo(describe(out, contract))


def describe(out: Path, contract: ModelContract) -> str:
    return (
        f"wrote {out}: {contract.precision}, {out.stat().st_size / 1e6:.1f} MB, input uint8 {contract.input_layout} "
        f"{contract.input_height}x{contract.input_width} (any multiple of {contract.input_multiple}), "
        f"opset {contract.provenance.get('opset')}"
    )
