"""Optional dependencies: each heavy library comes with one of the package's extras (setup.cfg).

Commands import their heavy modules through :func:`require`, inside the command, so that ``--help``
works with any extras installed and a missing extra is one line naming the ``pip install`` to run.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from batch.core.errors import CarvanaError

ALTERNATIVES = {"cpu": "gpu"}  # onnxruntime comes with either; the GPU build replaces the CPU one


class MissingExtra(CarvanaError, ImportError):
    """A library of an extra that is not installed (also an ImportError); the commands exit with status 2."""


def install_hint(extra: str) -> str:
    hint = f"pip install '.[{extra}]'"
    if extra in ALTERNATIVES:
        hint += f" (or '.[{ALTERNATIVES[extra]}]' on a CUDA host)"
    return hint


def require(module: str, extra: str, what: str | None = None) -> ModuleType:
    """Import ``module`` (e.g. ``"onnxruntime"``); :class:`MissingExtra` naming ``extra`` when it is missing.

    ``what`` names what needs it in the message (a command, a feature); by default the module itself.
    """
    try:
        return importlib.import_module(module)
    except ImportError as e:
        needs = f"{what} needs" if what else f"{module} is missing: it comes with"
        raise MissingExtra(f"{needs} the '{extra}' extra ({e}): {install_hint(extra)}") from e
