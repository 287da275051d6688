"""Hostile names, odd files and failing disks (issue 23): nothing is written outside OUTPUT_DIR, photos are
masked as viewers show them, every skipped entry is reported, reads are bounded, and every run ends with
a report and the documented exit status, never a traceback."""

from __future__ import annotations

import json
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import make_tiny_onnx, write_photo
from PIL import Image

import batch
from batch.cli import main
from batch.core.images import load_resized_rgb
from batch.core.masks import dice, read_mask
from batch.inference.decode import dali_available

REPO = Path(__file__).resolve().parents[1]
SIZE = (48, 64)


def segment(*args: str, model: Path) -> tuple[int, str]:
    result = CliRunner().invoke(main, ["segment", *args, "--model", str(model), "--no-progress"])
    assert "Traceback" not in result.output, result.output
    return result.exit_code, result.output


def report_of(out: Path) -> dict:
    return json.loads((out / "report.json").read_text())


def failed_reasons(report: dict) -> dict[str, str]:
    return {entry["path"]: entry["reason"] for entry in report["failed"]}


def files_under(root: Path) -> set[str]:
    """The files under ``root``, the runs' own records (``.unet-batch/``) aside."""
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file() and ".unet-batch" not in p.parts}


# -- 1. object keys and file names are untrusted ------------------------------------------------------------


def test_object_keys_never_write_outside_the_output_folder(tmp_path: Path, s3_bucket: str, tiny_onnx: Path):
    """Keys that would escape OUTPUT_DIR (``in//abs/path``, ``..``) or not read back (``a//b``, ``./d``): failed, reported."""
    from batch.runs.storage import open_location

    store = open_location(f"{s3_bucket}/in")
    write_photo(tmp_path / "good.jpg", SIZE, seed=1)
    photo = (tmp_path / "good.jpg").read_bytes()
    victim = tmp_path / "victim"
    hostile = [f"/{victim}/logo.jpg", "../escape.jpg", "a/../../up.jpg", "a//b.jpg", "./d.jpg", "e/./f.jpg", "g/"]
    for key in ["good.jpg", *hostile]:
        store.fs.pipe_file(f"{store.root}/{key}", photo)
    out = tmp_path / "out"

    code, output = segment(f"{s3_bucket}/in", str(out), "--format", "png", "--format", "cutout", model=tiny_onnx)

    assert code == 1, output
    assert not victim.exists() and not (tmp_path / "escape.png").exists() and not (tmp_path / "up.png").exists()
    assert files_under(out) == {"good.png", "good_cutout.png", "report.json", "confidence.csv"}
    reasons = failed_reasons(report_of(out))
    assert len(reasons) == len(hostile) - 1  # "g/" has no photo suffix: not an input at all
    assert all("OUTPUT_DIR" in reason for reason in reasons.values()), reasons


def test_names_that_cannot_be_used_are_failed_and_the_rest_is_done(tmp_path: Path, tiny_onnx: Path):
    """Not UTF-8, a newline, and a name too long for its outputs: each failed with the reason; the run and its
    submission.csv still end; a legal 230-byte name works (temporary names no longer lengthen it)."""
    photos = tmp_path / "in"
    write_photo(photos / "ok.jpg", SIZE, seed=1)
    data = (photos / "ok.jpg").read_bytes()
    long_ok = "l" * 226 + ".jpg"  # 230 bytes
    too_long = "t" * 247 + ".jpg"  # 251 bytes: "_cutout.png" makes it 258
    for name in (long_ok, too_long, "line\nbreak.jpg", "tab\there.jpg"):
        (photos / name).write_bytes(data)
    os.close(os.open(os.fsencode(photos) + b"/caf\xe9.jpg", os.O_CREAT | os.O_WRONLY))  # Latin-1 bytes, not UTF-8
    with open(os.fsencode(photos) + b"/caf\xe9.jpg", "wb") as f:
        f.write(data)
    out = tmp_path / "out"

    code, output = segment(str(photos), str(out), "--format", "rle", "--format", "cutout", model=tiny_onnx)

    assert code == 1 and "\nbreak" not in output  # the newline is shown escaped, never as a line of its own
    reasons = failed_reasons(report_of(out))
    assert sorted(reasons) == sorted(
        [str(photos / "caf\\xe9.jpg"), str(photos / "line\\x0abreak.jpg"), str(photos / too_long)]
    ), reasons
    assert "UTF-8" in reasons[str(photos / "caf\\xe9.jpg")] and "control character" in reasons[str(photos / "line\\x0abreak.jpg")]
    assert "shorten its name" in reasons[str(photos / too_long)]
    rows = (out / "submission.csv").read_text().splitlines()
    assert sorted(row.split(",")[0] for row in rows[1:]) == sorted([long_ok, "ok.jpg", "tab\there.jpg"])
    assert (out / f"{long_ok[:-4]}_cutout.png").is_file()


