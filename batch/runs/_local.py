"""The local engine: one :class:`~batch.inference.segmenter.Segmenter` in this process feeding the writer pool.

    Segmenter.stream: [decode thread] -> queue -> [inference: main thread] -> [writer pool] (batch.runs.outputs)

The Segmenter decodes the next batches while ONNX Runtime runs the current one; the writers upsample,
encode and write finished masks while both go on.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from batch.core.errors import CarvanaError
from batch.core.files import file_sha256
from batch.core.timing import StageClock
from batch.inference.decode import Item
from batch.inference.segmenter import Segmenter
from batch.runs.config import RunConfig, SegmentError
from batch.runs.outputs import Results, write_all
from batch.runs.plan import Job
from batch.runs.storage import Storage


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
        return f"{s.model.path.name} on {s.device}, decoder {s.decoder.name}, batch {s.batch_size}"

    def process(self, jobs: list[Job], source: Storage, output: Storage, results: Results, progress: bool) -> None:
        items = [Item(job.source, path=source.file(job.rel), tag=job) for job in jobs]
        write_all(items, self.segmenter, output, results, progress)

    def describe(self) -> dict[str, Any]:
        return self.segmenter.describe()

    def model_identity(self) -> tuple[str, str, float]:
        model = self.segmenter.model
        return str(model.path), file_sha256(model.path), self.segmenter.threshold
