"""``unet-bench``: measure the segmentation pipeline on this machine, and compare two machines.

The measuring modules (ONNX Runtime, torch) are imported inside the commands, so ``--help``, ``--version``
and ``compare`` work with any extras; ``run`` and ``tradeoff`` name a missing extra before measuring.
"""

from __future__ import annotations

import os
from pathlib import Path

import click

from batch.cli.options import DEVICE, LOCATION, SIZE, Group, InputError, exit_on, setup_logging, version_option
from batch.core.errors import CarvanaError
from batch.core.extras import require
from batch.core.files import spread_evenly
from benchmarks.config import SUITES, RunConfig
from benchmarks.report import load_results, ratio_lines, render_comparison

CONTEXT = {"show_default": True, "help_option_names": ["-h", "--help"]}
SUITE_HELP = (
    "quick: about two minutes on a 2-core CPU; full: long sweeps for a GPU; classic: the classic width-64 U-Net "
    "alone at large input sizes (use with --size 640x960 --width 64); smoke: seconds, figures meaningless."
)


def default_cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unet-bench"


def int_list(what: str, example: str, high: int | None = None):
    """A click callback reading a comma-separated list of positive ints, at most ``high`` (an empty value: ())."""

    def parse(ctx, param, value: str | None) -> tuple[int, ...]:
        if not value:
            return ()
        try:
            values = tuple(int(v) for v in value.split(","))
        except ValueError:
            raise click.BadParameter(f"{value!r} is not a comma-separated list of {what}, e.g. {example}") from None
        if min(values) < 1 or (high is not None and max(values) > high):
            raise click.BadParameter(f"{what} must be between 1 and {high}" if high else f"{what} must be positive")
        return values

    return parse


def parse_sizes(ctx, param, value: str) -> tuple[tuple[int, int], ...]:
    return tuple(SIZE.convert(v, param, ctx) for v in value.split(","))


parse_widths = int_list("widths", "16,32,64")
FOLDER, FILE = click.Path(exists=True, file_okay=False, path_type=Path), click.Path(exists=True, dir_okay=False, path_type=Path)
NEW_FOLDER = click.Path(file_okay=False, path_type=Path)


def out_option(default: str, files: str):
    return click.option("--out", "out_dir", type=NEW_FOLDER, default=Path(default), help=f"Folder for {files}.")


cache_dir_option = click.option(
    "--cache-dir",
    type=NEW_FOLDER,
    default=default_cache_dir,
    show_default="$XDG_CACHE_HOME/unet-bench or ~/.cache/unet-bench",
    help="Where exported random-weight models are kept between runs.",
)
no_progress_option = click.option("--no-progress", is_flag=True, help="Hide progress bars.")
verbose_option = click.option("-v", "--verbose", is_flag=True, help="Debug logging.")


@click.group(cls=Group, context_settings=CONTEXT)
@version_option
def main():
    """Benchmark decode, inference, end-to-end segmentation and naive baselines on this machine."""


@main.command(context_settings=CONTEXT)
@click.option("--suite", type=click.Choice(sorted(SUITES)), default="quick", help=SUITE_HELP)
@click.option(
    "--device", type=DEVICE, default=RunConfig.device, help="auto picks the first CUDA GPU when ONNX Runtime can use it."
)
@click.option("--images", "images_dir", type=FOLDER, help="Folder of real photos [default: synthesize 1918x1280 JPEGs].")
@click.option(
    "--model", type=FILE, help="Exported .onnx (or unet-train .pt) to run end to end [default: random weights, --width]."
)
@out_option("unet-bench-results", "results.json, results.md and results.png")
@click.option("--overwrite", is_flag=True, help="Replace results already in --out.")
@click.option("--size", type=SIZE, default=None, help="Model input HxW [default: the model's own, else 320x480].")
@click.option("--width", type=click.IntRange(min=1), default=RunConfig.width, help="U-Net width run end to end without --model.")
@click.option(
    "--widths", callback=parse_widths, default=None, help="Widths of the inference sweep, e.g. 16,32,64 [default: the suite's]."
)
@cache_dir_option
@click.option("--no-cache", is_flag=True, help="Export every model afresh and keep nothing.")
@click.option("--seed", type=int, default=RunConfig.seed, help="Seed of the synthetic photos and random weights.")
@no_progress_option
@verbose_option
def run(
    suite, device, images_dir, model, out_dir, overwrite, size, width, widths, cache_dir, no_cache, seed, no_progress, verbose
):
    """Measure everything and write results.json, results.md and results.png into --out."""
    if out_dir.exists() and (out_dir / "results.json").exists() and not overwrite:
        raise InputError(f"{out_dir / 'results.json'} exists: choose another --out or pass --overwrite")
    from benchmarks.suite import failures, run_suite, write_outputs

    with exit_on(CarvanaError, ValueError):
        config = RunConfig(
            suite=suite, device=device, images_dir=images_dir, model=model, input_size=size, width=width, seed=seed, widths=widths
        )
        with setup_logging(verbose):
            results = run_suite(config, cache_dir=None if no_cache else cache_dir, progress=not no_progress)
            paths = write_outputs(results, out_dir)
    click.echo("\n".join(ratio_lines(results)))
    click.echo(f"wrote {paths['json']}, {paths['md']} and {paths['png']} in {results['duration_seconds']:.0f} s")
    if results["suite"] == "smoke":
        click.echo("a smoke run shows that every stage runs; its figures mean nothing")
    failed = failures(results)
    if failed:
        raise click.ClickException(
            f"{len(failed)} benchmark(s) failed (their reasons are in results.md):\n  " + "\n  ".join(failed)
        )