# -- 2. EXIF orientation --------------------------------------------------------------------------------------


def sideways_pair(folder: Path) -> tuple[Path, Path]:
    """The same car photo stored upright, and stored rotated with EXIF orientation 6 (as a phone stores it)."""
    write_photo(folder / "upright.jpg", (64, 96), seed=3)
    upright = Image.open(folder / "upright.jpg")
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 clockwise to show": the pixels are stored turned the other way
    upright.transpose(Image.Transpose.ROTATE_90).save(folder / "phone.jpg", quality=95, exif=exif.tobytes())
    return folder / "upright.jpg", folder / "phone.jpg"


@pytest.mark.parametrize("decoder", ["pillow", pytest.param("dali", marks=pytest.mark.dali)])
def test_a_sideways_phone_photo_is_masked_as_viewers_show_it(tmp_path: Path, tiny_onnx: Path, decoder: str):
    if decoder == "dali" and not dali_available():
        pytest.skip("NVIDIA DALI is not installed")
    upright, phone = sideways_pair(tmp_path / "in")
    out = tmp_path / "out"
    code, output = segment(str(tmp_path / "in"), str(out), "--decoder", decoder, "--format", "png", "--format", "cutout",
                           model=tiny_onnx)  # fmt: skip
    assert code == 0, output
    reference, shown = read_mask(out / "upright.png") > 0, read_mask(out / "phone.png") > 0
    assert shown.shape == reference.shape == (64, 96)
    assert dice(shown, reference) > 0.97  # the same car, only JPEG noise apart
    assert Image.open(out / "phone_cutout.png").size == (96, 64)
    with batch.Segmenter(tiny_onnx, device="cpu", decoder=decoder) as segmenter:
        assert segmenter(phone).shape == (64, 96)
    fitted = load_resized_rgb(phone, (32, 48))
    assert fitted.pixels.shape == (32, 48, 3) and fitted.shown == (64, 96) and fitted.content == (32, 48)


# -- 3. and 5. reads are bounded ------------------------------------------------------------------------------


def test_a_fifo_in_a_photos_place_fails_that_photo_without_blocking(tmp_path: Path, tiny_onnx: Path):
    """A file replaced by a FIFO after the listing is opened without blocking and refused by its type."""
    write_photo(tmp_path / "good.jpg", SIZE, seed=1)
    os.mkfifo(tmp_path / "pipe.jpg")
    script = textwrap.dedent(f"""
        import batch
        with batch.Segmenter(r"{tiny_onnx}", device="cpu") as s:
            results = s([r"{tmp_path}/pipe.jpg", r"{tmp_path}/good.jpg"], errors="return")
        print(type(results[0]).__name__, results[0], results[1].shape)
    """)
    done = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("ImageError") and "FIFO" in done.stdout and "(48, 64)" in done.stdout


