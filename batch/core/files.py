"""Files: atomic writes, and picking files by name.

Every file the project writes goes to a hidden temporary name beside its destination and is renamed
over it (``os.replace``), so a process killed at any moment leaves either the whole file or nothing.
Leftover temporaries of a killed run are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import secrets
import stat
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import TypeVar

from batch.core.errors import CarvanaError

log = logging.getLogger(__name__)

TEMP_SUFFIX = ".unet-batch-tmp"

T = TypeVar("T")


class DuplicateNameError(CarvanaError):
    """Two files that give the same name; the message names both."""


def temporary_path(path: Path) -> Path:
    """A hidden, unique name beside ``path`` to write it under: ``.<random>.unet-batch-tmp``, 32 bytes whatever the
    name's length, so that any name the filesystem takes can be written (a name of 255 bytes included)."""
    return path.with_name(f".{secrets.token_hex(8)}{TEMP_SUFFIX}")


def write_atomic(path: str | Path, data: bytes, durable: bool = False) -> None:
    """Write ``data`` to ``path`` through a temporary file in the same folder and a rename.

    A process killed at any moment leaves the old file or the new one, never a partial one.
    ``durable`` also flushes the data to disk before the rename (survives a power cut; slower).
    """
    path = Path(path)
    temp = temporary_path(path)
    try:
        with open(temp, "wb") as f:
            f.write(data)
            if durable:
                f.flush()
                os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        temp.unlink(missing_ok=True)
        raise


class FileRefused(CarvanaError):
    """A file that is not read: not a regular file, or larger than the limit; the message says what it is."""


FILE_KINDS = {  # what stat says a non-regular file is, in words
    stat.S_ISDIR: "a folder",
    stat.S_ISFIFO: "a FIFO (named pipe)",
    stat.S_ISSOCK: "a socket",
    stat.S_ISCHR: "a character device",
    stat.S_ISBLK: "a block device",
}


def file_kind(mode: int) -> str:
    """ "a regular file", "a folder", "a FIFO (named pipe)", ... for an ``st_mode``."""
    if stat.S_ISREG(mode):
        return "a regular file"
    return next((kind for test, kind in FILE_KINDS.items() if test(mode)), "not a regular file")


def read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """The bytes of ``path`` (links followed) when it is a regular file of at most ``max_bytes``.

    Opened without blocking, so a FIFO put in a photo's place never hangs the reader; its type and size
    are checked on the open file, not on the name (which may change in between). :class:`FileRefused`
    for anything else; ``OSError`` when the file cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise FileRefused(f"is {file_kind(info.st_mode)}, not a file")
        if info.st_size > max_bytes:
            raise FileRefused(f"is {info.st_size / 2**20:.0f} MiB, more than the {max_bytes / 2**20:.0f} MiB limit")
        with os.fdopen(os.dup(fd), "rb") as f:
            data = f.read(info.st_size + 1)  # a buffer of the file's size (not of the limit), and a byte to see growth
            if len(data) > info.st_size:
                data += f.read(max_bytes + 1 - len(data))
    finally:
        os.close(fd)
    if len(data) > max_bytes:  # it grew after the check
        raise FileRefused(f"grew past the {max_bytes / 2**20:.0f} MiB limit while being read")
    return data


UNREADABLE_FIXES = {  # errno of a failed open or read -> what to do about it
    errno.EACCES: "check its permissions (this user must be able to read it)",
    errno.EPERM: "check its permissions (this user must be able to read it)",
    errno.ENOENT: "it does not exist, or is a link to nothing: restore it or remove the link",
    errno.ELOOP: "it is a link in a loop (it points back to itself): replace it by the file",
    errno.EIO: "the disk or network filesystem failed to read it; check the storage and retry",
}


def why_unreadable(error: OSError) -> str:
    """What the system said when a file could not be opened or read, and what to do: ``"Permission denied; check
    its permissions (...)"``. For messages that name the file themselves (the error's own text repeats the path)."""
    fix = UNREADABLE_FIXES.get(error.errno, "check the file and the storage, then retry")
    return f"{error.strerror or type(error).__name__}; {fix}"


def read_input_file(path: str | Path, max_bytes: int) -> bytes:
    """:func:`read_regular_file`, with a file that cannot be opened or read refused too: one :class:`FileRefused` whose
    message (to follow the file's name) says what the file is or what the system said, and what to do."""
    try:
        return read_regular_file(path, max_bytes)
    except FileRefused:
        raise
    except OSError as e:
        raise FileRefused(f"cannot be read ({why_unreadable(e)})") from e


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, in hex (the identity of a model file)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def remove_stale_temporaries(folder: Path) -> int:
    """Delete the temporaries that killed runs left under ``folder``; return how many."""
    removed = 0
    for parent, _, files in os.walk(folder):
        for name in files:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                Path(parent, name).unlink(missing_ok=True)
                removed += 1
    if removed:
        log.info("removed %d unfinished temporary files of an earlier run in %s", removed, folder)
    return removed


def index_by_stem(paths: Iterable[Path], strip_suffix: str = "") -> dict[str, Path]:
    """stem (less ``strip_suffix``, e.g. Kaggle's ``_mask``) -> path; :class:`DuplicateNameError` when two share one."""
    found: dict[str, Path] = {}
    for path in paths:
        stem = path.stem.removesuffix(strip_suffix)
        if stem in found:
            raise DuplicateNameError(f"{found[stem]} and {path} both have the name '{stem}': keep one of them")
        found[stem] = path
    return found


def spread_evenly(items: Sequence[T], limit: int) -> list[T]:
    """At most ``limit`` of ``items``, evenly spaced from the first to the last (Carvana's sorted
    photos: many cars rather than the 16 views of the first few)."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, not {limit}")
    if len(items) <= limit:
        return list(items)
    if limit == 1:
        return [items[0]]
    return [items[round(i * (len(items) - 1) / (limit - 1))] for i in range(limit)]
