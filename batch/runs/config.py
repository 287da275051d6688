"""What a folder or bucket run is asked to do, and the error when it cannot start: :class:`RunConfig`
(``unet-batch segment``, :func:`batch.segment`) and, for the Ray engine, :class:`ClusterConfig`. Frozen
dataclasses, checked when they are made, importable without ONNX Runtime or Ray (the command line takes
its defaults from them)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from batch.core.errors import CarvanaError
from batch.inference.config import SegmenterConfig, check_positive
from batch.runs.formats import FORMATS, conflicting_formats
from batch.runs.report import REPORT_NAME
from batch.runs.storage import as_location, is_uri

ENGINES = ("local", "ray", "auto")
RAY_PAYS_OFF = 1000  # photos to do from which --engine auto uses a named Ray cluster (docs/scale-out.md, "Start-up")


class SegmentError(CarvanaError):
    """A run that cannot start (bad folders, model, device, cluster or options); the message says what to fix."""


@dataclass(frozen=True)
class RunConfig(SegmenterConfig):
    """A folder run (``unet-batch segment``): every photo under ``input_dir`` -> outputs under ``output_dir``."""

    input_dir: Path | str  # a folder, or a URI (s3://bucket/prefix: batch.runs.storage), kept as a str
    output_dir: Path | str
    formats: tuple[str, ...] = ("png",)  # only these are written: ("overlay",) alone writes no mask
    overwrite: bool = False  # redo photos whose outputs exist
    limit: int | None = None  # only the first N photos (sorted)
    report: Path | None = None  # None: OUTPUT_DIR/report.json
    progress: bool = True  # a progress bar on stderr

    def __post_init__(self) -> None:
        super().__post_init__()
        object.__setattr__(self, "input_dir", as_location(self.input_dir))
        object.__setattr__(self, "output_dir", as_location(self.output_dir))
        if self.report is not None:
            object.__setattr__(self, "report", Path(self.report))
        formats = tuple(dict.fromkeys(self.formats or ("png",)))
        unknown = [f for f in formats if f not in FORMATS]
        if unknown:
            raise ValueError(f"unknown format(s) {unknown}; choose from {', '.join(FORMATS)}")
        conflict = conflicting_formats(formats)
        if conflict:
            raise ValueError(conflict)
        object.__setattr__(self, "formats", formats)
        check_positive("limit", self.limit)

    @property
    def report_path(self) -> Path | str:
        if self.report is not None:
            return self.report
        return f"{self.output_dir}/{REPORT_NAME}" if is_uri(self.output_dir) else self.output_dir / REPORT_NAME


@dataclass(frozen=True)
class ClusterConfig:
    """Where a Ray run goes: a Ray cluster's address, and how many inference actors it gets."""

    address: str | None = None  # None: RAY_ADDRESS, else a local Ray started for the run (every GPU and core here)
    workers: int | None = None  # inference actors; None: one per GPU, or one per node on a CPU-only cluster

    def __post_init__(self) -> None:
        check_positive("workers", self.workers)

    @property
    def named_address(self) -> str | None:
        """The cluster the run names: ``address``, else ``RAY_ADDRESS``; None for a local Ray started for the run."""
        return resolve_ray_address(self.address)


def resolve_ray_address(address: str | None) -> str | None:
    """``address``, else the ``RAY_ADDRESS`` environment variable, else None."""
    return address or os.environ.get("RAY_ADDRESS") or None