HANGING_RUN = """
import signal, sys, time
signal.signal(signal.SIGINT, signal.default_int_handler)  # Ctrl-C as a terminal delivers it: a job a script starts
# in the background inherits SIGINT ignored (POSIX), and Python then leaves it ignored
from batch.inference import decode
real = decode.read_regular_file
def read(path, max_bytes):
    if path.name == "stuck.jpg":
        time.sleep(3600)  # a read on a dead NFS server
    return real(path, max_bytes)
decode.read_regular_file = read
from batch.cli import main
main(sys.argv[1:])
"""


def start_hanging_run(tmp_path: Path, model: Path, *options: str) -> tuple[subprocess.Popen, Path]:
    for i in range(6):
        write_photo(tmp_path / "in" / f"p{i}.jpg", SIZE, seed=i)
    (tmp_path / "in" / "stuck.jpg").write_bytes((tmp_path / "in" / "p0.jpg").read_bytes())
    out = tmp_path / "out"
    command = [sys.executable, "-X", "faulthandler", "-c", HANGING_RUN, "segment", str(tmp_path / "in"), str(out),
               "--model", str(model), "--no-progress", "--batch-size", "2", *options]  # fmt: skip
    return subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), out


def test_a_read_that_never_returns_fails_its_photo_after_the_timeout(tmp_path: Path, tiny_onnx: Path):
    process, out = start_hanging_run(tmp_path, tiny_onnx, "--read-timeout", "2")
    _, stderr = process.communicate(timeout=90)
    assert process.returncode == 1, stderr
    reasons = failed_reasons(report_of(out))
    assert (
        list(reasons) == [str(tmp_path / "in" / "stuck.jpg")]
        and "did not finish within 2 s" in reasons[str(tmp_path / "in" / "stuck.jpg")]
    )
    assert report_of(out)["processed"] == 6 and "Traceback" not in stderr


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stuck_read_does_not_keep_a_signal_from_stopping_the_run(tmp_path: Path, tiny_onnx: Path, sig, code):
    process, out = start_hanging_run(tmp_path, tiny_onnx, "--read-timeout", "3600")
    deadline = time.monotonic() + 60
    while not list(out.glob("p*.png")) and time.monotonic() < deadline:
        time.sleep(0.1)
    time.sleep(1)
    started = time.monotonic()
    process.send_signal(sig)
    try:
        _, stderr = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.send_signal(signal.SIGABRT)  # faulthandler prints every thread's stack: where the run hung
        pytest.fail(f"the run did not stop within 30 s of signal {sig.name}:\n{process.communicate(timeout=30)[1]}")
    assert process.returncode == code, stderr
    assert time.monotonic() - started < 15 and report_of(out)["interrupted"] is True


def test_a_huge_file_and_a_memory_error_cost_only_their_photo(tmp_path: Path, tiny_onnx: Path, monkeypatch):
    from batch.inference import decode

    write_photo(tmp_path / "in" / "good.jpg", SIZE, seed=1)
    write_photo(tmp_path / "in" / "greedy.jpg", SIZE, seed=2)
    with open(tmp_path / "in" / "huge.jpg", "wb") as f:  # sparse: 600 MiB on paper, nothing on disk
        f.write(b"\xff\xd8\xff")
        f.truncate(600 * 2**20)
    real = decode.load_resized_rgb

    def greedy(source, size):
        if b"greedy" in getattr(source, "name", b"") or source.getvalue() == (tmp_path / "in" / "greedy.jpg").read_bytes():
            raise MemoryError
        return real(source, size)

    monkeypatch.setattr(decode, "load_resized_rgb", greedy)
    out = tmp_path / "out"
    code, output = segment(str(tmp_path / "in"), str(out), model=tiny_onnx)
    assert code == 1, output
    reasons = failed_reasons(report_of(out))
    assert "MiB limit" in reasons[str(tmp_path / "in" / "huge.jpg")]
    assert "not enough memory" in reasons[str(tmp_path / "in" / "greedy.jpg")]
    assert (out / "good.png").is_file()


# -- 4. every skipped entry is reported -------------------------------------------------------------------------


