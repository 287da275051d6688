"""Names from outside (file names, object keys) made into output paths only when they are safe.

A name is used as it is or not at all: it must be a relative path whose parts are plain names (no
empty part, no ``.`` or ``..``, nothing absolute), valid UTF-8 without control characters, and short
enough for its outputs. Anything else would write outside OUTPUT_DIR (an object key ``in//tmp/x.jpg``
lists as ``/tmp/x.jpg``), could not be read back under the name it was listed by (``a//b.jpg`` and
``./b.jpg`` normalise to other keys), would break the report or submission.csv (a name that is not
UTF-8) or the log (a newline). Such a photo is failed with the reason, never renamed: two different
keys must never be written to one output.
"""

from __future__ import annotations

import re
from pathlib import PurePosixPath

from batch.core.errors import CarvanaError

NAME_MAX = 255  # bytes of one file name on Linux filesystems (ext4, xfs, btrfs, NFS)
KEY_MAX = 1024  # bytes of an S3 object key
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")  # control characters but the tab, which names may hold


class UnsafeName(CarvanaError):
    """A name that cannot be used to build output paths; the message says why and what to rename."""


def safe_relative(name: str) -> PurePosixPath:
    """``name`` ("a/b.jpg", relative to the input location) as a path, exactly as given; :class:`UnsafeName` otherwise."""
    if CONTROL.search(name):
        raise UnsafeName("its name holds a control character (a newline?): rename it")
    try:
        name.encode("utf-8")
    except UnicodeEncodeError:
        raise UnsafeName("its name is not valid UTF-8: rename it") from None
    parts = name.split("/")
    if name.startswith("/") or "" in parts:
        raise UnsafeName("its name has an empty part (a leading, doubled or trailing '/'): it would not stay inside OUTPUT_DIR")
    if "." in parts or ".." in parts:
        raise UnsafeName("its name has a '.' or '..' part: it would not stay inside OUTPUT_DIR")
    return PurePosixPath(name)


def check_output_names(paths: list[PurePosixPath], store_key_prefix: int | None) -> None:
    """:class:`UnsafeName` when an output path is too long for the filesystem (or, ``store_key_prefix`` bytes
    before it, for an object key)."""
    for path in paths:
        longest = max(len(part.encode("utf-8")) for part in path.parts)
        if longest > NAME_MAX:
            raise UnsafeName(
                f"its outputs would have a {longest}-byte file name, more than the {NAME_MAX} bytes a filesystem takes: "
                "shorten its name"
            )
        if store_key_prefix is not None and store_key_prefix + len(path.as_posix().encode("utf-8")) > KEY_MAX:
            raise UnsafeName(f"its outputs' object keys would be longer than {KEY_MAX} bytes: shorten its name or path")


def shown(name: str) -> str:
    """``name`` as one printable line: control characters and undecodable bytes escaped (log lines, messages)."""
    text = name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")  # undecodable bytes as \xNN
    return CONTROL.sub(lambda m: f"\\x{ord(m.group()):02x}", text)
