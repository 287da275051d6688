"""batch.runs.storage: local folders and s3:// locations behave alike (against a real S3-compatible server on 127.0.0.1)."""

from __future__ import annotations

import importlib.util
import pickle
from pathlib import Path, PurePosixPath

import pytest

from batch.runs.storage import LocalFolder, ObjectStore, StorageError, is_uri, open_location

TREE = {
    "a.jpg": b"\xff\xd8\xff a",
    "B.JPEG": b"\xff\xd8\xff b",
    "day1/c.png": b"\x89PNG c",
    "day1/deep/d.jpeg": b"\xff\xd8\xff d",
    "notes.txt": b"not an image",
    ".hidden.jpg": b"\xff\xd8\xff hidden",
    ".cache/e.jpg": b"\xff\xd8\xff hidden folder",
    "masks/old.png": b"\x89PNG an output folder inside the input",
}


def fill(store, tree: dict[str, bytes] = TREE) -> None:
    for name, data in tree.items():
        store.write(PurePosixPath(name), data)


def test_locations_are_parsed_by_scheme(tmp_path: Path):
    assert isinstance(open_location(tmp_path), LocalFolder)
    assert open_location(f"file://{tmp_path}").root == tmp_path
    store = open_location("s3://bucket/some/prefix/")
    assert isinstance(store, ObjectStore)
    assert (store.bucket, store.uri) == ("bucket", "s3://bucket/some/prefix")
    assert store.locate(PurePosixPath("a/b.png")) == "s3://bucket/some/prefix/a/b.png"
    assert is_uri("s3://b/p") and not is_uri(tmp_path) and not is_uri(f"file://{tmp_path}")
    with pytest.raises(StorageError, match="names no bucket"):
        open_location("s3://")


def test_a_bucket_lists_like_a_local_folder(tmp_path: Path, s3_bucket: str):
    local, bucket = open_location(tmp_path / "in"), open_location(f"{s3_bucket}/in")
    for store in (local, bucket):
        fill(store)
    outputs = {"local": open_location(tmp_path / "in" / "masks"), "bucket": open_location(f"{s3_bucket}/in/masks")}
    expected = [PurePosixPath(p) for p in ("B.JPEG", "a.jpg", "day1/c.png", "day1/deep/d.jpeg")]

    assert local.find_images(exclude=outputs["local"]).images == expected
    assert bucket.find_images(exclude=outputs["bucket"]).images == expected
    assert PurePosixPath("masks/old.png") in bucket.find_images().images  # only the output location is left out


def test_a_bucket_reads_writes_and_finds_existing_files(s3_bucket: str):
    store = open_location(f"{s3_bucket}/out")
    fill(store, {"x/y.png": b"mask", ".rle/x/y.jpg.rle": b"1 2"})
    store.write(PurePosixPath("x/y.png"), b"new mask")  # a rewrite replaces the object whole

    assert store.read(PurePosixPath("x/y.png")) == b"new mask"
    wanted = [PurePosixPath(p) for p in ("x/y.png", ".rle/x/y.jpg.rle", "x/z.png")]
    assert store.existing(wanted) == set(wanted[:2])  # hidden outputs (the RLE files) count for resume
    assert store.read_many(wanted) == {wanted[0]: b"new mask", wanted[1]: b"1 2"}
    with pytest.raises(FileNotFoundError):
        store.read(PurePosixPath("x/z.png"))


def test_in_and_out_locations_know_when_one_holds_the_other(tmp_path: Path, s3_bucket: str):
    assert open_location(f"{s3_bucket}/in/masks").relative_to(open_location(f"{s3_bucket}/in")) == PurePosixPath("masks")
    assert open_location(f"{s3_bucket}/in").relative_to(open_location(f"{s3_bucket}/in")) == PurePosixPath(".")
    assert open_location(f"{s3_bucket}/input").relative_to(open_location(f"{s3_bucket}/in")) is None
    assert open_location(tmp_path / "a" / "b").relative_to(open_location(tmp_path / "a")) == PurePosixPath("b")
    assert open_location(tmp_path).relative_to(open_location(f"{s3_bucket}/in")) is None


