"""One run at a time per output location: OUTPUT_DIR is created for the run and locked while it writes; a
bucket prefix is locked too.

Two runs writing one location would spoil resume (each would take the other's half-written photos for
done ones); the second is refused with a message saying so. A run that could not start leaves
nothing behind: the folders made for it are removed again while still empty.

- A folder: ``OUTPUT_DIR/.unet-batch.lock``, held with ``flock`` (the kernel drops it with the process, so a
  killed run's lock is never in the way).
- A bucket prefix: the object ``PREFIX/.unet-batch.lock``, made only if absent (S3's conditional
  ``PutObject``, ``If-None-Match: *``: of two runs starting together, one gets it). Nothing drops it when a
  run is killed, so it is a lease: the run rewrites it every :data:`LEASE` / 4 seconds, each time on
  the condition that it is still the version the run wrote (``If-Match``). A lock not rewritten for
  :data:`LEASE` seconds is stale (its run was killed, or lost the network that long) and the next
  run takes it over, with the same condition on the stale version, so that of two runs taking it over
  one wins. A run whose lock was taken over that way (it could not reach the store for a whole lease)
  learns it at its next rewrite: it logs an error at once and ends with ``report.stopped`` saying so
  (exit 1); it never deletes the other run's lock.
- Other object stores (``memory://``, ``gs://``, ...): the lock object is made only if absent, as far as the
  filesystem can ensure it, and is not a lease: a stale one is removed by hand (the message says how).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path, PurePosixPath
from typing import TextIO

from batch.runs.storage import S3_SCHEMES, LocalFolder, ObjectStore, Storage, StorageError

log = logging.getLogger(__name__)

LOCK_NAME = ".unet-batch.lock"
LEASE = 120.0  # seconds a bucket lock stays fresh without being rewritten (rewritten every LEASE / 4)
BUSY = "another unet-batch run is writing to {where}{holder}; wait for it to finish or choose another OUTPUT_DIR"


class Held:
    """The lock of a running run. ``lost``: why it no longer holds it ("" while it does)."""

    lost: str = ""


@contextlib.contextmanager
def output_folder(output: Storage) -> Iterator[Held]:
    """OUTPUT_DIR, created if needed and locked for this run; on the way out the lock goes, and so do the folders
    made here if they are still empty (a run that could not start leaves nothing behind). A bucket prefix is locked
    with a lease (:class:`BucketLock`)."""
    if isinstance(output, ObjectStore):
        with BucketLock(output).held() as held:
            yield held
        return
    if not isinstance(output, LocalFolder):
        raise StorageError(f"{output}: no lock for this kind of location")
    output_dir = output.root
    made = _missing_folders(output_dir)  # deepest first
    try:
        try:
            output_dir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise StorageError(f"cannot create output folder {output_dir}: {e.strerror or e}") from e
        with output_lock(output_dir):
            yield Held()
    finally:
        for folder in made:
            with contextlib.suppress(OSError):  # not empty: the run wrote something
                folder.rmdir()


def _missing_folders(path: Path) -> list[Path]:
    """``path`` and those of its parents that do not exist, deepest first."""
    missing = []
    while not path.exists() and path != path.parent:
        missing.append(path)
        path = path.parent
    return missing


@contextlib.contextmanager
def output_lock(output_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock on OUTPUT_DIR (two runs writing one folder would spoil resume); the lock file
    ``OUTPUT_DIR/.unet-batch.lock`` exists only while a run holds it."""
    path = output_dir / LOCK_NAME
    handle = _take_lock(path)
    with handle:
        try:
            yield
        finally:
            path.unlink(missing_ok=True)  # while still holding the lock: the next run makes a fresh file


def _take_lock(path: Path) -> TextIO:
    while True:
        try:
            handle = open(path, "a")  # noqa: SIM115  (returned open, to be held while the run goes)
        except OSError as e:
            raise StorageError(f"cannot write to output folder {path.parent}: {e.strerror or e}") from e
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as e:
            handle.close()
            raise StorageError(BUSY.format(where=path.parent, holder="")) from e
        if _is_same_file(handle, path):
            return handle
        handle.close()  # the run before removed this lock file as this one took it: take the new file


def _is_same_file(handle: TextIO, path: Path) -> bool:
    try:
        return os.path.samestat(os.fstat(handle.fileno()), path.stat())
    except FileNotFoundError:
        return False


# ---------------------------------------------------------------------------------------------
# A bucket prefix.


@dataclass(frozen=True)
class Version:
    """The lock object as found: its version tag (S3's ETag), when it was last written, and what it says."""

    tag: str
    written: datetime  # by the store's clock
    holder: dict

    def age(self) -> float:
        return (_now() - self.written).total_seconds()


