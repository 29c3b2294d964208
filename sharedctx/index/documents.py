"""The documents of a ContextIndex: the on-disk table of documents (usable without a model) and reading files.

Each document record (token ids, character offsets, text, chunk boundaries and chunk root keys) is one checked
safetensors blob in ``DIR/docs``, a diskcache that never evicts and never unpickles (see `sharedctx.index.store`).
Beside it, a small JSON entry per document names its source file and the SHA-256 of its text.

A record that fails its checks is never deleted, not even by a read: it is *quarantined* (moved, bytes untouched,
to ``quarantine/<n>/<doc_id>`` in the same table), reported by `DocumentTable.quarantined` (and so by
``sharedctx index list`` and ``ask``), and `ContextIndex` restores it from its source file when that file still
holds the same text. Nodes are different: they are a cache, and a damaged one is dropped and encoded again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from ..errors import DocumentNotFoundError, InputError, StoreError, UnreadableFileError
from .results import DocumentInfo
from .store import BlobCache, StoreMismatchError, UnsafeEntryError

__all__ = ["DocumentTable", "DocumentNotFoundError", "QuarantinedDocument", "read_document", "text_sha256"]

logger = logging.getLogger(__name__)

_QUARANTINE = "quarantine/"


def text_sha256(text: str) -> str:
    """The content hash a document's source file is checked against before it restores a damaged record."""
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@dataclass
class QuarantinedDocument:
    """A document whose record was damaged and set aside (its bytes kept), with how to get it back."""

    doc_id: str
    key: str  # where the damaged bytes are kept, in DIR/docs
    source: str | None  # the file it was read from, when recorded
    sha256: str | None  # of the text when it was added
    metadata: dict[str, Any] = field(default_factory=dict)
    #: the source file exists and holds the same text: `ContextIndex` restores the record from it when opened
    restorable: bool = False
    why_not: str | None = None

    def advice(self, directory: str | os.PathLike) -> str:
        """One line: which document, where its bytes are, and how to restore it."""
        head = f"document {self.doc_id!r}: its record in {directory} is damaged and was quarantined (bytes kept under {self.key!r})"
        if self.restorable:
            return (f"{head}; its source {self.source} is unchanged, so it is restored automatically the next time the index "
                    f"is opened with a model (`sharedctx ask --store {directory} ...` or `sharedctx index add --store {directory} "
                    f"{self.source}`)")
        return (f"{head}; {self.why_not}. Restore it with `sharedctx index add --store {directory} PATH` from a copy of the "
                f"file, or drop it with `sharedctx index remove --store {directory} {self.doc_id}`")

    def to_dict(self) -> dict[str, Any]:
        return {k: v for k, v in vars(self).items()}



# ---------------------------------------------------------------------- documents
@dataclass
class _Doc:
    doc_id: str
    seq: int
    text: str
    ids: torch.Tensor  # (N,) int64
    offsets: torch.Tensor  # (N, 2) int64 character spans
    bounds: torch.Tensor  # (n_chunks + 1,) token boundaries of the chunks
    root_keys: torch.Tensor  # (n_chunks, hidden) float32
    chunk_keys: list[str]
    metadata: dict[str, Any]
    source: str | None
    #: when this version was written (ns since the epoch; `seq` is when the document was first added, kept on later
    #: edits); 0 until it is written, and in records written before update times were kept
    updated: int = 0

    @property
    def n_chunks(self) -> int:
        return len(self.chunk_keys)

    def chunk_ids(self, c: int) -> torch.Tensor:
        return self.ids[int(self.bounds[c]) : int(self.bounds[c + 1])]

    def info(self) -> DocumentInfo:
        return DocumentInfo(self.doc_id, int(self.ids.numel()), self.n_chunks, len(self.text), self.source, dict(self.metadata))


