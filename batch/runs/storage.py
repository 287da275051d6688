"""Where photos come from and outputs go: a local folder or an object-storage URI, one interface.

- :class:`LocalFolder`: a folder on this machine (or a shared mount every node sees). Listing (:func:`walk_images`):
  ``.jpg``/``.jpeg``/``.png`` in any letter case, recursively, sorted; hidden files and folders (names
  starting with ``.``) and the output folder, when it lies inside, are not read; links to files are
  followed, links to folders are not (no cycles); files are written by :func:`batch.core.files.write_atomic`
  (temporary name + rename).
- :class:`ObjectStore`: ``s3://bucket/prefix`` and any other fsspec filesystem (``gs://``, ``az://``,
  ``memory://``, ...; each needs its package: s3fs for S3). Listing applies the same rules to the
  keys under the prefix (image suffixes in any case, nothing hidden, sorted by path). Writes are one
  ``PutObject`` each (s3fs ``pipe_file`` below 100 MB): S3 makes an object visible under its key only
  once its upload is complete, so an interrupted write leaves the previous object or none, never a
  part of one. Nothing is ever written with a streaming (open/write/close) upload, which would
  publish whatever was written when the stream was closed.

S3 is configured by the standard variables, so one command works against AWS, MinIO or any
S3-compatible server: ``AWS_ENDPOINT_URL`` (or ``AWS_ENDPOINT_URL_S3``), ``AWS_REGION`` (or
``AWS_DEFAULT_REGION``), and the credentials of botocore's usual chain (``AWS_ACCESS_KEY_ID`` /
``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE``, an instance role). A location that cannot be used (no
credentials, no such bucket, no filesystem installed for the scheme) is a :class:`StorageError`
whose message says what to set or install.

Locations pickle (Ray ships them to its workers): an :class:`ObjectStore` carries its filesystem's
options, never credentials; each process resolves those from its own environment.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from batch.core.errors import CarvanaError
from batch.core.extras import require
from batch.core.files import file_kind, remove_stale_temporaries, write_atomic
from batch.core.images import is_image_file
from batch.runs.names import UnsafeName, safe_relative, shown

if TYPE_CHECKING:
    from fsspec import AbstractFileSystem

log = logging.getLogger(__name__)

URI = re.compile(r"(?P<scheme>[a-zA-Z][a-zA-Z0-9+.-]*)://(?P<path>.*)")
S3_SCHEMES = ("s3", "s3a")
PROBE_NAME = ".unet-batch-write-check"  # hidden: never listed as an input
CREDENTIALS_HINT = (
    "set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (or AWS_PROFILE, or run where an instance role "
    "gives them), and AWS_ENDPOINT_URL for MinIO or another S3-compatible server"
)


class StorageError(CarvanaError):
    """A location that cannot be used; the message names it and says what to set or install."""


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a local path; ``file://`` is local."""
    match = URI.fullmatch(str(location))
    return match is not None and match["scheme"].lower() != "file"


def as_location(location: str | Path) -> str | Path:
    """A URI as a ``str`` (``Path`` would fold its ``//``), ``file:///abs`` and anything else as a ``Path``.

    A URI keeps its ``scheme://`` whole (``s3://`` alone stays a URI, and is refused for naming no bucket,
    rather than becoming a local folder ``s3:``); only trailing slashes after a bucket are dropped.
    """
    match = URI.fullmatch(str(location))
    if match is None:
        return Path(location)
    if match["scheme"].lower() == "file":
        return Path(match["path"])
    return f"{match['scheme']}://{match['path'].rstrip('/')}"


def open_location(location: str | Path) -> LocalFolder | ObjectStore:
    """The storage at ``location``: a local path, ``file://path``, or an object-storage URI."""
    text = str(location)
    match = URI.fullmatch(text)
    if match is None:
        return LocalFolder(Path(location))
    scheme = match["scheme"].lower()
    if scheme == "file":
        return LocalFolder(Path(match["path"]))
    return ObjectStore(scheme, match["path"].strip("/"), storage_options(scheme))


