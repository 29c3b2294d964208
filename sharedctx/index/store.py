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
import hashlib
import json
import logging
import os
import sqlite3
import struct
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

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

__all__ = [
    "TreeStore",
    "BlobCache",
    "SafeDisk",
    "StoreError",
    "StoreFullError",
    "StoreMismatchError",
    "UnsafeEntryError",
    "chunk_key",
    "MergeReport",
    "merge_stores",
    "pack",
    "unpack",
]

logger = logging.getLogger(__name__)

MAGIC = b"SCTX"
VERSION = 1
_HEADER = len(MAGIC) + 1 + 32
DEFAULT_SIZE_LIMIT = 4 * 2**30

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


# ---------------------------------------------------------------------- read-only snapshots
class _Snapshot:
    """A diskcache directory read as an immutable snapshot: SQLite opened ``mode=ro&immutable=1`` (no lock taken, no
    ``-wal``/``-shm`` file made, nothing written, so it also works on a read-only mount), values read as diskcache
    stores them (inline, or in their own file). Valid while no process writes the directory: one with writes not
    yet checkpointed into ``cache.db`` (a writer has it open, or ended without closing it) is refused."""

    def __init__(self, directory: Path) -> None:
        db, wal = directory / "cache.db", directory / "cache.db-wal"
        if not db.is_file():
            raise StoreError(f"{directory} holds no store (no cache.db) to open read-only; build the index first")
        if wal.is_file() and wal.stat().st_size > 0:
            raise StoreError(
                f"{directory} has writes not yet checkpointed into cache.db: a process has it open for writing, or one "
                "ended without closing it. Close the writers (or open the index once without read_only, which "
                "checkpoints), then open it read-only"
            )
        self._uri = db.resolve().as_uri() + "?mode=ro&immutable=1"
        self._disk = SafeDisk(str(directory))
        self._local = threading.local()

    def _sql(self, query: str, params: tuple = ()) -> sqlite3.Cursor:
        if getattr(self._local, "pid", None) != os.getpid():  # one connection per thread and process
            self._local.con = sqlite3.connect(self._uri, uri=True, isolation_level=None, check_same_thread=False)
            self._local.pid = os.getpid()
        return self._local.con.execute(query, params)

    def get(self, key: str, retry: bool = True) -> bytes | None:
        rows = self._sql("SELECT mode, filename, value FROM Cache WHERE key = ? AND raw = 1 AND "
                         "(expire_time IS NULL OR expire_time > ?)", (key, time.time())).fetchall()
        if not rows:
            return None
        try:
            return self._disk.fetch(*rows[0], False)
        except OSError:  # its value file is gone: a miss, as diskcache reports it
            return None

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


# ---------------------------------------------------------------------- a checked bytes cache
class BlobCache:
    """A diskcache of checked blobs: bytes in, bytes out, never pickle; thread- and process-safe.

    With ``read_only``, an immutable snapshot (`_Snapshot`): nothing in the directory is written, a corrupt entry
    is a miss but stays on disk, and every write raises `ReadOnlyIndexError`."""

    def __init__(self, directory: str | os.PathLike, *, size_limit: int | None = None, read_only: bool = False) -> None:
        self.read_only = read_only
        self._lock = threading.Lock()
        self.counts = {"hits": 0, "misses": 0, "writes": 0, "corrupt": 0, "refused": 0}
        if read_only:
            self.directory = Path(directory)
            self._cache: Any = _Snapshot(self.directory)
            return
        self.directory = _private_dir(Path(directory))
        settings: dict[str, Any] = {"eviction_policy": "none"} if size_limit is None else {
            "eviction_policy": "least-recently-used",
            "size_limit": int(size_limit),
            "cull_limit": 16,
        }
        try:
            self._cache = diskcache.Cache(str(self.directory), disk=SafeDisk, timeout=60, **settings)
        except Exception as exc:
            raise StoreError(f"cannot open the store in {self.directory}: {exc}") from exc

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

    def rename(self, key: str, new_key: str) -> bool:
        """Move the entry at ``key`` to ``new_key`` (which must be free) without reading its value: the same
        bytes, inline or in their file, under another key. False when ``key`` is missing."""
        self._writable()
        with self._cache.transact(retry=True):
            cur = self._cache._sql("UPDATE Cache SET key = ? WHERE key = ? AND raw = 1", (new_key, key))
            return cur.rowcount > 0

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

    def add_raw(self, key: str, value: bytes) -> bytes:
        """Store ``value`` under ``key`` unless present (atomically); return what the store now holds."""
        self._writable()
        self._cache.add(key, value, retry=True)
        return self._cache.get(key, retry=True)

    def get_raw(self, key: str) -> bytes | None:
        return self._cache.get(key, retry=True)

    def set_raw(self, key: str, value: bytes) -> None:
        self._writable()
        self._cache.set(key, value, retry=True)

    def delete(self, key: str) -> bool:
        self._writable()
        return bool(self._cache.delete(key, retry=True))

    def __contains__(self, key: str) -> bool:
        return key in self._cache

    def keys(self, prefix: str = "") -> list[str]:
        """Keys starting with ``prefix`` (read straight from the index table: no value is decoded)."""
        rows = self._cache._sql("SELECT key FROM Cache WHERE raw = 1 AND key >= ? AND key < ?", (prefix, prefix + "\uffff"))
        return [k for (k,) in rows.fetchall() if isinstance(k, str)]

    def __len__(self) -> int:
        return len(self._cache)

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
        try:
            self._blobs = BlobCache(self.directory, size_limit=self.size_limit, read_only=read_only)
        except StoreError as exc:
            if read_only:
                raise
            raise StoreError(
                f"{exc}. The node store is a cache that can be rebuilt: every node is encoded again from the documents "
                f"when a query needs it. To rebuild it, delete it (`rm -r {self.directory}`) and open the index again; "
                "the documents beside it are kept"
            ) from exc
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
            except Exception:
                theirs = {"unreadable": True}
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