@main.command(context_settings=CONTEXT)
@click.argument("a", type=click.Path(exists=True, path_type=Path))
@click.argument("b", type=click.Path(exists=True, path_type=Path))
def compare(a, b):
    """Print two runs side by side, with B / A ratios: each a results.json or a run folder (--out of `run`) holding one."""
    with exit_on(CarvanaError):
        first, second = load_results(a), load_results(b)
    click.echo(render_comparison(first, second, str(a), str(b)), nl=False)


@main.command(context_settings=CONTEXT)
@click.option("--masks", "masks_dir", type=FOLDER, required=True, help="Ground-truth masks for the resolution ceiling.")
@click.option("--limit", type=click.IntRange(min=1), default=160, help="Masks used, evenly spaced over the sorted folder.")
@click.option("--sizes", callback=parse_sizes, default="160x240,256x384,320x480,480x720,640x960", help="Input sizes HxW.")
@click.option("--widths", callback=parse_widths, default="8,16,32", help="U-Net widths.")
@click.option("--depths", callback=int_list("depths", "4,5", high=8), default="4", help="U-Net depths.")
@click.option(
    "--run", "run_dirs", multiple=True, type=FOLDER, help="A unet-train run whose best Dice joins the table (repeatable)."
)
@click.option(
    "--device", type=DEVICE, default="auto", help="cpu (FP32) or cuda[:N] (FP16, I/O binding); auto: the first GPU, else the CPU."
)
@out_option("unet-bench-tradeoff", "tradeoff.json and tradeoff.md")
@cache_dir_option
@no_progress_option
@verbose_option
def tradeoff(masks_dir, limit, sizes, widths, depths, run_dirs, device, out_dir, cache_dir, no_progress, verbose):
    """Dice/speed trade-off of input size, width and depth: each size's resolution ceiling (the Dice of a
    perfect model), each configuration's inference speed, and trained runs' validation Dice."""
    from benchmarks.tradeoff import TradeoffConfig, run_tradeoff, write_tradeoff

    masks = spread_evenly(sorted(p for p in masks_dir.iterdir() if p.is_file() and not p.name.startswith(".")), limit)
    with exit_on(CarvanaError, ValueError):
        config = TradeoffConfig(tuple(masks), sizes, widths, depths, tuple(run_dirs), device)
        with setup_logging(verbose):
            results = run_tradeoff(config, cache_dir=cache_dir, progress=not no_progress)
            paths = write_tradeoff(results, out_dir)
    click.echo(paths["md"].read_text(), nl=False)
    click.echo(f"wrote {paths['json']} and {paths['md']}")


@main.command(context_settings=CONTEXT)
@click.option("--images", required=True, type=LOCATION, help="Photos to segment: a folder or a URI (s3://bucket/prefix).")
@click.option("--model", type=FILE, help="ONNX model [default: the bundled one].")
@click.option(
    "--workers",
    "worker_counts",
    type=click.IntRange(min=1),
    multiple=True,
    default=(1, 2),
    help="Ray worker counts (repeatable).",
)
@click.option(
    "--nodes",
    "node_counts",
    type=click.IntRange(min=1),
    multiple=True,
    help="Also run on this many nodes simulated on this machine (repeatable; one actor per node, the cores split).",
)
@click.option("--device", type=DEVICE, default="auto", help="auto: the GPUs when there are, else the CPU.")
@click.option("--limit", type=click.IntRange(min=1), default=None, help="Only the first N photos [default: all].")
@click.option("--address", help="Ray cluster [default: $RAY_ADDRESS, else a local Ray using every GPU and core here].")
@out_option("unet-bench-scaling", "results.json and results.md")
@no_progress_option
@verbose_option
def scaling(images, model, worker_counts, node_counts, device, limit, address, out_dir, no_progress, verbose):
    """Images/s of `unet-batch segment --engine ray` against the number of workers, and of simulated nodes, beside
    the local engine's (the same photos and model): how a host's GPUs, or a cluster's nodes, add up."""
    require("onnxruntime", "cpu", what="unet-bench scaling")
    require("ray", "ray", what="unet-bench scaling")
    from benchmarks.scaling import ScalingConfig, render, run_scaling, write_scaling

    with exit_on(CarvanaError, ValueError):
        config = ScalingConfig(images, model, worker_counts, node_counts, device, limit, address, progress=not no_progress)
        with setup_logging(verbose):
            rows, starts = run_scaling(config)
            paths = write_scaling(rows, starts, out_dir)
    click.echo(render(rows, starts), nl=False)
    click.echo(f"wrote {paths['json']} and {paths['md']}")