@dataclass(frozen=True)
class Listing:
    """What a location holds for a run: its photos, and the entries that look like photos but cannot be used."""

    images: list[PurePosixPath]  # relative paths, safe to build outputs from (batch.runs.names), sorted
    skipped: list[tuple[str, str]]  # (the entry as the user would write it, why it is not segmented), sorted


class Storage(ABC):
    """A tree of files addressed by paths relative to its root (``PurePosixPath``)."""

    @property
    @abstractmethod
    def uri(self) -> str:
        """The location as the user would write it (messages, report.json)."""

    @abstractmethod
    def locate(self, rel: PurePosixPath) -> str:
        """Where the file ``rel`` is, as the user would write it (messages, report.json)."""

    @abstractmethod
    def find_images(self, exclude: Storage | None = None) -> Listing:
        """``.jpg``/``.jpeg``/``.png`` files (any letter case), sorted; nothing hidden, nothing inside ``exclude``
        (the output location, when it lies inside this one). Entries with a photo's name that are not usable
        photo files (an unsafe name, a FIFO, a folder, a dangling link, ...) and folders that cannot be listed
        are in ``skipped``, with the reason: a run reports every one of them."""

    @property
    def key_prefix_bytes(self) -> int | None:
        """For an object store, the bytes its keys have before a relative path (their length is limited); None for a folder."""
        return None

    @abstractmethod
    def read(self, rel: PurePosixPath) -> bytes:
        """The file's bytes; an ``OSError`` (``FileNotFoundError``, ``PermissionError``, ...) when it cannot be read."""

    @abstractmethod
    def file(self, rel: PurePosixPath) -> Path | StoredFile:
        """The file ``rel`` as something with ``read_bytes()`` (what :class:`batch.inference.decode.Item` reads a path with)."""

    @abstractmethod
    def write(self, rel: PurePosixPath, data: bytes) -> None:
        """Write the whole file atomically: ``rel`` holds its old content or ``data``, never a part."""

    @abstractmethod
    def remove(self, rel: PurePosixPath) -> None:
        """Delete the file ``rel`` if it exists (the runs' own records, never an output)."""

    @abstractmethod
    def existing(self, rels: Iterable[PurePosixPath]) -> set[PurePosixPath]:
        """Those of ``rels`` that exist (a resumed run skips them)."""

    @abstractmethod
    def check(self, writable: bool) -> None:
        """:class:`StorageError` unless the location can be read, or (``writable``) written; nothing is created."""

    @abstractmethod
    def relative_to(self, other: Storage) -> PurePosixPath | None:
        """This location's path inside ``other`` (``.`` when they are the same), or None when it is not inside."""

    def read_many(self, rels: Iterable[PurePosixPath]) -> dict[PurePosixPath, bytes]:
        """The files of ``rels`` that exist, read (missing ones left out)."""
        found = {}
        for rel in rels:
            try:
                found[rel] = self.read(rel)
            except FileNotFoundError:
                continue
        return found

    @abstractmethod
    def clean(self) -> None:
        """Remove what interrupted runs left behind (temporary files)."""

    def __str__(self) -> str:
        return self.uri


