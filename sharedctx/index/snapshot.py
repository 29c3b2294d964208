"""A diskcache directory read as an immutable snapshot, for serving an index and for reading merge sources.

SQLite is opened ``mode=ro&immutable=1``: no lock is taken, no ``-wal``/``-shm`` file is made and nothing is written,
so it also works on a read-only mount, and reading never changes the directory (a merge must not change its source).
Values are read as diskcache stores them (inline, or in their own file).

A snapshot is valid while no process writes the directory. One whose journal holds writes not yet checkpointed (a
writer has it open, or ended without closing it: a build actor killed by Ray) is refused, unless ``recover`` is
set: then the database and its journal are copied into a temporary folder and the copy is checkpointed and read,
so the writes the journal holds are seen and the source is left as it is. A writer that changes the directory
while a snapshot is open is noticed (the database's inode, size and modification time, and a journal appearing)
and logged once: the snapshot keeps serving what it opened. Damaged databases raise `StoreError` naming the file.
"""

from __future__ import annotations

import logging
import os
import shutil
import sqlite3
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from ..errors import StoreError

__all__ = ["Snapshot", "db_error", "is_damaged"]

logger = logging.getLogger(__name__)

#: how often (seconds) an open snapshot looks at its files for a writer's changes
CHECK_EVERY_S = 1.0


def db_error(db: Path, exc: BaseException, fix: str) -> StoreError:
    """A `StoreError` for a SQLite failure on ``db``: names the file, says what SQLite said and what to do."""
    return StoreError(f"{db} cannot be read as a SQLite database ({exc}); {fix}")


def is_damaged(exc: BaseException) -> bool:
    """Whether ``exc`` (or what caused it) says a database file is damaged (not a database, malformed), as opposed to
    busy, locked or unwritable."""
    cause = exc if isinstance(exc, sqlite3.DatabaseError) else exc.__cause__
    return isinstance(cause, sqlite3.DatabaseError) and not isinstance(cause, sqlite3.OperationalError)


def _signature(db: Path) -> tuple[int, int, int, bool]:
    """What changes when a writer commits: the database's inode, size and mtime, and whether a journal holds writes."""
    st = db.stat()
    wal = db.with_name(db.name + "-wal")
    pending = wal.is_file() and wal.stat().st_size > 0
    return st.st_ino, st.st_size, st.st_mtime_ns, pending


class Snapshot:
    """The ``Cache`` table of a diskcache directory, read-only. ``disk`` fetches values (a `SafeDisk`)."""

    def __init__(self, directory: Path, disk: Any, *, recover: bool = False, fix: str = "") -> None:
        self.directory = Path(directory)
        self.fix = fix or "restore the directory from a copy, or rebuild it"
        db, wal = self.directory / "cache.db", self.directory / "cache.db-wal"
        if not db.is_file():
            raise StoreError(f"{self.directory} holds no store (no cache.db) to open read-only; build the index first")
        self._tmp: tempfile.TemporaryDirectory | None = None
        if wal.is_file() and wal.stat().st_size > 0:
            if not recover:
                raise StoreError(
                    f"{self.directory} has writes not yet checkpointed into cache.db: a process has it open for writing, or "
                    "one ended without closing it. Close the writers (or open the index once without read_only, which "
                    "checkpoints), then open it read-only"
                )
            db = self._recovered(db, wal)
        self._db = db
        self._uri = db.resolve().as_uri() + "?mode=ro&immutable=1"
        self._disk = disk
        self._local = threading.local()
        self._opened = _signature(self.directory / "cache.db")
        self._checked = time.monotonic()
        self._warned = False
        self._sql("SELECT 1 FROM Settings LIMIT 1").fetchall()  # a damaged database fails here, not at the first read

    def _recovered(self, db: Path, wal: Path) -> Path:
        """A checkpointed copy of ``db`` and its journal, in a temporary folder (the source is not touched)."""
        self._tmp = tempfile.TemporaryDirectory(prefix="sharedctx-snapshot-")
        copy = Path(self._tmp.name) / "cache.db"
        shutil.copyfile(db, copy)
        shutil.copyfile(wal, copy.with_name("cache.db-wal"))
        try:
            con = sqlite3.connect(str(copy))
            con.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            con.close()
        except sqlite3.DatabaseError as exc:
            raise db_error(db, exc, self.fix) from exc
        logger.info("%s: read the writes its journal holds from a checkpointed copy (the directory is left as it is)", self.directory)
        return copy

    def _sql(self, query: str, params: tuple = ()) -> sqlite3.Cursor:
        try:
            if getattr(self._local, "pid", None) != os.getpid():  # one connection per thread and process
                self._local.con = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
                self._local.pid = os.getpid()
            self._check_changes()
            return self._local.con.execute(query, params)
        except sqlite3.DatabaseError as exc:
            raise db_error(self.directory / "cache.db", exc, self.fix) from exc

    def _check_changes(self) -> None:
        """Log once when a writer has changed the directory since the snapshot was opened."""
        now = time.monotonic()
        if self._warned or self._tmp is not None or now - self._checked < CHECK_EVERY_S:
            return
        self._checked = now
        try:
            changed = _signature(self.directory / "cache.db") != self._opened
        except OSError:
            changed = True
        if changed:
            self._warned = True
            logger.warning(
                "%s changed on disk since it was opened read-only (a process wrote to it): this process keeps answering from "
                "the snapshot it opened, which no longer shows those changes (and reading an immutable snapshot that is "
                "rewritten under it may fail). Reopen the index to see them; write to a copy while readers serve one "
                "(docs/distributed.md, Serving an index)", self.directory)

    @property
    def changed(self) -> bool:
        """Whether a writer has changed the directory since the snapshot was opened (checked now)."""
        try:
            return _signature(self.directory / "cache.db") != self._opened
        except OSError:
            return True

    def row(self, key: str) -> tuple[int, str | None, Any] | None:
        """(mode, filename, value) of ``key``, or None when it is not there."""
        rows = self._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1 AND "
                         "(expire_time IS NULL OR expire_time > ?)", (key, time.time())).fetchall()
        return rows[0] if rows else None

    def fetch(self, key: str) -> bytes | None:
        """The value of ``key``, None when missing; a value whose file is gone raises `StoreError`."""
        row = self.row(key)
        if row is None:
            return None
        try:
            return self._disk.fetch(*row, False)
        except OSError as exc:
            raise StoreError(f"the value of {key!r} in {self.directory} is missing ({row[1]}: {exc.strerror or exc})") from exc

    def get(self, key: str, retry: bool = True) -> bytes | None:
        try:
            return self.fetch(key)
        except StoreError as exc:
            if isinstance(exc.__cause__, OSError):  # its value file is gone: a miss, as diskcache reports it
                return None
            raise

    def __contains__(self, key: str) -> bool:
        return bool(self._sql("SELECT 1 FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchall())

    def _setting(self, name: str) -> int:
        rows = self._sql("SELECT value FROM Settings WHERE key = ?", (name,)).fetchall()
        return int(rows[0][0]) if rows else 0

    def __len__(self) -> int:
        return self._setting("count")

    def volume(self) -> int:
        ((pages,),) = self._sql("PRAGMA page_count").fetchall()
        ((page_size,),) = self._sql("PRAGMA page_size").fetchall()
        return pages * page_size + self._setting("size")

    def close(self) -> None:
        con = getattr(self._local, "con", None)
        if con is not None and self._local.pid == os.getpid():
            con.close()
        self._local = threading.local()
        if self._tmp is not None:
            self._tmp.cleanup()
            self._tmp = None
