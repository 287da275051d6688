"""Stops the local Ray a run started when the run's process dies without stopping it (SIGKILL, the out-of-memory killer).

Ray ties its GCS server and raylet to the process that started them, but not their children: the
dashboard and runtime-env agents, and the workers, outlive a killed driver (the agents for good).
This reaper runs beside the driver as ``python -m batch.runs._ray_reaper``, in a session of its own so
that what stops the driver does not stop it. The driver writes to its standard input the Ray session's
folder and, as they appear, its processes (``PID STARTTIME`` lines, the start time telling a process
from a later one given the same number). When that input ends (the driver closed it after stopping Ray,
or died), the reaper kills the processes still there and removes the session's folder, then exits.

Standard library only, and Linux only (it reads ``/proc``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

PROC = Path("/proc")


def supported() -> bool:
    return PROC.is_dir()


def watch(reaper_input: TextIO, session: str, exclude: int) -> None:
    """Tell the reaper the session's folder to remove ("": none) and the processes this one has started so far (all
    of Ray's, since Ray started them under this process), but the reaper itself."""
    if session:
        reaper_input.write(f"SESSION {session}\n")
    for pid, started in descendants(os.getpid()):
        if pid != exclude:
            reaper_input.write(f"{pid} {started}\n")
    reaper_input.flush()


def descendants(root: int) -> list[tuple[int, str]]:
    """(pid, start time) of every process below ``root``."""
    children: dict[int, list[tuple[int, str]]] = {}
    for pid, parent, started in _processes():
        children.setdefault(parent, []).append((pid, started))
    found, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            found.append(child)
            stack.append(child[0])
    return found


def _processes() -> Iterable[tuple[int, int, str]]:
    for entry in PROC.iterdir():
        if entry.name.isdigit():
            stat = _stat(int(entry.name))
            if stat is not None:
                yield int(entry.name), int(stat[1]), stat[19]


def _stat(pid: int) -> list[str] | None:
    """The fields of ``/proc/PID/stat`` after the command's name (state, ppid, ...; start time is index 19)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2 :].split()


def reap(processes: dict[int, str], session: str | None) -> None:
    """Kill those of ``processes`` still running (the same process: same start time), then remove the session's folder."""
    for pid, started in processes.items():
        stat = _stat(pid)
        if stat is not None and stat[19] == started and stat[0] != "Z":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, signal.SIGKILL)  # Ray's agents ignore SIGTERM once their raylet is gone
    if session:
        remove_folder(session)


def remove_folder(folder: str | Path) -> None:
    """Remove ``folder`` (a Ray session's), again while processes that were stopping write their last lines there,
    and Ray's ``session_latest`` link beside it when the link points at it (it would dangle)."""
    for _ in range(10):
        shutil.rmtree(folder, ignore_errors=True)
        time.sleep(0.2)  # a process still stopping may write its last lines after the removal
        if not os.path.exists(folder):
            break
    latest = Path(folder).parent / "session_latest"
    with contextlib.suppress(OSError):
        if os.readlink(latest) == str(folder):
            latest.unlink()


def main(stream: TextIO) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a Ctrl-C meant for the run: the reaper's work comes after it
    processes: dict[int, str] = {}
    session = None
    for line in stream:
        word, _, rest = line.strip().partition(" ")
        if word == "SESSION":
            session = rest
        elif word.isdigit():
            processes[int(word)] = rest
    reap(processes, session)


if __name__ == "__main__":
    main(sys.stdin)
