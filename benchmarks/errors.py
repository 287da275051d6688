"""Errors of the benchmark suite, and how a caught exception is recorded in results.json."""

from __future__ import annotations

from batch.core.logs import first_line


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message names the file or option and the fix."""


def describe_error(error: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``: what results.json records for a failed benchmark."""
    return f"{type(error).__name__}: {first_line(error)}"[:limit]