class BucketLock(Held):
    """The lease on ``PREFIX/.unet-batch.lock`` of an object store (see the module's description)."""

    def __init__(self, store: ObjectStore):
        self.store = store
        self.key = store.key(PurePosixPath(LOCK_NAME))
        self.lease = store.scheme in S3_SCHEMES  # conditional writes: renewed, and taken over when stale
        self.record = {
            "run": uuid.uuid4().hex,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "started": _now().isoformat(timespec="seconds"),
            "lease_seconds": LEASE,
        }
        self.tag = ""
        self.stop = threading.Event()

    @contextlib.contextmanager
    def held(self) -> Iterator[BucketLock]:
        self.take()
        renewer = threading.Thread(target=self.renew, name="bucket-lock", daemon=True) if self.lease else None
        if renewer is not None:
            renewer.start()
        try:
            yield self
        finally:
            self.stop.set()
            if renewer is not None:
                renewer.join()
            self.release()

    def take(self) -> None:
        """The lock, made if absent or taken over when stale; a :class:`StorageError` naming its holder otherwise."""
        for _ in range(3):  # the holder may release it between our tries
            with self.store.errors(writable=True):
                try:
                    self.tag = self.write(create=True)
                    return
                except FileExistsError:
                    found = self.find()
            if found is None:
                continue
            if not self.lease or found.age() <= LEASE:
                raise StorageError(self.busy(found))
            if self.take_over(found):
                return
        raise StorageError(BUSY.format(where=self.store.uri, holder=""))

    def take_over(self, stale: Version) -> bool:
        """Replace the stale lock, on the condition that it is still the version judged stale (of two runs doing this,
        one succeeds); False when it changed meanwhile."""
        try:
            with self.store.errors(writable=True):
                self.tag = self.write(match=stale.tag)
        except StorageError as e:
            if _precondition_failed(e):
                return False
            raise
        log.warning(
            "took over the lock of %s: its run (%s) stopped renewing it %.0f s ago (killed, or cut off from the store)",
            self.store.uri, describe_holder(stale.holder), stale.age(),
        )  # fmt: skip
        return True

    def renew(self) -> None:
        """Rewrite the lock every LEASE / 4 seconds while the run goes, if it is still ours; record it when it is not."""
        while not self.stop.wait(LEASE / 4):
            try:
                with self.store.errors(writable=True):
                    self.tag = self.write(match=self.tag)
            except StorageError as e:
                if _precondition_failed(e):
                    self.lost = (
                        f"another run took over the lock of {self.store.uri} after this one could not renew it for "
                        f"{LEASE:.0f} s, and both wrote there since: every output is a whole file, but rerun the command "
                        "to check that each photo is done with these settings"
                    )
                    log.error("%s", self.lost)
                    return
                log.warning("cannot renew the lock of %s (%s); trying again", self.store.uri, e)

    def release(self) -> None:
        """Delete the lock if it is still ours (after a takeover it is the other run's)."""
        with contextlib.suppress(OSError, StorageError):
            found = self.find()
            if found is not None and (found.tag == self.tag or not self.lease):
                self.store.fs.rm_file(self.key)

    def write(self, create: bool = False, match: str = "") -> str:
        """Write this run's record: only if absent (``create``), or only over version ``match``; return the new tag."""
        body = json.dumps(self.record | {"renewed": _now().isoformat(timespec="seconds")})
        condition = {"IfMatch": match} if match else {}
        response = self.store.fs.pipe_file(self.key, body.encode("utf-8"), mode="create" if create else "overwrite", **condition)
        return response.get("ETag", "") if isinstance(response, dict) else ""

    def find(self) -> Version | None:
        """The lock object now (None: gone)."""
        try:
            with self.store.errors(writable=False):
                info = self.store.fs.info(self.key, refresh=True)  # not a listing's cached answer
                body = self.store.fs.cat_file(self.key)
        except StorageError as e:
            if isinstance(e.__cause__, FileNotFoundError):
                return None
            raise
        try:
            holder = json.loads(body)
        except ValueError:
            holder = {}  # not ours to read: still a lock
        written = info.get("LastModified") or info.get("created") or _now()
        if not isinstance(written, datetime):
            written = datetime.fromtimestamp(float(written), UTC)
        return Version(str(info.get("ETag", "")), written, holder if isinstance(holder, dict) else {})

    def busy(self, found: Version) -> str:
        """Why this run cannot start, and when it could."""
        holder = f" ({describe_holder(found.holder)}, lock written {found.age():.0f} s ago)"
        message = BUSY.format(where=self.store.uri, holder=holder)
        if self.lease:
            return (
                f"{message}. A run renews its lock every {LEASE / 4:.0f} s; if that one was killed, its lock is taken over "
                f"{max(0.0, LEASE - found.age()):.0f} s from now: rerun then"
            )
        return f"{message}. If no run is writing there (one was killed), delete {self.store.locate(PurePosixPath(LOCK_NAME))}"


def describe_holder(holder: dict) -> str:
    """The run a lock names, in words."""
    if not holder:
        return "a run that did not say who it was"
    return f"pid {holder.get('pid', '?')} on {holder.get('host', '?')}, started {holder.get('started', '?')}"


def _precondition_failed(error: BaseException | None) -> bool:
    """Whether a conditional write was refused because the object changed (S3's 412 PreconditionFailed, which s3fs
    passes on as an OSError caused by botocore's ClientError)."""
    while error is not None:
        code = getattr(error, "response", {}).get("Error", {}).get("Code")
        if isinstance(error, FileExistsError) or code in ("PreconditionFailed", "412"):
            return True
        error = error.__cause__
    return False


def _now() -> datetime:
    return datetime.now(UTC)
