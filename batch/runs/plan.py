"""Discovery and planning: which photos to segment, where their outputs go, what is already done.

- Inputs: what the input location lists (:meth:`batch.runs.storage.Storage.find_images`).
- The output tree mirrors the input tree (see :func:`batch.runs.formats.output_paths`).
- Two inputs that would write the same output file (``a/x.jpg`` and ``a/x.png``) are a conflict:
  neither is segmented, both are reported.
- A photo whose requested outputs all exist is skipped (done by an earlier run), unless
  ``overwrite``; if only some exist, only the missing ones are written.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from batch.runs.formats import output_paths

if TYPE_CHECKING:
    from batch.runs.storage import Storage


@dataclass(frozen=True)
class Job:
    source: str  # the photo, as messages and the report name it: a path, or a URI in a bucket
    rel: PurePosixPath  # its path relative to the input location
    outputs: dict[str, PurePosixPath] = field(hash=False, compare=False)  # format -> file relative to the output location
    todo: tuple[str, ...] = ()  # formats still to write

    @property
    def name(self) -> str:
        """The ``img`` column of submission.csv: the path relative to the input folder (the file name when flat)."""
        return self.rel.as_posix()


@dataclass(frozen=True)
class Plan:
    jobs: list[Job]  # to segment, in input order
    done: list[Job]  # every output already there (skipped)
    conflicts: list[tuple[Job, str]]  # (job, reason): inputs that would overwrite each other's outputs

    @property
    def size(self) -> int:
        """Every input found (after --limit)."""
        return len(self.jobs) + len(self.done) + len(self.conflicts)

    @property
    def all_jobs(self) -> list[Job]:
        """Every input that has outputs (to do or done), in input order."""
        return sorted(self.jobs + self.done, key=lambda job: job.rel.parts)


def make_plan(source: Storage, output: Storage, rels: list[PurePosixPath], formats: tuple[str, ...], overwrite: bool) -> Plan:
    """Jobs for the photos ``rels`` of ``source`` (a folder or a bucket) writing ``formats`` into ``output``."""
    candidates = [Job(source.locate(rel), rel, output_paths(PurePosixPath(), rel, formats)) for rel in rels]
    writers: dict[PurePosixPath, list[Job]] = defaultdict(list)
    for job in candidates:
        for path in job.outputs.values():
            writers[path].append(job)
    clashing: dict[PurePosixPath, str] = {}
    for path, jobs in writers.items():
        if len(jobs) > 1:
            names = " and ".join(job.name for job in jobs)
            for job in jobs:
                clashing.setdefault(job.rel, f"conflict: {names} would both write {output.locate(path)}; rename one of them")

    existing = set() if overwrite else output.existing(path for job in candidates for path in job.outputs.values())
    todo, done, conflicts = [], [], []
    for job in candidates:
        if job.rel in clashing:
            conflicts.append((job, clashing[job.rel]))
            continue
        missing = tuple(fmt for fmt, path in job.outputs.items() if path not in existing)
        (todo if missing else done).append(Job(job.source, job.rel, job.outputs, missing))
    return Plan(todo, done, conflicts)
