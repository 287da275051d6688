"""A photo that kills the process (a decoder crash, the OOM killer) is found through the crash journal in OUTPUT_DIR
and failed, instead of killing every rerun (issue 23 item 11 for the local engine; the Ray engine shares it)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from conftest import write_photo

from batch.runs.journal import CRASHED, CrashJournal
from batch.runs.storage import LocalFolder

REPO = Path(__file__).resolve().parents[1]


def test_the_journal_suspects_a_batch_then_names_its_photo(tmp_path: Path):
    output = LocalFolder(tmp_path)
    journal = CrashJournal(output, "local")
    with journal.running(["a.jpg", "b.jpg"], one_by_one=False):
        assert journal.path.parts[0] == ".unet-batch" and (tmp_path / journal.path).exists()
    assert not (tmp_path / ".unet-batch" / "journal" / "local.json").exists()  # a batch that ended leaves nothing

    journal.write({"in_flight": ["a.jpg", "b.jpg"], "one_by_one": False})  # what running() leaves when the process dies
    rerun = CrashJournal(output, "local")
    assert rerun.suspected(["b.jpg", "c.jpg"]) and not rerun.poisoned
    rerun.write({"in_flight": ["b.jpg"], "one_by_one": True})  # and dies again with b.jpg alone
    again = CrashJournal(output, "local")
    assert again.poisoned == {"b.jpg"} and again.suspects == {"a.jpg"}
    with again.running(["a.jpg"], one_by_one=True):
        pass
    assert CrashJournal(output, "local").suspects == set()  # done alone: no longer suspected

    (tmp_path / ".unet-batch" / "journal" / "local.json").write_text('{"in_flight": ["a.j')  # cut short by the crash
    assert not CrashJournal(output, "local").suspects


CRASHING_RUN = """
import os, sys
from batch.inference import decode
real = decode.load_resized_rgb
def load(source, size):
    if source.getvalue().endswith(b"POISON"):
        os._exit(139)  # as a segfault in the decoder would: no exception, no report
    return real(source, size)
decode.load_resized_rgb = load
from batch.cli import main
main(sys.argv[1:])
"""


def test_a_photo_that_kills_the_process_is_failed_by_the_second_rerun(tmp_path: Path, tiny_onnx: Path):
    photos, out = tmp_path / "in", tmp_path / "out"
    for i in range(12):
        write_photo(photos / f"p{i:02d}.jpg", (48, 64), seed=i)
    poison = photos / "p05.jpg"
    poison.write_bytes(poison.read_bytes() + b"POISON")  # still a valid JPEG: bytes after its end are ignored
    command = [sys.executable, "-c", CRASHING_RUN, "segment", str(photos), str(out), "--model", str(tiny_onnx),
               "--no-progress", "--batch-size", "4"]  # fmt: skip
    codes = [subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode for _ in range(3)]
    assert codes == [139, 139, 1]  # the run, the rerun that tries the suspects one by one, the rerun that skips it
    report = json.loads((out / "report.json").read_text())
    assert [(f["path"], f["reason"]) for f in report["failed"]] == [(str(poison), CRASHED)]
    assert sorted(p.name for p in out.glob("*.png")) == [f"p{i:02d}.png" for i in range(12) if i != 5]
    assert subprocess.run(command, cwd=REPO, capture_output=True, timeout=120).returncode == 1  # stays skipped