class LocalFolder(Storage):
    """A local folder; also valid on a Ray cluster when it is a mount every node shares."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @property
    def uri(self) -> str:
        return str(self.root)

    def path(self, rel: PurePosixPath) -> Path:
        return self.root.joinpath(*rel.parts)

    def locate(self, rel: PurePosixPath) -> str:
        return str(self.path(rel))

    def find_images(self, exclude: Storage | None = None) -> Listing:
        return walk_images(self.root, exclude=exclude.root if isinstance(exclude, LocalFolder) else None)

    def read(self, rel: PurePosixPath) -> bytes:
        return self.path(rel).read_bytes()

    def file(self, rel: PurePosixPath) -> Path:
        return self.path(rel)

    def write(self, rel: PurePosixPath, data: bytes) -> None:
        path = self.path(rel)
        try:
            write_atomic(path, data)
        except FileNotFoundError:  # the first file of its folder
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomic(path, data)

    def remove(self, rel: PurePosixPath) -> None:
        self.path(rel).unlink(missing_ok=True)

    def existing(self, rels: Iterable[PurePosixPath]) -> set[PurePosixPath]:
        return {rel for rel in rels if self.path(rel).exists()}

    def check(self, writable: bool) -> None:
        if writable:  # made when the run starts (batch.runs.run.output_folder)
            if self.root.exists() and not self.root.is_dir():
                raise StorageError(f"cannot create output folder {self.root}: a file has that name")
        elif not self.root.is_dir():
            what = "is not a folder" if self.root.exists() else "does not exist"
            raise StorageError(f"input folder {self.root} {what}")

    def relative_to(self, other: Storage) -> PurePosixPath | None:
        """Compared as places on disk, not as text: a bind mount or a link of ``other`` is ``other``."""
        if not isinstance(other, LocalFolder):
            return None
        theirs = dir_identity(other.root)
        path, below = self.root.resolve(), []
        while theirs is not None:
            if dir_identity(path) == theirs:
                return PurePosixPath(*reversed(below)) if below else PurePosixPath(".")
            if path.parent == path:
                break
            below.append(path.name)
            path = path.parent
        mine, resolved = self.root.resolve(), other.root.resolve()  # ``other`` not made yet: as paths
        return PurePosixPath(mine.relative_to(resolved).as_posix()) if mine.is_relative_to(resolved) else None

    def clean(self) -> None:
        if self.root.is_dir():
            remove_stale_temporaries(self.root)


class ObjectStore(Storage):
    """The keys under ``root`` (``bucket/prefix``) of an fsspec filesystem (``scheme``)."""

    def __init__(self, scheme: str, root: str, options: dict):
        if not root:
            raise StorageError(f"{scheme}:// names no bucket: write {scheme}://BUCKET/PREFIX")
        self.scheme = scheme
        self.root = root
        self.options = options
        self._fs: AbstractFileSystem | None = None

    def __getstate__(self) -> dict:
        return {"scheme": self.scheme, "root": self.root, "options": self.options, "_fs": None}

    @property
    def fs(self) -> AbstractFileSystem:
        """The filesystem, made on first use in each process (it holds connections)."""
        if self._fs is None:
            self._fs = make_filesystem(self.scheme, self.options)
        return self._fs

    @property
    def uri(self) -> str:
        return f"{self.scheme}://{self.root}"

    @property
    def key_prefix_bytes(self) -> int:
        return len(self.root.split("/", 1)[1].encode("utf-8")) + 1 if "/" in self.root else 0

    @property
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def key(self, rel: PurePosixPath) -> str:
        return f"{self.root}/{rel.as_posix()}"

    def locate(self, rel: PurePosixPath) -> str:
        return f"{self.scheme}://{self.key(rel)}"

    def find_images(self, exclude: Storage | None = None) -> Listing:
        skip = exclude.relative_to(self) if exclude is not None else None
        found, skipped = [], []
        for name in self.list_keys():
            if is_hidden(name) or not is_image_file(Path(name)):
                continue
            try:
                rel = safe_relative(name)
            except UnsafeName as e:
                skipped.append((shown(f"{self.uri}/{name}"), str(e)))
                continue
            if not (skip is not None and rel.is_relative_to(skip)):
                found.append(rel)
        return Listing(sorted(found, key=lambda rel: rel.parts), sorted(skipped))

    def list_keys(self) -> list[str]:
        """Every object's key under the prefix, relative to it, exactly as stored (not normalised)."""
        with self.errors(writable=False):
            keys = self.fs.find(self.root, withdirs=False)
        base = self.fs.root_marker + self.root + "/"  # the prefix as the listing spells it ("/bkt/in/" in memory://)
        return [key[len(base) :] for key in keys if key.startswith(base)]

    def list_files(self, hidden: bool = False) -> list[PurePosixPath]:
        """Every object under the prefix as a relative path; names with a part starting with ``.`` only if ``hidden``."""
        return [PurePosixPath(name) for name in self.list_keys() if hidden or not is_hidden(name)]

    def read(self, rel: PurePosixPath) -> bytes:
        with as_os_error(self.locate(rel), "read"):
            return self.fs.cat_file(self.key(rel))

    def file(self, rel: PurePosixPath) -> StoredFile:
        return StoredFile(self, rel)

    def read_many(self, rels: Iterable[PurePosixPath]) -> dict[PurePosixPath, bytes]:
        by_key = {self.key(rel): rel for rel in rels}
        if not by_key:
            return {}
        with self.errors(writable=False):
            found = self.fs.cat(list(by_key), on_error="omit")  # concurrent GETs (s3fs batches them)
        return {by_key[key]: data for key, data in found.items()}

    def write(self, rel: PurePosixPath, data: bytes) -> None:
        with as_os_error(self.locate(rel), "write"):
            self.fs.pipe_file(self.key(rel), data)  # one PUT: the object appears whole or not at all

    def remove(self, rel: PurePosixPath) -> None:
        with as_os_error(self.locate(rel), "delete"), contextlib.suppress(FileNotFoundError):
            self.fs.rm_file(self.key(rel))

    def existing(self, rels: Iterable[PurePosixPath]) -> set[PurePosixPath]:
        wanted = set(rels)
        if not wanted:
            return set()
        return wanted & set(self.list_files(hidden=True))  # one listing rather than a HEAD per object

    def check(self, writable: bool) -> None:
        with self.errors(writable):
            if self.scheme in S3_SCHEMES:
                self.fs.info(self.bucket)  # FileNotFoundError when there is no such bucket
            if writable:  # a probe object, so that a read-only location stops the run before it starts
                probe = f"{self.root}/{PROBE_NAME}"
                self.fs.pipe_file(probe, b"")
                self.fs.rm_file(probe)

    def relative_to(self, other: Storage) -> PurePosixPath | None:
        """Within one service: ``s3a://b/p`` is ``s3://b/p``."""
        if not isinstance(other, ObjectStore) or service(other.scheme) != service(self.scheme):
            return None
        mine, theirs = PurePosixPath(self.root), PurePosixPath(other.root)
        return mine.relative_to(theirs) if mine.is_relative_to(theirs) else None

    def clean(self) -> None:
        pass  # a PUT leaves no temporary behind

    @contextlib.contextmanager
    def errors(self, writable: bool) -> Iterator[None]:
        """Turn the filesystem's errors about the location as a whole into a :class:`StorageError` saying what to do."""
        try:
            yield
        except StorageError:
            raise
        except Exception as e:  # botocore, aiohttp and fsspec errors: each gets its own explanation
            raise StorageError(explain(self, e, writable)) from e