class DocumentTable:
    """The documents of an index on disk (``DIR/docs``): usable without a model (listing, removing).

    With ``read_only``, an immutable snapshot (`BlobCache`): nothing is written, a damaged record is reported but
    not quarantined, and writes raise `ReadOnlyIndexError`."""

    def __init__(self, directory: str | os.PathLike, *, read_only: bool = False, recover: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        fix = (f"the document records in {self.directory / 'docs'} are the index's source of truth: restore that folder "
               f"from a copy, or build the index again from its files (`sharedctx index add --store NEW_DIR FILES...`)")
        self._blobs = BlobCache(self.directory / "docs", size_limit=None, read_only=read_only, recover=recover, fix=fix)

    # manifest: which model and options built this index
    def manifest(self) -> dict[str, Any] | None:
        """The manifest, None when the index has none yet. A damaged one raises `StoreError` naming it, except in a
        writable table whose node store's manifest is sound: then it is written again from that one (the model and
        lower-side options; the policy and encode mode return to their defaults), with a warning."""
        raw = self._blobs.get_raw("manifest")
        if raw is None:
            return None
        try:
            held = json.loads(raw)
            if isinstance(held, dict) and isinstance(held.get("fingerprint"), str):
                return held
            problem = "it is not a sharedctx manifest"
        except ValueError as exc:
            problem = f"it is not JSON: {exc}"
        where = f"the manifest of the index in {self.directory} (entry 'manifest' of {self.directory / 'docs' / 'cache.db'})"
        nodes = self._node_manifest()
        if nodes is None:
            raise StoreError(
                f"{where} is damaged ({problem}) and the node store's manifest ({self.directory / 'nodes'}) cannot stand in "
                f"for it. The records are kept: restore {self.directory / 'docs'} from a copy, or build a new index from the "
                "files (`sharedctx index add --store NEW_DIR FILES...`)"
            )
        if self.read_only:
            raise StoreError(f"{where} is damaged ({problem}); open the index once without read_only (e.g. `sharedctx "
                             f"index list --store {self.directory}`), which writes it again from its node store's manifest")
        repaired = {"format": "sharedctx-index-1", **nodes}
        self._blobs.set_raw("manifest", json.dumps(repaired, sort_keys=True).encode())
        logger.warning("%s was damaged (%s); wrote it again from the node store's manifest (base model %s): the index's "
                       "policy and encode mode are the defaults again unless given", where, problem, nodes["fingerprint"])
        return repaired

    def _node_manifest(self) -> dict[str, Any] | None:
        """The fingerprint and signature the node store beside the table is bound to, or None when unreadable."""
        nodes = self.directory / "nodes"
        if not (nodes / "cache.db").is_file():
            return None
        try:
            blobs = BlobCache(nodes, read_only=True, recover=True)
            try:
                held = json.loads(blobs.get_raw("manifest") or b"null")
            finally:
                blobs.close()
        except (StoreError, ValueError):
            return None
        if not isinstance(held, dict) or not isinstance(held.get("fingerprint"), str) or not isinstance(held.get("signature"), dict):
            return None
        return {"fingerprint": held["fingerprint"], "signature": held["signature"]}

    def bind(self, manifest: dict[str, Any]) -> None:
        if not self.read_only:
            self._blobs.add_raw("manifest", json.dumps(manifest, sort_keys=True).encode())
        held = self.manifest() or {}
        keys = ("fingerprint", "signature")
        if {k: held.get(k) for k in keys} != {k: manifest.get(k) for k in keys}:
            raise StoreMismatchError(
                f"the index in {self.directory} was built by base model {held.get('fingerprint')} "
                f"({held.get('base', '?')}) with lower-side options {held.get('signature')}; this model is "
                f"{manifest['fingerprint']} ({manifest.get('base', '?')}) with {manifest['signature']}. Open it with the "
                "model and options it was built with, or build a new index in another directory"
            )

    def remember(self, **options: Any) -> None:
        """Record query-side options (``policy``, ``encode``) in the manifest: the index is opened with them next time."""
        held = self.manifest() or {}
        if any(held.get(k) != v for k, v in options.items()):
            self._blobs.set_raw("manifest", json.dumps({**held, **options}, sort_keys=True).encode())

    def ids(self) -> list[str]:
        return [k[4:] for k in self._blobs.keys("doc/")]

    def get(self, doc_id: str, model: Any = None) -> _Doc | None:
        """The record of ``doc_id``; None when missing, or damaged (then quarantined: moved aside, never deleted)."""
        try:
            return self.read(doc_id)
        except (StoreError, UnsafeEntryError) as exc:
            if self.read_only:
                logger.warning("index %s: the record of document %r is damaged (%s); it is left as it is (open read-only): "
                               "open the index without read_only to quarantine and restore it", self.directory, doc_id, exc)
                return None
            where = self._quarantine(doc_id)
            logger.warning("index %s: the record of document %r is damaged (%s); quarantined under %r, see "
                           "`sharedctx index list --store %s`", self.directory, doc_id, exc, where, self.directory)
            return None

    def read(self, doc_id: str) -> _Doc | None:
        """The record of ``doc_id``, None when missing; a damaged one raises `StoreError` and is left as it is."""
        got = self._blobs.read("doc/" + doc_id)
        if got is None:
            return None
        t, meta = got
        try:
            header = json.loads(meta["header"])
            return _Doc(
                doc_id=header["doc_id"],
                seq=int(header["seq"]),
                text=bytes(t["text"].numpy().tobytes()).decode("utf-8"),
                ids=t["ids"].long(),
                offsets=t["offsets"].long(),
                bounds=t["bounds"].long(),
                root_keys=t["root_keys"].float(),
                chunk_keys=list(header["chunk_keys"]),
                metadata=header.get("metadata", {}),
                source=header.get("source"),
                updated=int(header.get("updated", 0)),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the record holds no readable header or tensors ({type(exc).__name__}: {exc})") from exc

    def put(self, doc: _Doc) -> None:
        """Write ``doc``'s record (stamping its update time when it has none) and its source entry."""
        if not doc.updated:
            doc.updated = time.time_ns()
        text = torch.frombuffer(bytearray(doc.text.encode("utf-8")), dtype=torch.uint8)
        tensors = {
            "ids": doc.ids.to(torch.int32),
            "offsets": doc.offsets.to(torch.int64),
            "bounds": doc.bounds.to(torch.int64),
            "root_keys": doc.root_keys.to(torch.float32),
            "text": text,
        }
        header = {
            "doc_id": doc.doc_id,
            "seq": doc.seq,
            "updated": doc.updated,
            "chunk_keys": doc.chunk_keys,
            "metadata": doc.metadata,
            "source": doc.source,
        }
        self._blobs.set("doc/" + doc.doc_id, tensors, {"header": json.dumps(header)})
        source = {"source": doc.source, "sha256": text_sha256(doc.text), "metadata": doc.metadata}
        self._blobs.set_raw("src/" + doc.doc_id, json.dumps(source, sort_keys=True).encode())
        for key in self._quarantine_keys(doc.doc_id):  # a sound record replaces a damaged one
            self._blobs.delete(key)

    def delete(self, doc_id: str) -> bool:
        """Remove a document's record (and any quarantined copy of it); False when there was none."""
        found = self._blobs.delete("doc/" + doc_id)
        for key in self._quarantine_keys(doc_id):
            found = self._blobs.delete(key) or found
        self._blobs.delete("src/" + doc_id)
        return found

    # quarantine: damaged records, set aside with their bytes
    def _quarantine(self, doc_id: str) -> str:
        key = f"{_QUARANTINE}{time.time_ns()}/{doc_id}"
        self._blobs.rename("doc/" + doc_id, key)  # False when another reader moved it first: it is kept either way
        return key

    def _quarantine_entries(self) -> list[tuple[str, str]]:
        """(key, doc_id) of every quarantined record; keys are ``quarantine/<time_ns>/<doc_id>``."""
        return [(k, k[len(_QUARANTINE):].split("/", 1)[1]) for k in self._blobs.keys(_QUARANTINE) if k.count("/") >= 2]

    def _quarantine_keys(self, doc_id: str) -> list[str]:
        return [k for k, d in self._quarantine_entries() if d == doc_id]

    def quarantined(self) -> list[QuarantinedDocument]:
        """The documents whose records are damaged and set aside, each with whether its source can restore it."""
        out = []
        for key, doc_id in self._quarantine_entries():
            src, damaged = self._source_entry(doc_id)
            q = QuarantinedDocument(doc_id, key, src.get("source"), src.get("sha256"), src.get("metadata") or {})
            if damaged:
                q.why_not = f"its source entry ('src/{doc_id}' in {self.directory / 'docs'}) is damaged too ({damaged})"
            elif q.source is None or q.sha256 is None:
                q.why_not = "no source file was recorded for it"
            else:
                try:
                    same = text_sha256(read_document(q.source)) == q.sha256
                except (InputError, OSError) as exc:
                    q.why_not = f"its source cannot be read ({exc})"
                else:
                    q.restorable = same
                    q.why_not = None if same else f"its source {q.source} has changed since it was added"
            out.append(q)
        return out

    def _source_entry(self, doc_id: str) -> tuple[dict[str, Any], str | None]:
        """The source entry of ``doc_id`` (file, SHA-256, metadata) and None, or ``{}`` and why it is unreadable."""
        raw = self._blobs.get_raw("src/" + doc_id)
        if raw is None:
            return {}, None
        try:
            src = json.loads(raw)
        except ValueError as exc:
            return {}, f"not JSON: {exc}"
        if not isinstance(src, dict) or not all(isinstance(src.get(k), (str, type(None))) for k in ("source", "sha256")):
            return {}, "not a source entry"
        if not isinstance(src.get("metadata"), (dict, type(None))):
            src["metadata"] = {}
        return src, None

    def reclaim_orphans(self) -> int:
        """Delete value files no entry refers to, left by an interrupted write (see `BlobCache.reclaim_orphans`)."""
        return self._blobs.reclaim_orphans()

    @property
    def changed(self) -> bool:
        """Read-only: whether a writer changed the table since it was opened."""
        return self._blobs.changed

    def close(self) -> None:
        self._blobs.close()


def read_document(path: str | os.PathLike) -> str:
    """Read a UTF-8 text file; binary, non-UTF-8 and empty files raise `InputError` with the reason."""
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{path} is a directory: use add_many() (or `sharedctx index add DIR`) to add the files in it")
    if not path.is_file():
        raise InputError(f"{path}: no such file" + (" (a broken symbolic link)" if path.is_symlink() else ""))
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise UnreadableFileError(f"{path}: cannot be read ({exc.strerror or exc}); check its permissions") from exc
    if b"\x00" in data[:65536]:
        raise InputError(f"{path}: looks like a binary file (it contains NUL bytes); give a text file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise InputError(f"{path}: not valid UTF-8 (byte {exc.start}); convert it, e.g. `iconv -t utf-8`") from exc
    if not text.strip():
        raise InputError(f"{path}: holds no text")
    return text


def _iter_files(path: Path, *, follow_links: bool = False) -> Iterator[tuple[Path, str | None]]:
    """The files under ``path`` (hidden entries skipped), each with None or the reason it is left out: without
    ``follow_links``, a symbolic link whose target lies outside ``path`` is left out, and linked folders are not
    entered. A file named directly is always taken."""
    if not path.is_dir():
        yield path, None
        return
    root = path.resolve()
    seen: set[Path] = set()
    for here, dirs, files in os.walk(path, followlinks=follow_links):
        real = Path(here).resolve()
        if real in seen:  # a followed link back up the tree would be walked forever
            dirs[:] = []
            continue
        seen.add(real)
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if name.startswith("."):
                continue
            file = Path(here) / name
            if not follow_links and file.is_symlink():
                target = file.resolve()
                if not target.is_relative_to(root):
                    yield file, f"a symbolic link to {target}, outside {path}; pass --follow-links (follow_links=True) to index it"
                    continue
            yield file, None
