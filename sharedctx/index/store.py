"""TreeStore: a content-addressed disk cache of compressed chunk trees, on diskcache, that never unpickles.

A chunk's compressed nodes depend only on (base-model fingerprint, the lower-side options that shape them,
the chunk's token ids), because every node is encoded on its own with positions from 0. That triple, hashed,
is the key; the value is one safetensors blob (all nodes of the chunk's tree) behind a magic header and a
SHA-256 checksum. Values are bytes only: diskcache pickles anything else, and unpickling a file planted in a
cache directory runs arbitrary code, so `SafeDisk` refuses to store or load pickled entries at all.

Layout of an entry::

    b"SCTX" | version (1 byte) | sha256(payload) (32 bytes) | payload = safetensors bytes

A corrupt, truncated or refused entry is deleted and reported as a miss, so the caller recomputes it (`BlobCache.get`);
records that cannot be recomputed are read with `BlobCache.read`, which raises instead and keeps the bytes.
"""

from __future__ import annotations

import errno
import functools
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Mapping

import diskcache
import numpy as np
import torch

from ..errors import (
    ReadOnlyIndexError,
    StoreError,
    StoreFullError,
    StoreMismatchError,
    UnsafeEntryError,
)
from ..tree import NodeStates
from .snapshot import Snapshot, db_error

__all__ = [
    "TreeStore",
    "BlobCache",
    "SafeDisk",
    "StoreError",
    "StoreFullError",
    "StoreMismatchError",
    "UnsafeEntryError",
    "chunk_key",
    "pack",
    "unpack",
]

logger = logging.getLogger(__name__)

MAGIC = b"SCTX"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 32
DEFAULT_SIZE_LIMIT = 4 * 2**30
#: value files younger than this are never taken for orphans (another process may be about to record them)
ORPHAN_AGE_S = 600.0

ChunkNodes = dict[tuple[int, int], NodeStates]  # (level, index) -> states; (0, 0) is the chunk root






# ---------------------------------------------------------------------- a diskcache Disk that never pickles
class SafeDisk(diskcache.Disk):
    """Keys are ``str``; values are ``bytes``. Anything pickled is refused on the way in and on the way out."""

    def put(self, key):
        if type(key) is not str:
            raise TypeError(f"TreeStore keys are str, got {type(key).__name__}")
        return super().put(key)

    def get(self, key, raw):
        if not raw:
            raise UnsafeEntryError("refusing a pickled key in the store; delete the store directory if you did not put it there")
        return super().get(key, raw)

    def store(self, value, read, key=diskcache.core.UNKNOWN):
        if type(value) is not bytes:
            raise TypeError(f"TreeStore values are bytes, got {type(value).__name__} (diskcache would pickle it)")
        return super().store(value, read, key=key)

    def fetch(self, mode, filename, value, read):
        if mode not in (diskcache.core.MODE_RAW, diskcache.core.MODE_BINARY) or read:
            raise UnsafeEntryError(f"refusing a store entry of diskcache mode {mode} (only raw bytes are sharedctx's)")
        out = super().fetch(mode, filename, value, read)
        if type(out) is not bytes:
            raise UnsafeEntryError(f"refusing a store entry holding {type(out).__name__}, not bytes")
        return out

    def _write(self, full_path, iterator, mode, encoding=None):
        try:
            return super()._write(full_path, iterator, mode, encoding)
        except BaseException:
            # a failed write (a full disk) leaves no partial file behind; the row was never inserted
            try:
                os.remove(full_path)
            except OSError:
                pass
            raise