def test_a_missing_bucket_says_to_create_it(s3_bucket: str):
    store = open_location("s3://no-such-bucket/photos")
    with pytest.raises(StorageError, match="bucket 'no-such-bucket' does not exist at http://127.0.0.1:.*create it"):
        store.check(writable=False)
    with pytest.raises(StorageError, match="does not exist"):
        store.find_images()


def test_missing_credentials_say_what_to_set(s3_bucket: str, monkeypatch, tmp_path: Path):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    with pytest.raises(StorageError, match="no credentials for s3://.*set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY"):
        open_location(f"{s3_bucket}/out").check(writable=True)


def test_a_location_is_checked_for_writing(s3_bucket: str, tmp_path: Path):
    out = open_location(f"{s3_bucket}/out")
    out.check(writable=True)
    assert out.list_files(hidden=True) == []  # the probe object is gone
    open_location(tmp_path / "new").check(writable=True)
    assert not (tmp_path / "new").exists()  # checking creates nothing
    blocked = tmp_path / "file"
    blocked.write_text("a file where the folder should be")
    with pytest.raises(StorageError, match="cannot create output folder .*a file has that name"):
        open_location(blocked).check(writable=True)


def test_schemes_without_their_filesystem_say_what_to_install():
    with pytest.raises(StorageError, match="not a storage scheme fsspec knows"):
        _ = open_location("nosuchscheme://bucket/x").fs
    if importlib.util.find_spec("gcsfs") is not None:
        pytest.skip("gcsfs is installed here")
    with pytest.raises(StorageError, match="not installed: .*gcsfs"):
        _ = open_location("gs://bucket/x").fs


def test_object_stores_pickle_without_their_connections(s3_bucket: str):
    store = open_location(f"{s3_bucket}/out")
    store.write(PurePosixPath("a.png"), b"1")
    copy = pickle.loads(pickle.dumps(store))
    assert copy._fs is None
    assert copy.read(PurePosixPath("a.png")) == b"1"


def test_files_read_like_paths(tmp_path: Path, s3_bucket: str):
    """What batch.inference.decode.Item reads: ``read_bytes()``, and ``str()`` naming the file as the user would."""
    for store in (open_location(tmp_path), open_location(s3_bucket)):
        store.write(PurePosixPath("a/b.jpg"), b"photo")
        file = store.file(PurePosixPath("a/b.jpg"))
        assert (file.read_bytes(), str(file)) == (b"photo", store.locate(PurePosixPath("a/b.jpg")))
        with pytest.raises(FileNotFoundError):
            store.file(PurePosixPath("a/none.jpg")).read_bytes()


def test_memory_locations_list_read_and_write_like_the_others(tmp_path: Path, tiny_onnx: Path):
    """memory:// (fsspec's in-process store, documented as supported) lists its keys, and a whole run goes through it."""
    import fsspec
    from conftest import write_photo

    import batch

    store = open_location("memory://unet-batch-test/in")
    fill(store)
    expected = [PurePosixPath(p) for p in ("B.JPEG", "a.jpg", "day1/c.png", "day1/deep/d.jpeg", "masks/old.png")]
    try:
        assert store.find_images().images == expected
        for name in ("p.jpg", "sub/q.png"):
            write_photo(tmp_path / name, (48, 64), seed=len(name))
            store.write(PurePosixPath("photos", name), (tmp_path / name).read_bytes())
        report = batch.segment(
            "memory://unet-batch-test/in/photos", "memory://unet-batch-test/out", model=tiny_onnx, progress=False
        )
        out = open_location("memory://unet-batch-test/out")
        assert (report.processed, report.failed) == (2, [])
        assert {PurePosixPath("p.png"), PurePosixPath("sub/q.png")} <= set(out.list_files())
    finally:
        fsspec.filesystem("memory").rm("/unet-batch-test", recursive=True)
