"""The one base class of the project's errors.

Every error the project raises on purpose derives from :class:`CarvanaError`, and its message names
the file or option at fault and the fix. Callers that must survive any of them (the runner around a
photo, a command around its work) catch this one type; the commands turn it into exit status 2.
"""

from __future__ import annotations


class CarvanaError(Exception):
    """An error of this project, with a message that says what to fix."""