def test_entries_that_are_not_photo_files_are_reported(tmp_path: Path, tiny_onnx: Path, monkeypatch):
    photos = tmp_path / "in"
    write_photo(photos / "good.jpg", SIZE, seed=1)
    os.mkfifo(photos / "fifo.jpg")
    listener = socket.socket(socket.AF_UNIX)
    listener.bind(str(photos / "socket.png"))
    (photos / "folder.jpg").mkdir()
    (photos / "zero.jpg").symlink_to("/dev/zero")
    (photos / "loop.jpg").symlink_to(photos / "loop.jpg")
    (photos / "dangling.jpg").symlink_to(photos / "gone.jpg")
    (photos / "locked").mkdir()
    write_photo(photos / "locked" / "hidden_from_us.jpg", SIZE, seed=2)
    real_scandir = os.scandir

    def scandir(path="."):  # as root, chmod 000 does not stop reading: refuse the listing the way the kernel would
        if Path(path) == photos / "locked":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    out = tmp_path / "out"
    try:
        code, output = segment(str(photos), str(out), model=tiny_onnx)
    finally:
        listener.close()
    assert code == 1, output
    reasons = failed_reasons(report_of(out))
    expected = {"fifo.jpg": "FIFO", "socket.png": "socket", "folder.jpg": "folder", "zero.jpg": "character device",
                "loop.jpg": "loop", "dangling.jpg": "link to nothing", "locked": "cannot list this folder"}  # fmt: skip
    assert {Path(path).name: reason for path, reason in reasons.items()}.keys() == expected.keys()
    for path, reason in reasons.items():
        assert expected[Path(path).name] in reason, (path, reason)
    assert (out / "good.png").is_file() and report_of(out)["processed"] == 1


# -- 7. OUTPUT_DIR and INPUT_DIR compared as locations ------------------------------------------------------------


def test_output_locations_are_compared_as_places_not_as_text(tmp_path: Path, tiny_onnx: Path, s3_bucket: str):
    write_photo(tmp_path / "in" / "a.jpg", SIZE, seed=1)
    (tmp_path / "alias").symlink_to(tmp_path / "in")
    code, output = segment(str(tmp_path / "in"), str(tmp_path / "alias"), model=tiny_onnx)
    assert code == 2 and "is the input folder" in output, output
    assert files_under(tmp_path / "in") == {"a.jpg"}
    for _ in range(2):  # a folder inside the input, named through the alias: its masks are never taken for photos
        code, output = segment(str(tmp_path / "in"), str(tmp_path / "alias" / "masks"), model=tiny_onnx)
        assert code == 0, output
    assert files_under(tmp_path / "in") == {"a.jpg", "masks/a.png", "masks/report.json", "masks/confidence.csv"}
    code, output = segment(f"{s3_bucket}/in", f"{s3_bucket.replace('s3://', 's3a://')}/in", model=tiny_onnx)
    assert code == 2, output
    code, output = segment(str(tmp_path / "in"), "s3://", model=tiny_onnx)
    assert code == 2 and "names no bucket" in output and not Path("s3:").exists()
    code, output = segment(str(tmp_path / "in"), f"file://{tmp_path}/viafile", model=tiny_onnx)
    assert code == 0 and (tmp_path / "viafile" / "a.png").is_file() and not Path("file:").exists()


def test_a_bind_mount_of_the_input_is_the_input(tmp_path: Path, tiny_onnx: Path):
    write_photo(tmp_path / "in" / "a.jpg", SIZE, seed=1)
    (tmp_path / "mnt").mkdir()
    if subprocess.run(["mount", "--bind", str(tmp_path / "in"), str(tmp_path / "mnt")], capture_output=True).returncode:
        pytest.skip("bind mounts are not permitted here")
    try:
        code, output = segment(str(tmp_path / "in"), str(tmp_path / "mnt"), model=tiny_onnx)
    finally:
        subprocess.run(["umount", str(tmp_path / "mnt")], check=False)
    assert code == 2 and "is the input folder" in output, output
    assert files_under(tmp_path / "in") == {"a.jpg"}


