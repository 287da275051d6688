"""What the project's commands share: click parameter types, ``--version``, logging set-up, the usage-error type."""

from __future__ import annotations

import logging
import re

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from batch.devices import DEVICE_NAMES, DeviceError, parse_device
from batch.logs import set_levels
from batch.storage import as_location
from batch.version import package_version

QUIET_LIBRARIES = {"PIL": logging.INFO}  # Pillow logs every PNG chunk at DEBUG: keep -v about this program


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
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N`` in any case -> its canonical name (``auto``, ``cpu``, ``cuda:N``)."""

    name = DEVICE_NAMES

    def get_metavar(self, param, ctx=None) -> str:
        return DEVICE_NAMES  # click would upper-case the name

    def convert(self, value, param, ctx):
        try:
            return str(parse_device(value))
        except DeviceError:
            self.fail(f"{value!r} is not a device: use auto, cpu, cuda or cuda:N", param, ctx)


class LocationType(click.ParamType):
    """A local folder (a ``Path``) or an object-storage URI such as ``s3://bucket/prefix`` (a ``str``; batch.storage)."""

    name = "PATH|URI"

    def convert(self, value, param, ctx):
        return as_location(value)


SIZE = SizeType()
DEVICE = DeviceType()
LOCATION = LocationType()


def version_option(command):
    """``--version`` for a click command or group: ``unet-batch 0.1.0`` (a fresh option each time: click caches the name)."""
    return click.version_option(package_version(), "--version", message="%(prog)s %(version)s")(command)


def setup_logging(verbose: bool) -> logging_redirect_tqdm:
    """Log to stderr without breaking tqdm bars; use as a context manager around the command's work."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    set_levels(QUIET_LIBRARIES)
    return logging_redirect_tqdm()


class InputError(click.ClickException):
    """Bad input named in the message: exit code 2, like a usage error."""

    exit_code = 2
