"""``unet-train``: train a U-Net on a Kaggle-layout (or images/ + masks/) folder.

torch is imported inside the command, so ``--help`` and ``--version`` work without the ``train`` extra.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click

from batch.cli.options import DEVICE, SIZE, Command, InputError, setup_logging, version_option
from batch.core.devices import DeviceError
from batch.core.extras import require
from unet.config import LOSS_NAMES, TrainConfig, UNetConfig


@click.command(cls=Command, context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, writable=True), help="Run folder.")
@click.option(
    "--epochs", default=TrainConfig.epochs, type=click.IntRange(min=1), help="Total epochs (a resumed run continues to this)."
)
@click.option(
    "--batch-size",
    default=TrainConfig.batch_size,
    type=click.IntRange(min=2),
    help="Photos per optimizer step (at least 2, for BatchNorm).",
)
@click.option(
    "--scale",
    default=None,
    type=click.FloatRange(0, 4, min_open=True),
    help=f"Training size as a fraction of the photo size, rounded to multiples of 2**depth [default: {TrainConfig.scale}].",
)
@click.option("--size", default=None, type=SIZE, help="Training size HxW (instead of --scale).")
@click.option(
    "--width", default=None, type=click.IntRange(min=1), help=f"Channels of the first stage [default: {UNetConfig.width}]."
)
@click.option("--depth", default=None, type=click.IntRange(1, 8), help=f"Number of 2x poolings [default: {UNetConfig.depth}].")
@click.option(
    "--upsample",
    default=None,
    type=click.Choice(["transpose", "bilinear"]),
    help=f"Decoder upsampling: a learned transposed conv, or bilinear + 1x1 conv [default: {UNetConfig.upsample}].",
)
@click.option(
    "--fold",
    default=None,
    type=click.IntRange(1, 4),
    help="Space-to-depth fold: the U-Net sees and predicts at --size but computes at 1/fold of it; with --init from "
    "an unfolded checkpoint its weights are refolded (the fold as a block average, the head copied) [default: 1].",
)
@click.option("--lr", default=TrainConfig.lr, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option(
    "--scale-jitter",
    default=TrainConfig.scale_jitter,
    type=click.FloatRange(0, 0.5, max_open=True),
    help="Random zoom in or out by up to this fraction, with a shift of as much of the half-size (0: off).",
)
@click.option(
    "--loss",
    default=TrainConfig.loss,
    type=click.Choice(LOSS_NAMES),
    help="bce-dice: BCE + soft Dice per image; bce-lovasz: BCE + the Lovász hinge, a surrogate of the overlap "
    "metric (for fine-tuning with --init).",
)
@click.option(
    "--boundary-weight",
    default=TrainConfig.boundary_weight,
    type=click.FloatRange(min=0),
    help="Extra BCE weight on pixels within 2 px (at --size) of the true outline, where most wrong pixels are (0: off).",
)
@click.option("--val-cars", default=None, type=click.IntRange(min=1), help="Cars held out for validation [default: ~10%].")
@click.option(
    "--device", default=TrainConfig.device, type=DEVICE, help="auto: the first CUDA GPU when torch sees one, else the CPU."
)
@click.option(
    "--workers", default=TrainConfig.workers, type=click.IntRange(min=1), help="Threads that decode photos into the cache."
)
@click.option("--limit", default=None, type=click.IntRange(min=2), help="Use only the first N photo/mask pairs.")
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False), help="Continue from a last.pt.")
@click.option(
    "--init",
    default=None,
    type=click.Path(exists=True, dir_okay=False),
    help="Start from this best.pt's (or last.pt's) weights and architecture on a new schedule: fine-tuning, "
    "e.g. at a larger --size. Needs the same validation cars.",
)
@click.option(
    "--stop-after",
    default=None,
    type=click.IntRange(min=1),
    help="Pause after this many epochs of this call; the schedule still spans --epochs (continue with --resume).",
)
@click.option("--seed", default=TrainConfig.seed, type=int, help="Seed of the validation split, the weights and the shuffling.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars (logs still go to stderr).")
@click.option("-v", "--verbose", is_flag=True, help="Debug logging.")
@version_option
def main(
    data_dir,
    out_dir,
    epochs,
    batch_size,
    scale,
    size,
    width,
    depth,
    upsample,
    fold,
    lr,
    scale_jitter,
    loss,
    boundary_weight,
    val_cars,
    device,
    workers,
    limit,
    resume,
    init,
    stop_after,
    seed,
    no_progress,
    verbose,
):
    """Train a U-Net on DATA_DIR (train/ + train_masks/, or images/ + masks/) into the run folder --out."""
    if scale is not None and size is not None:
        raise click.UsageError("give --scale or --size, not both")
    if resume and init:
        raise click.UsageError("give --resume (continue a run) or --init (a new run from its weights), not both")
    for flag, given in (("--resume", resume), ("--init", init)):
        if given and any(v is not None for v in (width, depth, upsample)):
            raise click.UsageError(f"{flag} takes the architecture from the checkpoint: drop --width/--depth/--upsample")
    if resume and fold is not None:
        raise click.UsageError("--resume takes the fold from the checkpoint: drop --fold")
    require("torch", "train", what="unet-train")
    from unet.checkpoint import CheckpointError
    from unet.data import DataError
    from unet.train import TrainingInterrupted, train

    try:
        model_cfg = UNetConfig(
            width=width or UNetConfig.width,
            depth=depth or UNetConfig.depth,
            upsample=upsample or UNetConfig.upsample,
            fold=fold or UNetConfig.fold,
        )
        cfg = TrainConfig(
            data_dir=data_dir,
            out_dir=out_dir,
            epochs=epochs,
            batch_size=batch_size,
            scale=TrainConfig.scale if scale is None and size is None else scale,
            size=size,
            lr=lr,
            scale_jitter=scale_jitter,
            loss=loss,
            boundary_weight=boundary_weight,
            val_cars=val_cars,
            seed=seed,
            device=device,
            workers=workers,
            limit=limit,
            init=init,
        )
        with setup_logging(verbose):
            state = train(cfg, model_cfg, resume=resume, progress=not no_progress, stop_after=stop_after)
    except TrainingInterrupted as e:
        click.echo(f"\n{e}; continue with --resume {e.checkpoint}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the first epoch began: nothing was saved", err=True)
        sys.exit(130)
    except (DataError, CheckpointError, DeviceError, ValueError) as e:
        raise InputError(str(e)) from e
    if state.epoch < epochs:
        click.echo(
            f"paused after epoch {state.epoch} of {epochs}, best validation Dice {state.best_val_dice:.4f}; "
            f"continue with --resume {Path(out_dir) / 'last.pt'}"
        )
    else:
        click.echo(f"done: {state.epoch} epochs, best validation Dice {state.best_val_dice:.4f} -> {out_dir}/best.pt")
