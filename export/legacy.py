"""The keyword forms of the export functions from before they took their options whole, for one transition.

``export_checkpoint(ckpt, out, fp16=False)`` is now ``export_checkpoint(ckpt, out, ExportOptions(fp16=False))``;
callers outside export/ (tests/conftest.py, tests/test_batch_integration.py, benchmarks/models.py) still
use the old form. Such a call warns (``DeprecationWarning``, naming the caller's line) and is turned into
the new one, so the two forms cannot drift apart. Delete this module once those callers have moved.
"""

from __future__ import annotations

import functools
import inspect
import warnings
from collections.abc import Callable
from typing import ParamSpec, TypeVar

P = ParamSpec("P")
R = TypeVar("R")
Convert = Callable[..., tuple[tuple, dict]]  # the old call's (*args, **kwargs) -> the new call's (args, kwargs)


def accepts_old_keywords(convert: Convert) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Let the decorated function also be called with keywords it no longer has, through ``convert``."""

    def decorate(function: Callable[P, R]) -> Callable[P, R]:
        current = set(inspect.signature(function).parameters)

        @functools.wraps(function)
        def call(*args, **kwargs):
            old = sorted(kwargs.keys() - current)
            if old:
                warnings.warn(
                    f"{function.__name__}({', '.join(f'{k}=...' for k in old)}) is deprecated: pass the options "
                    "whole (export.config; see docs/export.md, Python API)",
                    DeprecationWarning,
                    stacklevel=2,
                )
                args, kwargs = convert(*args, **kwargs)
            return function(*args, **kwargs)

        return call

    return decorate
