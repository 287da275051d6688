"""Errors of the benchmark suite, and how a caught exception is recorded in results.json."""

from __future__ import annotations


class BenchError(Exception):
    """A benchmark that cannot run as asked; the message names the file or option and the fix."""


def first_line(error: BaseException, limit: int = 500) -> str:
    """``Type: first line of the message``: what results.json records for a failed benchmark."""
    text = str(error).strip()
    return f"{type(error).__name__}: {text.splitlines()[0] if text else '(no message)'}"[:limit]