# ---------------------------------------------------------------------- serialisation
def pack(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> bytes:
    """Safetensors bytes of ``tensors`` behind a magic header and a checksum."""
    from safetensors.torch import save

    payload = save({k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}, metadata=dict(metadata or {}))
    return MAGIC + bytes([VERSION]) + hashlib.sha256(payload).digest() + payload


def unpack(blob: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Check and decode a blob written by `pack`; raises `StoreError` when it is corrupt or truncated."""
    from safetensors.torch import load

    if len(blob) < _HEADER + 8 or blob[:4] != MAGIC:
        raise StoreError("not a sharedctx entry (bad magic or too short)")
    if blob[4] != VERSION:
        raise StoreError(f"entry format {blob[4]} is not {VERSION}")
    payload = blob[_HEADER:]
    if hashlib.sha256(payload).digest() != blob[5:_HEADER]:
        raise StoreError("checksum mismatch (corrupt or truncated entry)")
    (n,) = struct.unpack("<Q", payload[:8])
    header = json.loads(payload[8 : 8 + n])
    metadata = header.get("__metadata__", {}) or {}
    return load(payload), metadata


def chunk_key(fingerprint: str, signature: Mapping[str, Any], token_ids: torch.Tensor | np.ndarray) -> str:
    """The content address of a chunk's tree: SHA-256 of (base fingerprint, lower-side options, token ids)."""
    h = hashlib.sha256(b"sharedctx-chunk-v1\0")
    h.update(fingerprint.encode() + b"\0")
    h.update(json.dumps(dict(signature), sort_keys=True).encode() + b"\0")
    ids = token_ids.numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
    h.update(np.ascontiguousarray(ids, dtype="<i8").tobytes())
    return "chunk/" + h.hexdigest()


def _private_dir(path: Path) -> Path:
    """``path``, created private (0700) when missing; a directory that exists already is left as it is."""
    if path.is_dir():
        return path
    try:
        path.mkdir(parents=True, mode=0o700)
        os.chmod(path, 0o700)  # mkdir's mode is narrowed by the umask, never widened: make it exact
    except FileExistsError:
        if not path.is_dir():
            raise StoreError(f"{path} exists and is not a directory; give a directory for the store") from None
    except OSError as exc:
        raise StoreError(f"cannot create the store directory {path}: {exc.strerror or exc}; check the permissions of its parent") from exc
    return path


# ---------------------------------------------------------------------- a checked bytes cache
def _guarded(method: Callable) -> Callable:
    """Turn SQLite's errors (a damaged, truncated or unwritable ``cache.db``) into `StoreError` naming the file."""

    @functools.wraps(method)
    def run(self: BlobCache, *args: Any, **kwargs: Any) -> Any:
        try:
            return method(self, *args, **kwargs)
        except sqlite3.DatabaseError as exc:
            raise db_error(self.directory / "cache.db", exc, self.fix) from exc

    return run


class BlobCache:
    """A diskcache of checked blobs: bytes in, bytes out, never pickle; thread- and process-safe.

    With ``read_only``, an immutable snapshot (`sharedctx.index.snapshot.Snapshot`; with ``recover``, one that also
    reads the writes a journal holds, from a copy): nothing in the directory is written, a corrupt entry is a miss
    but stays on disk, and every write raises `ReadOnlyIndexError`. ``fix`` is what an error about a damaged
    database tells the user to do. SQLite's own errors surface as `StoreError` naming the file."""

    def __init__(self, directory: str | os.PathLike, *, size_limit: int | None = None, read_only: bool = False,
                 recover: bool = False, fix: str = "") -> None:
        self.read_only = read_only
        self.fix = fix or "restore the directory from a copy, or delete it and rebuild what it held"
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "writes": 0, "corrupt": 0, "refused": 0}
        if read_only:
            self.directory = Path(directory)
            self._cache: Any = Snapshot(self.directory, SafeDisk(str(self.directory)), recover=recover, fix=self.fix)
            return
        self.directory = _private_dir(Path(directory))
        settings: dict[str, Any] = {"eviction_policy": "none"} if size_limit is None else {
            "eviction_policy": "least-recently-used",
            "size_limit": int(size_limit),
            "cull_limit": 16,
        }
        try:
            self._cache = diskcache.Cache(str(self.directory), disk=SafeDisk, timeout=60, **settings)
        except sqlite3.DatabaseError as exc:
            raise db_error(self.directory / "cache.db", exc, self.fix) from exc
        except Exception as exc:
            raise StoreError(f"cannot open the store in {self.directory}: {exc}") from exc

    @property
    def changed(self) -> bool:
        """Read-only: whether a writer changed the directory since it was opened (always False when writable)."""
        return bool(self.read_only and self._cache.changed)

    def _writable(self) -> None:
        if self.read_only:
            raise ReadOnlyIndexError(f"the store in {self.directory} is open read-only; open it without read_only=True to write")

    def _drop(self, key: str) -> None:
        """Delete a corrupt or unsafe entry (a read-only snapshot keeps it: the caller sees a miss)."""
        if not self.read_only:
            self.delete(key)

    def _count(self, name: str) -> None:
        with self._lock:
            self.counts[name] += 1

    @_guarded
    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The decoded entry, or None when it is missing, corrupt (dropped) or unsafe (dropped)."""
        try:
            blob = self._cache.get(key, retry=True)
        except UnsafeEntryError as exc:
            logger.warning("store %s: %s; dropping entry %s", self.directory, exc, key)
            self._count("refused")
            self._drop(key)
            self._count("misses")
            return None
        if blob is None:
            self._count("misses")
            return None
        try:
            out = unpack(blob)
        except Exception as exc:
            logger.warning("store %s: entry %s is corrupt (%s); dropping it", self.directory, key, exc)
            self._count("corrupt")
            self._drop(key)
            self._count("misses")
            return None
        self._count("hits")
        return out

    @_guarded
    def read(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
        """The decoded entry or None when missing; a corrupt or unsafe entry raises `StoreError` and stays on
        disk (for records that cannot be computed again, which `get` would drop)."""
        try:
            blob = self._cache.get(key, retry=True)
        except UnsafeEntryError:
            self._count("refused")
            raise
        if blob is None:
            return None
        try:
            out = unpack(blob)
        except Exception as exc:
            self._count("corrupt")
            raise StoreError(str(exc)) from exc
        self._count("hits")
        return out

    @_guarded
    def rename(self, key: str, new_key: str) -> bool:
        """Move the entry at ``key`` to ``new_key`` (which must be free) without reading its value: the same
        bytes, inline or in their file, under another key. False when ``key`` is missing."""
        self._writable()
        with self._cache.transact(retry=True):
            cur = self._cache._sql("UPDATE Cache SET key = ? WHERE key = ? AND raw = 1", (new_key, key))
            return cur.rowcount > 0

    @_guarded
    def set(self, key: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
        self._writable()
        blob = pack(tensors, metadata)
        try:
            self._cache.set(key, blob, retry=True)
        except (OSError, sqlite3.OperationalError) as exc:
            full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "full" in str(exc)
            if full:
                raise StoreFullError(
                    f"no space left on the disk of {self.directory} while writing {len(blob)} bytes; free space, "
                    "lower the store's size_limit or move the store (nothing half-written was kept)"
                ) from exc
            raise StoreError(f"cannot write to the store in {self.directory}: {exc}") from exc
        self._count("writes")

    @_guarded
    def add_raw(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless present (atomically); return what the store now holds."""
        self._writable()
        self._cache.add(key, value, retry=True)
        return self._cache.get(key, retry=True)

    @_guarded
    def get_raw(self, key: str) -> bytes | None:
        return self._cache.get(key, retry=True)

    @_guarded
    def fetch_raw(self, key: str) -> bytes | None:
        """The bytes of ``key``, None when it has no row; unlike `get_raw`, a row whose value file is gone raises
        `StoreError` instead of reading as missing (a merge lists it as refused)."""
        if self.read_only:
            return self._cache.fetch(key)
        rows = self._cache._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1", (key,)).fetchall()
        if not rows:
            return None
        try:
            return self._cache._disk.fetch(*rows[0], False)
        except OSError as exc:
            raise StoreError(f"the value of {key!r} in {self.directory} is missing ({rows[0][1]}: {exc.strerror or exc})") from exc

    @_guarded
    def reclaim_orphans(self, min_age_s: float = ORPHAN_AGE_S) -> int:
        """Delete value files no row refers to (left by a writer killed between writing a value's file and recording
        it), older than ``min_age_s`` so that a write in progress in another process keeps its file. How many."""
        self._writable()
        held = {f for (f,) in self._cache._sql("SELECT filename FROM Cache WHERE filename IS NOT NULL").fetchall()}
        now, removed = time.time(), 0
        for path in self.directory.glob("??/??/*.val"):
            name = str(path.relative_to(self.directory))
            try:
                if name not in held and now - path.stat().st_mtime >= min_age_s:
                    path.unlink()
                    removed += 1
            except FileNotFoundError:
                continue
        if removed:
            logger.info("store %s: deleted %d value files no entry referred to (left by an interrupted write)", self.directory, removed)
        return removed

    @_guarded
    def set_raw(self, key: str, value: bytes) -> None:
        self._writable()
        self._cache.set(key, value, retry=True)

    @_guarded
    def delete(self, key: str) -> bool:
        self._writable()
        return bool(self._cache.delete(key, retry=True))

    @_guarded
    def __contains__(self, key: str) -> bool:
        return key in self._cache

    @_guarded
    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (read straight from the index table: no value is decoded)."""
        rows = self._cache._sql("SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key < ?", (prefix, prefix + "\uffff"))
        return [k for (k,) in rows.fetchall() if isinstance(k, str)]

    @_guarded
    def __len__(self) -> int:
        return len(self._cache)

    @_guarded
    def volume(self) -> int:
        return int(self._cache.volume())

    def close(self) -> None:
        self._cache.close()


# ---------------------------------------------------------------------- the node store
class TreeStore:
    """Compressed chunk trees, content-addressed, on disk.

    Args:
        directory: created private (0700) when missing.
        size_limit: bytes on disk before the least recently used chunks are evicted (default 4 GiB).
        fingerprint, signature: when given, the store is bound to that base model and lower-side configuration:
            the first opening records them, a later opening with others raises `StoreMismatchError`.
        read_only: open an existing store as an immutable snapshot (see `BlobCache`): nothing is written, not
            even access times; writes raise `ReadOnlyIndexError`.
    """

    def __init__(
        self,
        directory: str | os.PathLike,
        *,
        size_limit: int = DEFAULT_SIZE_LIMIT,
        fingerprint: str | None = None,
        signature: Mapping[str, Any] | None = None,
        read_only: bool = False,
    ) -> None:
        self.directory = Path(directory) if read_only else _private_dir(Path(directory))
        self.size_limit = int(size_limit)
        self.read_only = read_only
        fix = (f"The node store is a cache that can be rebuilt: every node is encoded again from the documents when a "
               f"query needs it. To rebuild it, delete it (`rm -r {self.directory}`) and open the index again (without "
               "read_only); the documents beside it are kept")
        try:
            self._blobs = BlobCache(self.directory, size_limit=self.size_limit, read_only=read_only, fix=fix)
        except StoreError as exc:
            if read_only or fix in str(exc):
                raise
            raise StoreError(f"{exc}. {fix}") from exc
        self.fingerprint = fingerprint
        self.signature = dict(signature) if signature is not None else None
        if fingerprint is not None:
            self._bind(fingerprint, dict(signature or {}))

    def _bind(self, fingerprint: str, signature: dict[str, Any]) -> None:
        mine = json.dumps({"fingerprint": fingerprint, "signature": signature}, sort_keys=True).encode()
        held = self._blobs.get_raw("manifest") if self.read_only else self._blobs.add_raw("manifest", mine)
        if held is None:  # read-only: nothing bound it yet
            raise StoreError(f"the store in {self.directory} is not bound to a model yet; open it without read_only first")
        if held != mine:
            try:
                theirs = json.loads(held)
                if not isinstance(theirs, dict):
                    raise ValueError("not a JSON object")
            except ValueError:
                raise StoreError(f"the manifest of the node store in {self.directory} (its 'manifest' entry) is damaged. "
                                 f"{self._blobs.fix}") from None
            raise StoreMismatchError(
                f"the store in {self.directory} was built by base model {theirs.get('fingerprint')} with lower-side options "
                f"{theirs.get('signature')}; this model is {fingerprint} with {signature}. Use another store directory "
                "for this model, or load the model and options the store was built with"
            )

    # ------------------------------------------------------------------ chunk trees
    def key(self, token_ids: torch.Tensor) -> str:
        if self.fingerprint is None or self.signature is None:
            raise ValueError("this TreeStore is not bound to a model: pass fingerprint= and signature=, or use chunk_key()")
        return chunk_key(self.fingerprint, self.signature, token_ids)

    def get_chunk(self, key: str) -> ChunkNodes | None:
        """All nodes of one chunk's tree, or None (missing, or corrupt/unsafe and dropped)."""
        got = self._blobs.get(key)
        if got is None:
            return None
        tensors, meta = got
        if meta.get("kind") != "chunk" or (self.fingerprint is not None and meta.get("fingerprint") != self.fingerprint):
            logger.warning("store %s: entry %s is not a chunk of this model; dropping it", self.directory, key)
            self._blobs._drop(key)
            return None
        nodes: ChunkNodes = {}
        for name, t in tensors.items():
            kind, level, index = name.split("/")
            st = nodes.setdefault((int(level), int(index)), NodeStates(None, None, None))
            setattr(st, kind, t)
        return nodes

    def put_chunk(self, key: str, nodes: Mapping[tuple[int, int], NodeStates], *, n_tokens: int) -> None:
        tensors: dict[str, torch.Tensor] = {}
        for (level, index), st in nodes.items():
            for kind in ("keys", "values", "key"):
                t = getattr(st, kind)
                if t is not None:
                    tensors[f"{kind}/{level}/{index}"] = t
        meta = {"kind": "chunk", "fingerprint": self.fingerprint or "", "n_tokens": str(int(n_tokens))}
        self._blobs.set(key, tensors, meta)

    def __contains__(self, key: str) -> bool:
        return key in self._blobs

    def delete(self, key: str) -> bool:
        return self._blobs.delete(key)

    def chunk_keys(self) -> list[str]:
        return self._blobs.keys("chunk/")

    def __len__(self) -> int:
        return len(self.chunk_keys())

    @property
    def stats(self) -> dict[str, int]:
        """Hits, misses, writes, corrupt and refused entries seen by this handle; bytes on disk."""
        return {**self._blobs.counts, "volume_bytes": self._blobs.volume()}

    @property
    def blobs(self) -> BlobCache:
        return self._blobs

    def close(self) -> None:
        self._blobs.close()

    def __repr__(self) -> str:
        return f"TreeStore({str(self.directory)!r}, size_limit={self.size_limit})"
