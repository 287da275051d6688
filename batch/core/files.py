"""Files: atomic writes, and picking files by name.

Every file the project writes goes to a hidden temporary name beside its destination and is renamed
over it (``os.replace``), so a process killed at any moment leaves either the whole file or nothing.
Leftover temporaries of a killed run are removed by :func:`remove_stale_temporaries`.
"""

from __future__ import annotations

import logging
import os
import secrets
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
    """A hidden, unique name beside ``path`` to write it under: ``.NAME.<random>.unet-batch-tmp``."""
    return path.with_name(f".{path.name}.{secrets.token_hex(4)}{TEMP_SUFFIX}")


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
