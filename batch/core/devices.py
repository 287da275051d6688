"""Devices as the commands name them: ``auto``, ``cpu``, ``cuda`` or ``cuda:N`` (any case).

The one parser of device names; every package (the runner, training, export, benchmarks) uses it and
adds only the checks of its own framework (ONNX Runtime's providers in :mod:`batch.inference.runtime`, torch's
CUDA in ``unet.train``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Literal

from batch.core.errors import CarvanaError

DeviceKind = Literal["auto", "cpu", "cuda"]
DEVICE_NAMES = "auto|cpu|cuda[:N]"  # how help texts show the accepted names
PATTERN = re.compile(r"(auto|cpu|cuda)(?::(\d+))?")


class DeviceError(CarvanaError):
    """A device that was asked for and cannot be used; the message says why and what to do."""


@dataclass(frozen=True)
class Device:
    kind: DeviceKind  # "auto": the GPU when the framework can use one, else the CPU
    index: int = 0  # the CUDA device; 0 for auto and cpu

    def __post_init__(self) -> None:
        if self.kind not in ("auto", "cpu", "cuda"):
            raise DeviceError(f"device kind {self.kind!r} is not one of auto, cpu, cuda")
        if self.index < 0 or (self.index and self.kind != "cuda"):
            raise DeviceError(f"device index {self.index} is only allowed with cuda (cuda:N, N >= 0)")

    @property
    def is_cuda(self) -> bool:
        return self.kind == "cuda"

    def __str__(self) -> str:
        """The canonical name: ``auto``, ``cpu`` or ``cuda:N``."""
        return f"cuda:{self.index}" if self.is_cuda else self.kind


CPU = Device("cpu")


def parse_device(name: str | Device) -> Device:
    """``auto``, ``cpu``, ``cuda`` or ``cuda:N``, in any case and with surrounding spaces -> :class:`Device`."""
    if isinstance(name, Device):
        return name
    match = PATTERN.fullmatch(str(name).strip().lower())
    if not match or (match[2] is not None and match[1] != "cuda"):
        raise DeviceError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    return Device(match[1], int(match[2] or 0))


def cpu_count() -> int:
    """CPU cores this process may use (its affinity mask, not the machine's total)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1
