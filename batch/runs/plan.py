"""Discovery and planning: which photos to segment, where their outputs go, what is already done.

- Inputs: what the input location lists (:meth:`batch.runs.storage.Storage.find_images`).
- The output tree mirrors the input tree (see :func:`batch.runs.formats.output_paths`).
- Two inputs that would write the same output file (``a/x.jpg`` and ``a/x.png``) are a conflict:
  neither is segmented, both are reported. So is a photo whose outputs' names would be too long, and
  every entry the listing skipped (:class:`batch.runs.storage.Listing`): all are ``refused``.
- A photo whose requested outputs all exist is skipped (done by an earlier run), unless
  ``overwrite``; if only some exist, only the missing ones are written.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING

from batch.runs.formats import output_paths
from batch.runs.names import UnsafeName, check_output_names

if TYPE_CHECKING:
    from batch.runs.storage import Listing, Storage


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
    refused: list[tuple[Job, str]]  # (job, reason): conflicts, names too long, entries the listing skipped

    @property
    def size(self) -> int:
        """Every input found (after --limit), refused ones included."""
        return len(self.jobs) + len(self.done) + len(self.refused)

    @property
    def all_jobs(self) -> list[Job]:
        """Every input that has outputs (to do or done), in input order."""
        return sorted(self.jobs + self.done, key=lambda job: job.rel.parts)


def make_plan(
    source: Storage,
    output: Storage,
    listing: Listing,
    formats: tuple[str, ...],
    overwrite: bool,
    finished: Collection[str] = (),
) -> Plan:
    """Jobs for the photos of ``listing`` in ``source`` (a folder or a bucket) writing ``formats`` into ``output``.

    ``finished``: the photos (``Job.name``) an earlier run segmented into ``output`` (confidence.csv): in a conflict
    such a photo keeps its outputs, and only the newcomers are refused.
    """
    candidates = [Job(source.locate(rel), rel, output_paths(PurePosixPath(), rel, formats)) for rel in listing.images]
    refusals = find_conflicts(candidates, output, () if overwrite else finished) | long_names(candidates, output)
    refused = [(Job(name, PurePosixPath(name), {}), reason) for name, reason in listing.skipped]
    refused += [(job, refusals[job.rel]) for job in candidates if job.rel in refusals]
    candidates = [job for job in candidates if job.rel not in refusals]
    existing = set() if overwrite else output.existing(path for job in candidates for path in job.outputs.values())
    todo, done = [], []
    for job in candidates:
        missing = tuple(fmt for fmt, path in job.outputs.items() if path not in existing)
        (todo if missing else done).append(Job(job.source, job.rel, job.outputs, missing))
    return Plan(todo, done, refused)


def find_conflicts(candidates: list[Job], output: Storage, finished: Collection[str]) -> dict[PurePosixPath, str]:
    """rel -> reason for the inputs that would write one output file between them: none is segmented, unless one of
    them was finished by an earlier run (``finished``): that one keeps its outputs."""
    writers: dict[PurePosixPath, list[Job]] = defaultdict(list)
    for job in candidates:
        for path in job.outputs.values():
            writers[path].append(job)
    clashing: dict[PurePosixPath, str] = {}
    for path, jobs in writers.items():
        if len(jobs) < 2:
            continue
        owners = [job for job in jobs if job.name in finished]
        if len(owners) == 1:
            for job in jobs:
                if job is not owners[0]:
                    clashing.setdefault(
                        job.rel,
                        f"conflict: it would overwrite {output.locate(path)}, written for {owners[0].name} by an earlier "
                        "run; rename it",
                    )
            continue
        names = " and ".join(job.name for job in jobs)
        for job in jobs:
            clashing.setdefault(job.rel, f"conflict: {names} would both write {output.locate(path)}; rename one of them")
    return clashing


def long_names(candidates: list[Job], output: Storage) -> dict[PurePosixPath, str]:
    """rel -> reason for the inputs whose outputs' names the output location cannot take."""
    refused = {}
    for job in candidates:
        try:
            check_output_names(list(job.outputs.values()), output.key_prefix_bytes)
        except UnsafeName as e:
            refused[job.rel] = str(e)
    return refused