@dataclass(frozen=True)
class StoredFile:
    """An object in a store, read the way a ``Path`` is: ``read_bytes()``; ``str()`` gives its URI."""

    store: ObjectStore
    rel: PurePosixPath

    def read_bytes(self) -> bytes:
        return self.store.read(self.rel)

    def __str__(self) -> str:
        return self.store.locate(self.rel)


def walk_images(input_dir: Path, exclude: Path | None = None) -> Listing:
    """The photos under ``input_dir`` (links to files followed, links to folders not: no cycles), leaving out the
    folder ``exclude``; entries with a photo's name that are not photo files, and folders that cannot be listed,
    are skipped with the reason."""
    excluded = dir_identity(exclude) if exclude is not None and exclude.is_dir() else None
    found: list[PurePosixPath] = []
    skipped: list[tuple[str, str]] = []

    def unlisted(error: OSError) -> None:
        fix = "check its permissions" if isinstance(error, PermissionError) else "check the storage"
        skipped.append(
            (shown(str(error.filename)), f"cannot list this folder ({error.strerror}): {fix}; its photos were not read")
        )

    for folder, dirs, files in os.walk(input_dir, onerror=unlisted):
        dirs[:] = [d for d in dirs if not d.startswith(".") and dir_identity(Path(folder, d)) != excluded]
        for name in dirs:  # still walked: a folder named like a photo is reported, its photos are read
            if is_image_file(Path(name)):
                skipped.append((shown(str(Path(folder, name))), "is a folder with a photo's name, not a photo; rename it"))
        rel_folder = Path(folder).relative_to(input_dir).as_posix()
        for name in files:
            if name.startswith(".") or not is_image_file(Path(name)):
                continue
            path = Path(folder, name)
            try:
                check_photo_file(path)
                found.append(safe_relative(name if rel_folder == "." else f"{rel_folder}/{name}"))
            except UnsafeName as e:
                skipped.append((shown(str(path)), str(e)))
    return Listing(sorted(found, key=lambda rel: rel.parts), sorted(skipped))


