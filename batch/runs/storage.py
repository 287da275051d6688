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
import logging
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING

from batch.core.errors import CarvanaError
from batch.core.extras import require
from batch.core.files import remove_stale_temporaries, write_atomic
from batch.core.images import is_image_file

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
    """A URI as it is (a ``str``: ``Path`` would fold its ``//``), anything else as a ``Path``."""
    return str(location).rstrip("/") if is_uri(location) else Path(location)


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
    def find_images(self, exclude: Storage | None = None) -> list[PurePosixPath]:
        """``.jpg``/``.jpeg``/``.png`` files (any letter case) as sorted relative paths; nothing hidden,
        nothing inside ``exclude`` (the output location, when it lies inside this one)."""

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

    def find_images(self, exclude: Storage | None = None) -> list[PurePosixPath]:
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
        if not isinstance(other, LocalFolder):
            return None
        mine, theirs = self.root.resolve(), other.root.resolve()
        return PurePosixPath(mine.relative_to(theirs).as_posix()) if mine.is_relative_to(theirs) else None

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
    def bucket(self) -> str:
        return self.root.split("/", 1)[0]

    def key(self, rel: PurePosixPath) -> str:
        return f"{self.root}/{rel.as_posix()}"

    def locate(self, rel: PurePosixPath) -> str:
        return f"{self.scheme}://{self.key(rel)}"

    def find_images(self, exclude: Storage | None = None) -> list[PurePosixPath]:
        skip = exclude.relative_to(self) if exclude is not None else None
        found = []
        for rel in self.list_files():
            if is_image_file(Path(rel.name)) and not (skip is not None and rel.is_relative_to(skip)):
                found.append(rel)
        return sorted(found, key=lambda rel: rel.parts)

    def list_files(self, hidden: bool = False) -> list[PurePosixPath]:
        """Every object under the prefix as a relative path; names with a part starting with ``.`` only if ``hidden``."""
        with self.errors(writable=False):
            keys = self.fs.find(self.root, withdirs=False)
        base = self.fs.root_marker + self.root + "/"  # the prefix as the listing spells it ("/bkt/in/" in memory://)
        rels = [PurePosixPath(key[len(base) :]) for key in keys if key.startswith(base)]
        return [rel for rel in rels if hidden or not any(part.startswith(".") for part in rel.parts)]

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
        if not isinstance(other, ObjectStore) or other.scheme != self.scheme:
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


def walk_images(input_dir: Path, exclude: Path | None = None) -> list[PurePosixPath]:
    """Image files under ``input_dir`` as sorted relative paths, leaving out the folder ``exclude``."""
    excluded = dir_identity(exclude) if exclude is not None and exclude.is_dir() else None
    found = []
    for folder, dirs, files in os.walk(input_dir):
        dirs[:] = [d for d in dirs if not d.startswith(".") and dir_identity(Path(folder, d)) != excluded]
        rel_folder = PurePosixPath(Path(folder).relative_to(input_dir).as_posix())
        for name in files:
            if not name.startswith(".") and is_image_file(Path(name)) and Path(folder, name).is_file():
                found.append(rel_folder / name)
    return sorted(found, key=lambda rel: rel.parts)


def dir_identity(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_dev, st.st_ino


# ---------------------------------------------------------------------------------------------
# Filesystems and their errors.


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
