"""click parameter types shared by the project's commands."""

from __future__ import annotations

import logging
import re

import click
from tqdm.contrib.logging import logging_redirect_tqdm


class SizeType(click.ParamType):
    """``HxW`` (e.g. ``640x960``) -> (H, W)."""

    name = "HxW"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(value))
        if not match or 0 in (int(match[1]), int(match[2])):
            self.fail(f"{value!r} is not a size: write HEIGHTxWIDTH, e.g. 640x960", param, ctx)
        return int(match[1]), int(match[2])


class DeviceType(click.ParamType):
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``."""

    name = "auto|cpu|cuda[:N]"

    def convert(self, value, param, ctx):
        if re.fullmatch(r"auto|cpu|cuda(:\d+)?", str(value)):
            return str(value)
        self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)


SIZE = SizeType()
DEVICE = DeviceType()


def setup_logging(verbose: bool) -> logging_redirect_tqdm:
    """Log to stderr without breaking tqdm bars; use as a context manager around the command's work."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    return logging_redirect_tqdm()


class InputError(click.ClickException):
    """Bad input named in the message: exit code 2, like a usage error."""

    exit_code = 2
