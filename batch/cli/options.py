"""What the project's four commands share (``unet-batch``, ``unet-train``, ``unet-export``, ``unet-bench``):
click parameter types, ``--version``, logging set-up, and how the project's errors become exit status 2."""

from __future__ import annotations

import contextlib
import importlib
import logging
import re
from collections.abc import Iterator

import click
from tqdm.contrib.logging import logging_redirect_tqdm

from batch.core.devices import DEVICE_NAMES, DeviceError, parse_device
from batch.core.errors import CarvanaError
from batch.core.extras import MissingExtra
from batch.core.logs import set_levels
from batch.core.version import package_version

SHOWN_FAILURES = 10  # failed photos listed on stderr at the end of a command; the rest are in its report
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
    """A local folder (a ``Path``) or an object-storage URI such as ``s3://bucket/prefix`` (a ``str``; batch.runs.storage)."""

    name = "PATH|URI"

    def convert(self, value, param, ctx):
        from batch.runs.storage import as_location  # here: importing these options loads no run machinery

        return as_location(value)


SIZE = SizeType()
LOCATION = LocationType()
DEVICE = DeviceType()


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


@contextlib.contextmanager
def exit_on(*errors: type[CarvanaError]) -> Iterator[None]:
    """Turn ``errors`` (and a missing extra, always) raised inside the block into exit status 2 with their message."""
    try:
        yield
    except (MissingExtra, *errors) as e:
        raise InputError(str(e)) from e


class Command(click.Command):
    """A click command whose missing extras, wherever they are found, exit 2 naming the ``pip install``."""

    def invoke(self, ctx: click.Context):
        with exit_on():
            return super().invoke(ctx)


class Group(click.Group):
    """A click group of :class:`Command`s, each imported only when it runs (``lazy``: name -> ``module:attribute``),
    so that ``--help`` stays fast and importing these options loads no command."""

    command_class = Command

    def __init__(self, *args, lazy: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy = dict(lazy or {})

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(self.lazy))

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name in self.lazy and name not in self.commands:
            module, attribute = self.lazy[name].split(":")
            self.add_command(getattr(importlib.import_module(module), attribute), name)
        return super().get_command(ctx, name)

    def invoke(self, ctx: click.Context):
        with exit_on():
            return super().invoke(ctx)
