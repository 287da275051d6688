"""A crash journal beside the outputs: the photos in flight, so that a photo that kills the process is found and
skipped instead of killing every rerun.

A decoder's segfault or the kernel's out-of-memory killer ends the process with no chance to record
anything, so the journal is written before the work: the photos about to be segmented (``in_flight``).
The next run that finds them there (the local engine's rerun, or the Ray actor restarted after the
crash, on any node: the journal lives in OUTPUT_DIR, which every node sees) takes them as
``suspects`` and segments them one at a time, each recorded alone first; a photo that kills the
process while alone is ``poisoned`` and failed with :data:`CRASHED` from then on. A poison photo
therefore costs two crashes, and the other photos of its batch are done.
"""

from __future__ import annotations

import contextlib
import json
import re
from collections.abc import Iterator
from pathlib import PurePosixPath

from batch.runs.manifest import STATE_FOLDER
from batch.runs.storage import Storage

CRASHED = (
    "killed the process segmenting it (a decoder crash or out of memory), also when segmented alone; it was skipped "
    "so the run could go on. Check the file (open it, or re-encode it as a plain JPEG) and rerun with --overwrite to retry it"
)
JOURNALS = STATE_FOLDER / "journal"


def journal_path(key: str) -> PurePosixPath:
    """Where the journal of worker ``key`` is kept, relative to OUTPUT_DIR."""
    return JOURNALS / f"{re.sub(r'[^A-Za-z0-9_-]', '_', key)}.json"


class CrashJournal:
    """The crash journal of one worker (``key``: "local", or a Ray actor's id, which survives its restarts)."""

    def __init__(self, output: Storage, key: str):
        self.output = output
        self.path = journal_path(key)
        state = self.read()
        self.suspects: set[str] = set(state.get("suspects", ()))
        self.poisoned: set[str] = set(state.get("poisoned", ()))
        in_flight = state.get("in_flight", [])
        if state.get("one_by_one") and len(in_flight) == 1:
            self.poisoned.update(in_flight)  # died twice: with its batch, then alone
            self.suspects.difference_update(in_flight)
        else:
            self.suspects.update(in_flight)

    def read(self) -> dict:
        try:
            return json.loads(self.output.read_many([self.path]).get(self.path, b"{}"))
        except (OSError, ValueError):
            return {}  # a journal cut short by the crash itself: nothing to go on

    def suspected(self, names: list[str]) -> bool:
        """Whether photos of these killed a process before: then do them one at a time."""
        return not self.suspects.isdisjoint(names)

    @contextlib.contextmanager
    def running(self, names: list[str], one_by_one: bool) -> Iterator[None]:
        """Record ``names`` as in flight while the block runs; a process that dies inside leaves them recorded. On the way
        out (an exception included: only a dying process leaves suspects) the journal keeps what a later run must know
        (suspects, poisoned photos) or goes: no file is left behind by runs that never crashed."""
        self.write({"in_flight": names, "one_by_one": one_by_one})
        try:
            yield
        finally:
            if one_by_one:
                self.suspects.difference_update(names)  # done alone without a crash: cleared
            if self.suspects or self.poisoned:
                self.write({"in_flight": [], "one_by_one": False})
            else:
                self.output.remove(self.path)

    def write(self, state: dict) -> None:
        state |= {"suspects": sorted(self.suspects), "poisoned": sorted(self.poisoned)}
        self.output.write(self.path, json.dumps(state).encode("utf-8"))  # whole or not at all
