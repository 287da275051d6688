"""Log lines: libraries kept to what matters to a user, and errors shortened to one line."""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from contextlib import contextmanager

# Lines C++ libraries (DALI) put around the message proper: a banner, a location, a stack trace.
NOISE_PREFIXES = ("Critical error", "Error in", "File ", "which was used", "encountered")


def set_levels(levels: Mapping[str, int]) -> dict[str, int]:
    """Set each named logger's level; return the levels they had (to restore them)."""
    previous = {}
    for name, level in levels.items():
        logger = logging.getLogger(name)
        previous[name] = logger.level
        logger.setLevel(level)
    return previous


@contextmanager
def quiet_loggers(levels: Mapping[str, int]) -> Iterator[None]:
    """Raise the named loggers to ``levels`` (e.g. ``{"onnxscript": logging.WARNING}``) inside the block."""
    previous = set_levels(levels)
    try:
        yield
    finally:
        set_levels(previous)


def first_line(error: BaseException) -> str:
    """The first meaningful line of ``error``'s message (the type's name when it has none)."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    useful = [line for line in lines if not line.startswith(NOISE_PREFIXES)]
    return (useful or lines or [type(error).__name__])[0]
