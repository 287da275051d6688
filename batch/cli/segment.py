"""``unet-batch segment``: every photo of a folder or bucket to masks (batch.runs does the work)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import click

from batch.cli.options import DEVICE, LOCATION, SHOWN_FAILURES, Command, InputError, setup_logging
from batch.core.devices import cpu_count
from batch.core.errors import CarvanaError
from batch.core.extras import require
from batch.inference.config import DECODERS, RUNTIMES, defaults
from batch.runs.config import ENGINES, ClusterConfig, RunConfig
from batch.runs.formats import FORMATS

INTERRUPTED = 130  # 128 + SIGINT
TERMINATED = 143  # 128 + SIGTERM
SEGMENT = defaults(RunConfig)


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread so that a run stops the way Ctrl-C stops it."""


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Turn SIGTERM into :class:`Terminated` while the block runs (main thread only: signals go there)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame) -> None:
        raise Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@click.command("segment", cls=Command)
@click.argument("input_dir", type=LOCATION)
@click.argument("output_dir", type=LOCATION)
@click.option(
    "--model",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="ONNX file from `unet-export to-onnx` [default: the bundled model]",
)
@click.option(
    "--device", type=DEVICE, default=SEGMENT["device"], help="auto: the GPU when ONNX Runtime's CUDA provider works, else the CPU"
)
@click.option(
    "--decoder", type=click.Choice(DECODERS), default=SEGMENT["decoder"], help="auto: DALI (nvJPEG) on a GPU, Pillow on the CPU"
)
@click.option("--batch-size", type=click.IntRange(min=1), help="photos per inference batch [default: 32 on a GPU, 8 on the CPU]")
@click.option(
    "--threshold", type=click.FloatRange(0, 1, min_open=True, max_open=True), help="car probability cut [default: the model's]"
)
@click.option(
    "--tta", is_flag=True, default=SEGMENT["tta"], help="average with the prediction for the mirrored photo (2x the inference)"
)
@click.option(
    "--overwrite", is_flag=True, default=SEGMENT["overwrite"], help="redo photos whose outputs exist (default: skip them)"
)
@click.option("--limit", type=click.IntRange(min=1), help="only the first N photos (sorted by path)")
@click.option("--report", type=click.Path(dir_okay=False, path_type=Path), help="report file [default: OUTPUT_DIR/report.json]")
@click.option(
    "--format",
    "formats",
    type=click.Choice(FORMATS),
    multiple=True,
    default=SEGMENT["formats"],
    help="output format; repeat for several. Only the formats named are written: `--format overlay` alone writes "
    "no mask (add `--format png`)",
)
@click.option(
    "--engine",
    type=click.Choice(ENGINES),
    default="local",
    help="local: this process; ray: inference actors on a Ray cluster (the 'ray' extra; docs/scale-out.md); auto: ray "
    "when a cluster is named (--address, RAY_ADDRESS) and there are enough photos to do for its start-up to pay off",
)
@click.option(
    "--address",
    help="--engine ray or auto: the Ray cluster [default: $RAY_ADDRESS, else a local Ray using every GPU and core here]",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    help=f"local engine: decode and writer threads each [default: CPU cores, {cpu_count()} here]; --engine ray: inference "
    "actors [default: one per GPU, else one per node]; --engine auto: as for the local engine (per actor on Ray)",
)
@click.option(
    "--runtime",
    type=click.Choice(RUNTIMES, case_sensitive=False),
    default=SEGMENT["runtime"],
    help="what runs the model on the CPU. auto: the faster of ONNX Runtime and OpenVINO on this CPU for this model "
    "(timed once, cached in ~/.cache/carvana-unet); a GPU always runs ONNX Runtime's CUDA provider",
)
@click.option("--threads", type=click.IntRange(min=1), help=f"inference threads [default: CPU cores, {cpu_count()} here]")
@click.option(
    "--streams",
    type=click.IntRange(min=1),
    help="CPU: batches run at once, the inference threads split among them [default: the runtime's choice for "
    "throughput]; 1: every thread on each batch (the least time per batch)",
)
@click.option(
    "--read-timeout",
    type=click.FloatRange(0, 24 * 3600, min_open=True),
    default=SEGMENT["read_timeout"],
    help="seconds one photo's read may take before it is failed (a hung network filesystem)",
)
@click.option("--progress/--no-progress", default=SEGMENT["progress"], help="progress bar on stderr")
@click.option("-v", "--verbose", is_flag=True, help="debug logging, and each failed photo as it fails")
def segment_command(input_dir: Path | str, output_dir: Path | str, engine: str, address: str | None, verbose: bool,
                    **options) -> None:  # fmt: skip
    """Write a mask for every .jpg/.jpeg/.png under INPUT_DIR into OUTPUT_DIR (same tree); either may
    be a URI such as s3://bucket/prefix.

    Rerunning the same command finishes only what is missing. Failed photos are listed at the end
    and in the report, with the reason; the run goes on without them.
    """
    for module in ("onnxruntime", "onnx"):
        require(module, "cpu", what="unet-batch segment")
    from batch.runs.run import run

    cluster = None
    if engine == "ray":
        require("ray", "ray", what="--engine ray")
        cluster = ClusterConfig(address=address, workers=options.pop("workers"))
    elif engine == "auto":
        cluster = ClusterConfig(address=address)
    try:
        config = RunConfig(input_dir=input_dir, output_dir=output_dir, **options)
    except ValueError as e:
        raise InputError(str(e)) from e
    with setup_logging(verbose), sigterm_as_interrupt():
        try:
            report = run(config, engine, cluster)
        except CarvanaError as e:  # a run that cannot start
            raise InputError(str(e)) from e
        except KeyboardInterrupt as e:
            click.echo("interrupted: finished masks are kept; rerun the same command to do the rest", err=True)
            raise SystemExit(TERMINATED if isinstance(e, Terminated) else INTERRUPTED) from None
    click.echo(report.summary())
    shown_failures = len(report.failed) if report.report_error else SHOWN_FAILURES  # no file to find the rest in
    for failure in report.failed[:shown_failures]:
        click.echo(f"  {failure['path']}: {failure['reason']}", err=True)
    if len(report.failed) > shown_failures:
        click.echo(f"  ... and {len(report.failed) - shown_failures} more", err=True)
    if report.failed and not report.report_error:
        click.echo(f"{len(report.failed)} photo(s) failed; the list is in {config.report_path}", err=True)
    if report.stopped:
        click.echo(f"stopped: {report.stopped}; rerun the same command to do the rest", err=True)
    if report.report_error:
        click.echo(f"error: {report.report_error}", err=True)
    if report.failed or report.stopped or report.report_error:
        raise SystemExit(1)
