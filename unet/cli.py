"""``unet-train``: train a U-Net on a Kaggle-layout (or images/ + masks/) folder."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from batch.clitypes import DEVICE, SIZE, InputError, setup_logging
from unet.checkpoint import CheckpointError
from unet.data import DataError
from unet.model import UNetConfig
from unet.train import TrainConfig, TrainingInterrupted, train


@click.command(context_settings={"show_default": True, "help_option_names": ["-h", "--help"]})
@click.argument("data_dir", type=click.Path(exists=True, file_okay=False))
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, writable=True), help="Run folder.")
@click.option("--epochs", default=10, type=click.IntRange(min=1), help="Total epochs (a resumed run continues to this).")
@click.option("--batch-size", default=8, type=click.IntRange(min=2))
@click.option("--scale", default=None, type=click.FloatRange(0, 4, min_open=True),
              help="Training size as a fraction of the photo size, rounded to multiples of 2**depth [default: 0.25].")
@click.option("--size", default=None, type=SIZE, help="Training size HxW (instead of --scale).")
@click.option("--width", default=None, type=click.IntRange(min=1), help="Channels of the first stage [default: 64].")
@click.option("--depth", default=None, type=click.IntRange(1, 8), help="Number of 2x poolings [default: 4].")
@click.option("--upsample", default=None, type=click.Choice(["transpose", "bilinear"]), help="[default: transpose]")
@click.option("--lr", default=1e-3, type=click.FloatRange(min=0, min_open=True), help="Peak learning rate.")
@click.option("--val-cars", default=None, type=click.IntRange(min=1), help="Cars held out for validation [default: ~10%].")
@click.option("--device", default="auto", type=DEVICE)
@click.option("--workers", default=2, type=click.IntRange(min=1), help="Threads that decode photos into the cache.")
@click.option("--limit", default=None, type=click.IntRange(min=2), help="Use only the first N photo/mask pairs.")
@click.option("--resume", default=None, type=click.Path(exists=True, dir_okay=False), help="Continue from a last.pt.")
@click.option("--stop-after", default=None, type=click.IntRange(min=1),
              help="Pause after this many epochs of this call; the schedule still spans --epochs (continue with --resume).")
@click.option("--seed", default=0, type=int)
@click.option("--no-progress", is_flag=True, help="Hide progress bars (logs still go to stderr).")
@click.option("-v", "--verbose", is_flag=True)
def main(data_dir, out_dir, epochs, batch_size, scale, size, width, depth, upsample, lr, val_cars, device, workers,
         limit, resume, stop_after, seed, no_progress, verbose):
    """Train a U-Net on DATA_DIR (train/ + train_masks/, or images/ + masks/) into the run folder --out."""
    if scale is not None and size is not None:
        raise click.UsageError("give --scale or --size, not both")
    if resume and any(v is not None for v in (width, depth, upsample)):
        raise click.UsageError("--resume takes the architecture from the checkpoint: drop --width/--depth/--upsample")
    try:
        model_cfg = UNetConfig(width=width or 64, depth=depth or 4, upsample=upsample or "transpose")
        cfg = TrainConfig(
            data_dir=data_dir, out_dir=out_dir, epochs=epochs, batch_size=batch_size,
            scale=0.25 if scale is None and size is None else scale, size=size, lr=lr, val_cars=val_cars,
            seed=seed, device=device, workers=workers, limit=limit,
        )
        with setup_logging(verbose):
            state = train(cfg, model_cfg, resume=resume, progress=not no_progress, stop_after=stop_after)
    except TrainingInterrupted as e:
        click.echo(f"\n{e}; continue with --resume {e.checkpoint}", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("\ninterrupted before the first epoch began: nothing was saved", err=True)
        sys.exit(130)
    except (DataError, CheckpointError, ValueError) as e:
        raise InputError(str(e)) from e
    if state.epoch < epochs:
        click.echo(f"paused after epoch {state.epoch} of {epochs}, best validation Dice {state.best_val_dice:.4f}; "
                   f"continue with --resume {Path(out_dir) / 'last.pt'}")
    else:
        click.echo(f"done: {state.epoch} epochs, best validation Dice {state.best_val_dice:.4f} -> {out_dir}/best.pt")
