"""``unet-bench``: measure the segmentation pipeline on this machine, and compare two machines."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import click

from batch.clitypes import DEVICE, SIZE, InputError, setup_logging
from benchmarks.config import DEFAULT_WIDTH, SUITES, RunConfig
from benchmarks.errors import BenchError
from benchmarks.report import load_results, ratio_lines, render_comparison
from benchmarks.suite import failures, run_suite, write_outputs
from benchmarks.tradeoff import run_tradeoff, spread_sample, write_tradeoff

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
CHATTY_LIBRARIES = ("onnxscript", "onnx_ir", "torch.onnx")  # the exporter's INFO lines and torchvision notices


def quiet_libraries(verbose: bool) -> None:
    """Keep the exporter's libraries to errors (warnings with -v) so the benchmark's own log stays readable."""
    for name in CHATTY_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING if verbose else logging.ERROR)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet-bench"


def parse_widths(ctx, param, value: str | None) -> tuple[int, ...]:
    if not value:
        return ()
    try:
        widths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of widths, e.g. 16,32,64") from None
    if min(widths) < 1:
        raise click.BadParameter("widths must be positive")
    return widths


def parse_sizes(ctx, param, value: str) -> tuple[tuple[int, int], ...]:
    return tuple(SIZE.convert(v, param, ctx) for v in value.split(","))


def parse_depths(ctx, param, value: str) -> tuple[int, ...]:
    try:
        depths = tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of depths, e.g. 4,5") from None
    if not all(1 <= d <= 8 for d in depths):
        raise click.BadParameter("depths must be between 1 and 8")
    return depths


@click.group(context_settings=CONTEXT)
def main():
    """Benchmark decode, inference, end-to-end segmentation and naive baselines on this machine."""


@main.command(context_settings=CONTEXT)
@click.option("--suite", type=click.Choice(sorted(SUITES)), default="quick",
              help="quick: about two minutes on a 2-core CPU; full: long sweeps for a GPU; smoke: seconds, figures meaningless.")
@click.option("--device", type=DEVICE, default="auto", help="auto picks the first CUDA GPU when ONNX Runtime can use it.")
@click.option("--images", "images_dir", type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="Folder of real photos (e.g. ../shared/data/carvana/train) [default: synthesize 1918x1280 JPEGs].")
@click.option("--model", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="Exported .onnx (or unet-train .pt) to run end to end [default: a random-weight U-Net of --width].")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("unet-bench-results"),
              help="Folder for results.json, results.md and results.png.")
@click.option("--overwrite", is_flag=True, help="Replace results already in --out.")
@click.option("--size", type=SIZE, default=None, help="Model input HxW [default: the model's own, else 320x480].")
@click.option("--width", type=click.IntRange(min=1), default=DEFAULT_WIDTH, help="U-Net width run end to end without --model.")
@click.option("--widths", callback=parse_widths, default=None, help="Widths of the inference sweep, e.g. 16,32,64 [default: the suite's].")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir,
              show_default="$XDG_CACHE_HOME/unet-bench or ~/.cache/unet-bench",
              help="Where exported random-weight models are kept between runs.")
@click.option("--no-cache", is_flag=True, help="Export every model afresh and keep nothing.")
@click.option("--seed", type=int, default=0, help="Seed of the synthetic photos and random weights.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", is_flag=True)
def run(suite, device, images_dir, model, out_dir, overwrite, size, width, widths, cache_dir, no_cache, seed, no_progress, verbose):
    """Measure everything and write results.json, results.md and results.png into --out."""
    if out_dir.exists() and (out_dir / "results.json").exists() and not overwrite:
        raise InputError(f"{out_dir / 'results.json'} exists: choose another --out or pass --overwrite")
    try:
        config = RunConfig(suite=suite, device=device, images_dir=images_dir, model=model,
                           input_size=size, width=width, seed=seed, widths=widths)
        with setup_logging(verbose):
            quiet_libraries(verbose)
            results = run_suite(config, cache_dir=None if no_cache else cache_dir, progress=not no_progress)
            paths = write_outputs(results, out_dir)
    except (BenchError, ValueError) as e:
        raise InputError(str(e)) from e
    click.echo("\n".join(ratio_lines(results)))
    click.echo(f"wrote {paths['json']}, {paths['md']} and {paths['png']} in {results['duration_seconds']:.0f} s")
    click.echo(f"to keep it in the repository: cp {paths['json']} benchmarks/results/{results['machine_slug']}.json")
    failed = failures(results)
    if failed:
        raise click.ClickException(f"{len(failed)} benchmark(s) failed (their reasons are in results.md):\n  " + "\n  ".join(failed))


@main.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("b", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def compare(a, b):
    """Print two results.json files side by side, with B / A ratios."""
    try:
        first, second = load_results(a), load_results(b)
    except BenchError as e:
        raise InputError(str(e)) from e
    click.echo(render_comparison(first, second, str(a), str(b)), nl=False)


@main.command(context_settings=CONTEXT)
@click.option("--masks", "masks_dir", type=click.Path(exists=True, file_okay=False, path_type=Path), required=True,
              help="Ground-truth masks for the resolution ceiling, e.g. ../shared/data/carvana/train_masks.")
@click.option("--limit", type=click.IntRange(min=1), default=160, help="Masks used, evenly spaced over the sorted folder.")
@click.option("--sizes", callback=parse_sizes, default="160x240,256x384,320x480,480x720,640x960", help="Input sizes HxW.")
@click.option("--widths", callback=parse_widths, default="8,16,32", help="U-Net widths.")
@click.option("--depths", callback=parse_depths, default="4", help="U-Net depths.")
@click.option("--run", "run_dirs", multiple=True, type=click.Path(exists=True, file_okay=False, path_type=Path),
              help="A unet-train run folder whose best validation Dice joins the table (repeatable).")
@click.option("--device", type=DEVICE, default="cpu", help="cpu (FP32) or cuda[:N] (FP16, I/O binding).")
@click.option("--out", "out_dir", type=click.Path(file_okay=False, path_type=Path), default=Path("unet-bench-tradeoff"),
              help="Folder for tradeoff.json and tradeoff.md.")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=default_cache_dir,
              show_default="$XDG_CACHE_HOME/unet-bench or ~/.cache/unet-bench", help="Exported random-weight models.")
@click.option("--no-progress", is_flag=True, help="Hide progress bars.")
@click.option("-v", "--verbose", is_flag=True)
def tradeoff(masks_dir, limit, sizes, widths, depths, run_dirs, device, out_dir, cache_dir, no_progress, verbose):
    """Dice/speed trade-off of input size, width and depth: each size's resolution ceiling (the Dice of a
    perfect model), each configuration's inference speed, and trained runs' validation Dice."""
    if device == "auto":
        raise InputError("--device auto is ambiguous for a sizing table: pass cpu or cuda")
    masks = spread_sample([p for p in masks_dir.iterdir() if p.is_file() and not p.name.startswith(".")], limit)
    try:
        with setup_logging(verbose):
            quiet_libraries(verbose)
            results = run_tradeoff(mask_paths=masks, sizes=sizes, widths=widths or (8, 16, 32), depths=depths,
                                   run_dirs=run_dirs, device=device, cache_dir=cache_dir, progress=not no_progress)
            paths = write_tradeoff(results, out_dir)
    except (BenchError, ValueError) as e:
        raise InputError(str(e)) from e
    click.echo(paths["md"].read_text(), nl=False)
    click.echo(f"wrote {paths['json']} and {paths['md']}")
