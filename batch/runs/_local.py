"""The local engine: one :class:`~batch.inference.segmenter.Segmenter` in this process feeding the writer pool.

    Segmenter.stream: [decode thread] -> queue -> [inference: main thread] -> [writer pool] (batch.runs.outputs)

The Segmenter decodes the next batches while ONNX Runtime runs the current one; the writers upsample,
encode and write finished masks while both go on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from tqdm import tqdm

from batch.core.errors import CarvanaError
from batch.core.files import file_sha256
from batch.core.timing import StageClock
from batch.inference.decode import Item
from batch.inference.segmenter import Segmenter
from batch.runs.config import RunConfig, SegmentError
from batch.runs.journal import CRASHED, CrashJournal
from batch.runs.outputs import Results, write_all
from batch.runs.plan import Job
from batch.runs.storage import Storage

CHUNK_BATCHES = 32  # batches per journal entry: a crash is redone one photo at a time over at most this many


class LocalEngine:
    """This process: the model is loaded once when the run opens the engine."""

    def __init__(self, config: RunConfig, clock: StageClock):
        self.config, self.clock = config, clock
        self.segmenter: Segmenter | None = None

    @contextlib.contextmanager
    def open(self) -> Iterator[None]:
        try:
            segmenter = Segmenter.from_config(self.config, self.clock)
        except FileNotFoundError as e:  # no bundled model
            raise SegmentError(f"no --model given, and {e}") from e
        except CarvanaError as e:
            raise SegmentError(str(e)) from e
        with segmenter:
            self.segmenter = segmenter
            yield

    def summary(self) -> str:
        s = self.segmenter
        runtime = s.model.runtime
        return (
            f"{s.model.path.name} on {s.device} with {runtime.runtime} ({runtime.precision}, by {runtime.chosen_by}), "
            f"decoder {s.decoder.name}, batch {s.batch_size}{streams_note(s.model.network.streams)}"
        )

    def process(self, jobs: list[Job], source: Storage, output: Storage, results: Results, progress: bool) -> None:
        """The jobs in chunks, each recorded in the crash journal first (batch.runs.journal): a photo that kills this
        process is found by the reruns and failed, instead of killing each of them. Photos that were in flight when a
        run crashed go first, one at a time."""
        journal = CrashJournal(output, "local")
        for job in jobs:
            if job.name in journal.poisoned:
                results.fail(job, CRASHED)
        jobs = [job for job in jobs if job.name not in journal.poisoned]
        suspects = [job for job in jobs if job.name in journal.suspects]
        chunk = CHUNK_BATCHES * self.segmenter.batch_size
        rest = [job for job in jobs if job.name not in journal.suspects]
        with tqdm(total=len(jobs), unit="img", desc="segment", disable=not progress, dynamic_ncols=True) as bar:
            for group, one_by_one in [([job], True) for job in suspects] + [
                (rest[i : i + chunk], False) for i in range(0, len(rest), chunk)
            ]:
                with journal.running([job.name for job in group], one_by_one):
                    items = [Item(job.source, path=source.file(job.rel), tag=job) for job in group]
                    write_all(items, self.segmenter, output, results, bar)

    def describe(self) -> dict[str, Any]:
        return self.segmenter.describe()

    def model_identity(self) -> tuple[str, str, float]:
        model = self.segmenter.model
        return str(model.path), file_sha256(model.path), self.segmenter.threshold


def streams_note(streams: int) -> str:
    return f", {streams} batches at once" if streams > 1 else ""
