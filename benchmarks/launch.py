"""``python -m benchmarks.launch REPORT COMMAND...``: run COMMAND, then write its peak RSS to REPORT.

Linux hands a process's high-water RSS at exec to the program it becomes, so a child started
straight from the benchmark (hundreds of MiB: models, torch) would report at least that much. This
small interpreter starts the command instead: the command's ``ru_maxrss`` is then its own (or this
launcher's ~10 MiB, whichever is larger). REPORT gets ``{"returncode": ..., "ru_maxrss": ...}``.
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
from pathlib import Path


def main(argv: list[str]) -> int:
    report, command = Path(argv[0]), argv[1:]
    returncode = subprocess.run(command, check=False).returncode
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    report.write_text(json.dumps({"returncode": returncode, "ru_maxrss": usage.ru_maxrss}))
    return returncode


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