# ---------------------------------------------------------------------- merging shards
@dataclass
class MergeReport:
    """What `merge_stores` did: chunks copied, chunks the target held already, entries refused (with why)."""

    shards: list[str] = field(default_factory=list)
    chunks_added: int = 0
    chunks_present: int = 0
    documents_added: int = 0  # index shards only (`ContextIndex.merge`)
    refused: list[tuple[str, str, str]] = field(default_factory=list)  # (shard, key, reason): corrupt or foreign

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "chunks_added": self.chunks_added,
            "chunks_present": self.chunks_present,
            "documents_added": self.documents_added,
            "refused": [{"shard": s, "key": k, "reason": r} for s, k, r in self.refused],
        }


def shard_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The fingerprint and signature a node store (or shard) was bound to; `StoreError` when it has none."""
    path = Path(directory)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    blobs = BlobCache(path, size_limit=None)
    try:
        raw = blobs.get_raw("manifest")
    finally:
        blobs.close()
    if raw is None:
        raise StoreError(f"{path} holds no bound node store (no manifest): it cannot be checked against the target, so it is not merged")
    return json.loads(raw)


def merge_stores(target: TreeStore, shards: Iterable[str | os.PathLike], *, report: MergeReport | None = None) -> MergeReport:
    """Copy the chunks of node-store ``shards`` that ``target`` lacks into it, byte for byte.

    Every shard is checked first: one bound to another base model or other lower-side options raises
    `StoreMismatchError` before anything is copied. Every entry is checked (magic, checksum, a chunk of this model)
    before it is written; a corrupt or foreign entry is skipped and listed in the report's ``refused`` (a chunk is a
    cache entry: it is encoded again when a query needs it). Content addressing makes the order irrelevant."""
    if target.fingerprint is None or target.signature is None:
        raise ValueError("merge_stores needs a target TreeStore bound to a model (fingerprint= and signature=)")
    report = report if report is not None else MergeReport()
    mine = {"fingerprint": target.fingerprint, "signature": dict(target.signature)}
    dirs = [Path(s) for s in shards]
    for d in dirs:  # all shards checked before any is copied
        held = shard_manifest(d)
        theirs = {"fingerprint": held.get("fingerprint"), "signature": held.get("signature")}
        if theirs != mine:
            raise StoreMismatchError(
                f"the shard {d} was built by base model {theirs['fingerprint']} with lower-side options "
                f"{theirs['signature']}; the target {target.directory} holds {mine['fingerprint']} with {mine['signature']}. "
                "Merge only shards built with the target's model and options (rebuild this one with them)"
            )
    for d in dirs:
        if d.resolve() == Path(target.directory).resolve():
            continue
        shard = BlobCache(d, size_limit=None)
        try:
            for key in shard.keys("chunk/"):
                if key in target:
                    report.chunks_present += 1
                    continue
                try:
                    blob = shard.get_raw(key)
                    if blob is None:  # deleted meanwhile
                        continue
                    _, meta = unpack(blob)
                except (StoreError, UnsafeEntryError) as exc:
                    report.refused.append((str(d), key, str(exc)))
                    continue
                if meta.get("kind") != "chunk" or meta.get("fingerprint") != target.fingerprint:
                    report.refused.append((str(d), key, "not a chunk of this model"))
                    continue
                target.blobs.set_raw(key, blob)
                report.chunks_added += 1
        finally:
            shard.close()
        report.shards.append(str(d))
    for shard, key, reason in report.refused:
        logger.warning("merge: refused entry %s of %s: %s", key, shard, reason)
    return report