# -- 8. the report ------------------------------------------------------------------------------------------------


def test_a_report_path_that_cannot_be_used_is_refused_before_any_work(tmp_path: Path, tiny_onnx: Path):
    write_photo(tmp_path / "in" / "a.jpg", SIZE, seed=1)
    before = (tmp_path / "in" / "a.jpg").read_bytes()
    (tmp_path / "file").write_text("a file, not a folder")
    for report in (tmp_path / "in" / "a.jpg", tmp_path / "in" / "r.json", tmp_path / "file" / "r.json"):
        code, output = segment(str(tmp_path / "in"), str(tmp_path / "out"), "--report", str(report), model=tiny_onnx)
        assert code == 2 and "--report" in output, output
    assert (tmp_path / "in" / "a.jpg").read_bytes() == before and not (tmp_path / "out").exists()


def test_a_report_that_cannot_be_written_at_the_end_keeps_the_failures(tmp_path: Path, tiny_onnx: Path, monkeypatch):
    from batch.runs import run as runs

    write_photo(tmp_path / "in" / "a.jpg", SIZE, seed=1)
    (tmp_path / "in" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")

    def full_disk(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(runs, "write_report", full_disk)
    code, output = segment(str(tmp_path / "in"), str(tmp_path / "out"), model=tiny_onnx)
    assert code == 1 and "No space left on device" in output and "broken.jpg" in output, output


# -- 9. what a model returns --------------------------------------------------------------------------------------


def test_scores_that_are_not_numbers_fail_their_photos_and_a_rerun_retries_them(tmp_path: Path):
    import onnx
    from onnx import numpy_helper

    model = onnx.load(make_tiny_onnx(tmp_path / "nan.onnx"))
    for tensor in model.graph.initializer:
        if tensor.name == "b":
            tensor.CopyFrom(numpy_helper.from_array(np.array([math.nan], np.float32), "b"))
    onnx.save(model, tmp_path / "nan.onnx")
    write_photo(tmp_path / "in" / "a.jpg", SIZE, seed=1)
    code, output = segment(str(tmp_path / "in"), str(tmp_path / "out"), model=tmp_path / "nan.onnx")
    assert code == 1 and "NaN" in output, output
    assert not (tmp_path / "out" / "a.png").exists()  # nothing a rerun would take for done


# -- 12. reasons say what to do, and never show a file's content -------------------------------------------------


def test_reasons_say_what_to_do_and_never_show_a_files_bytes(tmp_path: Path, tiny_onnx: Path):
    photos = tmp_path / "in"
    write_photo(photos / "good.jpg", SIZE, seed=1)
    (tmp_path / "secret.txt").write_bytes(b"AKIAIOSFODNN7EXAMPLE password=hunter2")
    (photos / "secret.jpg").symlink_to(tmp_path / "secret.txt")
    data = (photos / "good.jpg").read_bytes()
    (photos / "cut.jpg").write_bytes(data[: len(data) // 2])
    code, output = segment(str(photos), str(tmp_path / "out"), model=tiny_onnx)
    assert code == 1
    report = (tmp_path / "out" / "report.json").read_text()
    assert "AKIA" not in report and "41 4b 49 41" not in report and "hunter2" not in report
    reasons = failed_reasons(json.loads(report))
    assert "convert it to JPEG or PNG" in reasons[str(photos / "secret.jpg")]
    assert "BytesIO" not in report and "copy it again" in reasons[str(photos / "cut.jpg")], reasons


def test_pillow_messages_never_show_an_in_memory_file_object():
    import io

    from PIL import UnidentifiedImageError

    from batch.core.images import pillow_message

    with pytest.raises(UnidentifiedImageError) as raised:
        Image.open(io.BytesIO(b"not an image"))
    assert "BytesIO" in str(raised.value) and pillow_message(raised.value) == "cannot identify image file"
