"""One run at a time per output folder: OUTPUT_DIR is created for the run and locked while it writes.

Two runs writing one folder would spoil resume (each would take the other's half-written photos for
done ones); the second is refused with a message saying so. A run that could not start leaves
nothing behind: the folders made for it are removed again while still empty.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path
from typing import TextIO

from batch.runs.storage import LocalFolder, Storage, StorageError

LOCK_NAME = ".unet-batch.lock"


@contextlib.contextmanager
def output_folder(output: Storage) -> Iterator[None]:
    """OUTPUT_DIR, created if needed and locked for this run; on the way out the lock file goes, and so do
    the folders made here if they are still empty (a run that could not start leaves nothing behind).
    A bucket needs neither (there is no lock: do not point two runs at one prefix)."""
    if not isinstance(output, LocalFolder):
        yield
        return
    output_dir = output.root
    made = _missing_folders(output_dir)  # deepest first
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create output folder {output_dir}: {e.strerror or e}") from e
        with output_lock(output_dir):
            yield
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR (two runs writing one folder would spoil resume); the lock file
    ``OUTPUT_DIR/.unet-batch.lock`` exists only while a run holds it."""
    path = output_dir / LOCK_NAME
    handle = _take_lock(path)
    with handle:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding the lock: the next run makes a fresh file


def _take_lock(path: Path) -> TextIO:
    while True:
        try:
            handle = open(path, "a")  # noqa: SIM115  (returned open, to be held while the run goes)
        except OSError as e:
            raise StorageError(f"cannot write to output folder {path.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            handle.close()
            raise StorageError(
                f"another unet-batch run is writing to {path.parent}; wait for it to finish or choose another OUTPUT_DIR"
            ) from e
        if _is_same_file(handle, path):
            return handle
        handle.close()  # the run before removed this lock file as this one took it: take the new file


def _is_same_file(handle: TextIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), path.stat())
    except FileNotFoundError:
        return False
