"""What a ``segment`` run measured and reports: per-stage clocks and ``report.json``."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from batch.core.files import write_atomic

LEAST_SHOWN = 3  # least confident photos named in the final log line
REPORT_NAME = "report.json"  # in OUTPUT_DIR unless --report says otherwise


@dataclass
class Report:
    """The contents of report.json (docs/batch.md describes every key)."""

    input_dir: str
    output_dir: str
    inputs: int  # images found (after --limit)
    processed: int  # segmented by this run
    skipped: int  # already done by an earlier run
    failed: list[dict[str, str]]  # {"path", "reason"}
    seconds: float  # wall time of the whole run, setup included
    images_per_second: float  # processed / seconds
    stages: dict[str, float]  # busy seconds per stage (stages overlap: they add up to more than seconds)
    device: str  # "cpu" or "cuda:N"
    provider: str  # ONNX Runtime execution provider that ran the model
    decoder: str  # "pillow", "dali-cpu" or "dali-mixed"
    pillow_fallbacks: int  # photos a DALI run decoded with Pillow (PNG, CMYK, refused by DALI)
    model: dict  # path, precision, input_size [H, W], input_layout, input_dtype, output_kind, threshold
    batch_size: int
    formats: list[str]
    threshold: float  # probability threshold used
    tta: bool
    runtime: dict = field(default_factory=dict)  # name, version, precision, chosen_by, reason, rates, streams
    interrupted: bool = False  # stopped by Ctrl-C or SIGTERM before the end
    stopped: str = ""  # why the run stopped before the end on its own (inference failing batch after batch); "" if it did not
    engine: str = "local"  # "local" (this process) or "ray" (batch.runs.ray_engine)
    workers: int = 1  # inference workers: Ray actors, or the local engine's one
    per_worker: dict[str, dict] = field(default_factory=dict)  # Ray: worker -> {"device", "processed", "failed"}
    version: str = field(default="")
    confidence: dict = field(default_factory=dict)  # over confidence.csv: photos, mean, the least confident ones
    report_error: str = ""  # why report.json could not be written at the end ("" when it was); never in the file itself

    def to_dict(self) -> dict:
        return {key: value for key, value in asdict(self).items() if key != "report_error"}

    def to_json(self) -> bytes:
        return (json.dumps(self.to_dict(), indent=2) + "\n").encode("utf-8")

    def write(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(path, self.to_json())

    def runtime_note(self) -> str:
        return f" with {self.runtime['name']}" if self.runtime.get("name") else ""

    def summary(self) -> str:
        line = (
            f"{self.processed} segmented, {self.skipped} already done, {len(self.failed)} failed "
            f"in {self.seconds:.1f} s ({self.images_per_second:.1f} img/s on {self.device}{self.runtime_note()}"
            + (f", decoder {self.decoder})" if self.decoder else ")")
        )
        line += (" - interrupted" if self.interrupted else "") + (" - stopped early" if self.stopped else "")
        least = self.confidence.get("least", [])[:LEAST_SHOWN]
        if least:
            shown = ", ".join(f"{entry['photo']} ({entry['confidence']:.3f})" for entry in least)
            line += f"\nleast confident masks (check these first; all in confidence.csv): {shown}"
        return line


def summarize_confidence(rows: dict[str, float], least: int = 10) -> dict:
    """report.json's ``confidence``: how many photos have a score, their mean, and the ``least`` confident ones."""
    scored = sorted(((value, photo) for photo, value in rows.items() if not math.isnan(value)))
    if not scored:
        return {}
    return {
        "photos": len(scored),
        "mean": round(sum(value for value, _ in scored) / len(scored), 4),
        "least": [{"photo": photo, "confidence": round(value, 4)} for value, photo in scored[:least]],
    }