def check_photo_file(path: Path) -> None:
    """:class:`UnsafeName` (the reason) unless ``path`` is, or links to, a regular file."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        raise UnsafeName("is a link to nothing (its target was moved or deleted): fix or remove the link") from None
    except OSError as e:
        if e.errno == errno.ELOOP:
            raise UnsafeName("is a link in a loop (it points back to itself): replace it by the photo") from None
        raise UnsafeName(f"cannot be examined ({e.strerror}): check its permissions") from None
    if not stat.S_ISREG(mode):
        raise UnsafeName(f"is {file_kind(mode)}, not a photo file: replace it by the photo or remove it")


def is_hidden(name: str) -> bool:
    """A key or path with a part starting with ``.`` (``.cache/x.jpg``), ``.`` and ``..`` aside: those are unsafe, not hidden."""
    return any(part.startswith(".") and part not in (".", "..") for part in name.split("/"))


def dir_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------------------------
# Filesystems and their errors.


def service(scheme: str) -> str:
    """The storage service a scheme names (Hadoop's ``s3a`` is S3)."""
    return "s3" if scheme in S3_SCHEMES else scheme


def storage_options(scheme: str) -> dict:
    """fsspec options for ``scheme`` from the standard environment variables (S3: endpoint and region)."""
    if scheme not in S3_SCHEMES:
        return {}
    options: dict = {}
    if endpoint := s3_endpoint():
        options["endpoint_url"] = endpoint
    if region := os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION"):
        options["client_kwargs"] = {"region_name": region}
    return options


def s3_endpoint() -> str | None:
    return os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")


def make_filesystem(scheme: str, options: dict) -> AbstractFileSystem:
    """The fsspec filesystem for ``scheme``; :class:`StorageError` naming the package to install."""
    fsspec = require("fsspec", "ray", what=f"{scheme}:// locations")
    try:
        return fsspec.filesystem(scheme, skip_instance_cache=True, **options)  # not a cached instance made under other settings
    except ValueError as e:  # fsspec: "Protocol not known"
        raise StorageError(f"{scheme}:// is not a storage scheme fsspec knows ({e}); use a local folder or s3://") from e
    except ImportError as e:  # fsspec: "Install s3fs to access S3" and the like
        hint = "pip install '.[ray]'" if scheme in S3_SCHEMES else str(e)
        raise StorageError(f"{scheme}:// locations need a filesystem package that is not installed: {hint}") from e


def explain(store: ObjectStore, error: Exception, writable: bool) -> str:
    """What went wrong with ``store`` and what to do about it."""
    kinds = {cls.__name__ for cls in type(error).__mro__}  # botocore's classes, without importing botocore
    where = f" at {s3_endpoint()}" if store.scheme in S3_SCHEMES and s3_endpoint() else ""
    if kinds & {"NoCredentialsError", "PartialCredentialsError"}:
        return f"no credentials for {store.uri}: {CREDENTIALS_HINT}"
    if kinds & {"EndpointConnectionError", "ClientConnectorError", "ConnectTimeoutError"}:
        return f"cannot reach the storage server for {store.uri} ({error}); check AWS_ENDPOINT_URL and the network"
    if isinstance(error, FileNotFoundError) and store.scheme in S3_SCHEMES:
        return f"bucket '{store.bucket}' does not exist{where}: create it, or check the URI and AWS_ENDPOINT_URL"
    if isinstance(error, FileNotFoundError):
        return f"{store.uri} does not exist ({error})"
    if isinstance(error, PermissionError):
        action = "write to" if writable else "read"
        return f"not allowed to {action} {store.uri} ({error}); check the credentials and their permissions"
    return f"cannot use {store.uri}: {type(error).__name__}: {error}"


@contextlib.contextmanager
def as_os_error(location: str, action: str) -> Iterator[None]:
    """Let one file's read or write fail as an ``OSError`` (what callers handle per file) whatever the library raised."""
    try:
        yield
    except OSError:
        raise
    except Exception as e:  # botocore and aiohttp errors (connection lost, throttled after retries, ...)
        raise OSError(f"cannot {action} {location}: {type(e).__name__}: {e}") from e
