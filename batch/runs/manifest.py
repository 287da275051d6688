"""What made the outputs in OUTPUT_DIR, and what earlier runs reported: ``OUTPUT_DIR/.unet-batch/``.

Resume skips photos whose outputs exist, so it must know those outputs came from the same model and
settings: a rerun with another model, threshold or TTA would otherwise keep the old masks beside the
new ones. ``made-by.json`` records them when a run starts (before its first output); a rerun that
differs is refused, naming what changed, unless it is told to ``--overwrite``. An ``--overwrite``
run marks the record until it has redone every photo, so that an interrupted one is not resumed as if
the old masks were the new ones. The formats are recorded too (every format written so far), but a
rerun may add formats: each format's file comes from the same mask, and a rerun writes only the files
missing. ``history.jsonl`` keeps every run's report: the ``report.json`` of a run with nothing to do
does not replace the last one that did work.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, fields, replace
from pathlib import PurePosixPath

from batch.runs.config import SegmentError
from batch.runs.report import Report
from batch.runs.storage import Storage

STATE_FOLDER = PurePosixPath(".unet-batch")  # hidden: never listed as an input, never taken for an output
MADE_BY = STATE_FOLDER / "made-by.json"
HISTORY = STATE_FOLDER / "history.jsonl"
LABELS = {"model_sha256": "model", "threshold": "threshold", "tta": "--tta"}  # what a resumed run must share


@dataclass(frozen=True)
class MadeBy:
    """The settings that decide what the outputs hold."""

    model_sha256: str  # of the model file's bytes
    model: str  # its path or name, for messages
    threshold: float
    tta: bool
    formats: tuple[str, ...]  # every format written into OUTPUT_DIR so far
    overwriting: bool = False  # an --overwrite run has started and not finished: older outputs may remain

    def changes(self, other: MadeBy) -> list[str]:
        """What differs from ``other``, in words (``model: a.onnx (sha 1f2e..) -> b.onnx (sha 9a8b..)``)."""
        changed = []
        for key, label in LABELS.items():
            before, after = getattr(other, key), getattr(self, key)
            if before != after:
                if key == "model_sha256":
                    before, after = f"{other.model} (sha256 {before[:12]})", f"{self.model} (sha256 {after[:12]})"
                changed.append(f"{label}: {before} -> {after}")
        return changed

    def to_json(self) -> bytes:
        return (json.dumps(asdict(self), indent=2) + "\n").encode("utf-8")


def read_made_by(output: Storage) -> MadeBy | None:
    """The record of the runs before, or None (a new OUTPUT_DIR, or outputs of a version that kept none)."""
    data = output.read_many([MADE_BY]).get(MADE_BY)
    if data is None:
        return None
    try:
        values = json.loads(data)
        return MadeBy(
            **{f.name: values[f.name] for f in fields(MadeBy) if f.name in values} | {"formats": tuple(values["formats"])}
        )
    except (ValueError, TypeError, KeyError) as e:
        raise SegmentError(
            f"{output.locate(MADE_BY)} is damaged ({e}): it says what made the outputs there; rerun with --overwrite "
            "to redo them all, or choose another OUTPUT_DIR"
        ) from e


def check_and_record(output: Storage, made: MadeBy, overwrite: bool) -> None:
    """Refuse to resume outputs made otherwise (a :class:`SegmentError` naming the changes and ``--overwrite``);
    then record ``made`` before the first output is written."""
    previous = read_made_by(output)
    if previous is not None and not overwrite:
        if previous.overwriting:
            raise SegmentError(
                f"an --overwrite run into {output} did not finish, so some outputs there are older ones: "
                "rerun with --overwrite to redo them all"
            )
        changed = made.changes(previous)
        if changed:
            raise SegmentError(
                f"{output} holds outputs made with other settings ({'; '.join(changed)}); resuming would mix them. "
                "Rerun with --overwrite to redo every photo with these settings, or choose another OUTPUT_DIR"
            )
    formats = made.formats if previous is None or overwrite else tuple(dict.fromkeys(previous.formats + made.formats))
    output.write(MADE_BY, replace(made, formats=formats, overwriting=overwrite).to_json())


def finish_overwrite(output: Storage) -> None:
    """An --overwrite run that redid every photo: its outputs are now all of a kind."""
    made = read_made_by(output)
    if made is not None:
        output.write(MADE_BY, replace(made, overwriting=False).to_json())


def append_history(output: Storage, report: Report) -> None:
    """Add the run's report to ``history.jsonl`` (one JSON object a line, oldest first)."""
    before = output.read_many([HISTORY]).get(HISTORY, b"")
    output.write(HISTORY, before + json.dumps(report.to_dict()).encode("utf-8") + b"\n")
