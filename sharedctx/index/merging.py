"""Merging node-store shards and whole indexes into an index (`ContextIndex.merge`, ``sharedctx index merge``).

A merge never changes its sources: every shard is read as a snapshot (`sharedctx.index.snapshot`; a shard whose
writer died with writes in its journal is read from a checkpointed copy), so a read-only shard merges and a folder
that is refused is left as it was. Everything a merge leaves out is listed in its report:

- chunks: corrupt, foreign or missing entries (``refused``; a chunk is a cache entry, encoded again when needed);
- documents: damaged or quarantined records of an index shard, and records that cannot join the target (a lazily
  added record without chunk keys, for an eager index) (``refused``);
- the same document in both with different contents (``conflicts``): the copy written last wins, by the update time
  each record keeps (`_Doc.updated`; `_Doc.seq` is when a document was first added and survives edits); when the
  times cannot tell (records from before update times were kept), the target's copy is kept and the shard's refused.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import torch

from ..errors import StoreError, StoreMismatchError, UnsafeEntryError
from .documents import DocumentTable, _Doc
from .lexicon import LexiconFiles, Segment
from .store import BlobCache, TreeStore, unpack

__all__ = ["MergeReport", "merge_into", "merge_stores", "shard_manifest"]

logger = logging.getLogger(__name__)


@dataclass
class MergeReport:
    """What a merge did: chunks copied or already there, documents copied or already there, and everything it
    left out (``refused``: shard, key, why) or decided between (``conflicts``: shard, document, what was kept)."""

    shards: list[str] = field(default_factory=list)
    chunks_added: int = 0
    chunks_present: int = 0
    documents_added: int = 0  # index shards only
    documents_present: int = 0  # the same record was in the target already
    refused: list[tuple[str, str, str]] = field(default_factory=list)
    conflicts: list[tuple[str, str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "shards": list(self.shards),
            "chunks_added": self.chunks_added,
            "chunks_present": self.chunks_present,
            "documents_added": self.documents_added,
            "documents_present": self.documents_present,
            "refused": [{"shard": s, "key": k, "reason": r} for s, k, r in self.refused],
            "conflicts": [{"shard": s, "doc_id": d, "resolution": r} for s, d, r in self.conflicts],
        }


def _open_shard(path: Path) -> BlobCache:
    """A node store or ``docs`` folder of a merge source, read-only (never written, not even its settings)."""
    if not (path / "cache.db").is_file():
        raise StoreError(f"{path} holds no sharedctx store or index (no cache.db, no docs/ folder): give a node-store shard "
                         "of a distributed build or an index directory; nothing was merged")
    return BlobCache(path, read_only=True, recover=True,
                     fix=f"this merge source is damaged: rebuild the shard, or leave {path} out of the merge")


def shard_manifest(directory: str | os.PathLike) -> dict[str, Any]:
    """The fingerprint and signature a node store (or shard) was bound to; `StoreError` when it has none or a
    damaged one. Read-only: the shard is not changed."""
    path = Path(directory)
    if not path.is_dir():
        raise StoreError(f"{path}: no such store directory")
    blobs = _open_shard(path)
    try:
        raw = blobs.get_raw("manifest")
    finally:
        blobs.close()
    if raw is None:
        raise StoreError(f"{path} holds no bound node store (no manifest): it cannot be checked against the target, so it is not merged")
    try:
        held = json.loads(raw)
        if not isinstance(held, dict):
            raise ValueError("not a JSON object")
    except ValueError as exc:
        raise StoreError(f"the manifest of the node store {path} is damaged ({exc}): it cannot be checked against the target, "
                         "so nothing was merged; rebuild this shard, or leave it out of the merge") from exc
    return held


def merge_stores(target: TreeStore, shards: Iterable[str | os.PathLike], *, report: MergeReport | None = None) -> MergeReport:
    """Copy the chunks of node-store ``shards`` that ``target`` lacks into it, byte for byte.

    Every shard is checked first: one bound to another base model or other lower-side options raises
    `StoreMismatchError` before anything is copied. Every entry is checked (magic, checksum, a chunk of this model)
    before it is written; a corrupt, foreign or missing entry is skipped and listed in the report's ``refused``.
    Content addressing makes the order irrelevant. The shards are only read."""
    if target.fingerprint is None or target.signature is None:
        raise ValueError("merge_stores needs a target TreeStore bound to a model (fingerprint= and signature=)")
    report = report if report is not None else MergeReport()
    before = len(report.refused)
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
        shard = _open_shard(d)
        try:
            for key in shard.keys("chunk/"):
                if key in target:
                    report.chunks_present += 1
                    continue
                try:
                    blob = shard.fetch_raw(key)
                    if blob is None:
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
    for shard, key, reason in report.refused[before:]:
        logger.warning("merge: refused entry %s of %s: %s", key, shard, reason)
    return report


def merge_into(table: DocumentTable, store: TreeStore, shards: Iterable[str | os.PathLike]) -> MergeReport:
    """Merge ``shards`` into the index of ``table`` and ``store`` (usable without a model; see `ContextIndex.merge`).

    A shard is a node store (a directory `TreeStore` bound to a model) or an index directory (``docs`` and
    ``nodes``). All shards are checked against the index's manifest before anything is copied; none is written."""
    held = table.manifest() or {}
    mine = {k: held.get(k) for k in ("fingerprint", "signature")}
    nodes: list[Path] = []
    indexes: list[Path] = []
    given = [Path(s) for s in shards]
    for shard in given:
        if (shard / "docs").is_dir():
            theirs = DocumentTable(shard, read_only=True, recover=True)
            try:
                manifest = theirs.manifest() or {}
            finally:
                theirs.close()
            if {k: manifest.get(k) for k in mine} != mine:
                raise StoreMismatchError(
                    f"the index {shard} was built by base model {manifest.get('fingerprint')} with lower-side options "
                    f"{manifest.get('signature')}; the target {table.directory} by {mine['fingerprint']} with "
                    f"{mine['signature']}. Merge only indexes built with the same model and options"
                )
            indexes.append(shard)
            if (shard / "nodes" / "cache.db").is_file():
                nodes.append(shard / "nodes")
        else:
            nodes.append(shard)
    report = MergeReport()
    merge_stores(store, nodes, report=report)
    chunks_refused = len(report.refused)
    report.shards = [str(s) for s in given]
    eager = held.get("encode", "eager") != "lazy"
    lexicon = LexiconFiles(table.directory / "lexicon")  # the copied documents' word counts
    try:
        for shard in indexes:
            theirs = DocumentTable(shard, read_only=True, recover=True)
            try:
                _merge_documents(table, store, theirs, str(shard), eager, lexicon, report)
            finally:
                theirs.close()
    finally:
        lexicon.close()
    for shard, key, reason in report.refused[chunks_refused:]:
        logger.warning("merge: left out %s of %s: %s", key, shard, reason)
    for shard, doc_id, resolution in report.conflicts:
        logger.warning("merge: document %r is in both %s and the target with other contents: %s", doc_id, shard, resolution)
    return report


def _merge_documents(table: DocumentTable, store: TreeStore, theirs: DocumentTable, shard: str, eager: bool,
                     lexicon: LexiconFiles, report: MergeReport) -> None:
    for q in theirs.quarantined():
        report.refused.append((shard, q.key, f"the record of document {q.doc_id!r} is damaged and quarantined in the shard; "
                                             f"restore it there first (`sharedctx index list --store {shard}` says how)"))
    for doc_id in theirs.ids():
        try:
            doc = theirs.read(doc_id)
        except (StoreError, UnsafeEntryError) as exc:
            report.refused.append((shard, "doc/" + doc_id, f"the record of document {doc_id!r} is damaged ({exc}); open the "
                                                           f"shard once without read_only to quarantine and restore it"))
            continue
        if doc is None:
            continue
        old = table.get(doc_id)
        if old is not None and _same(old, doc):
            report.documents_present += 1
            continue
        if old is not None:
            newer = old.updated and doc.updated and doc.updated != old.updated
            if not newer:
                report.refused.append((shard, "doc/" + doc_id, f"document {doc_id!r} differs from the target's and the "
                                       "records cannot tell which is newer (written before update times were kept): kept the "
                                       f"target's; to take the shard's, remove it from the target (`sharedctx index remove "
                                       f"--store {table.directory} {doc_id}`) and merge again"))
                continue
            if old.updated > doc.updated:
                report.conflicts.append((shard, doc_id, f"kept the target's copy, written later ({_when(old)}) than the "
                                                       f"shard's ({_when(doc)})"))
                continue
            report.conflicts.append((shard, doc_id, f"took the shard's copy, written later ({_when(doc)}) than the "
                                                   f"target's ({_when(old)})"))
            doc.seq = min(doc.seq, old.seq)
        if eager and bool(torch.isnan(doc.root_keys).any()) and not _fill_keys(doc, store):
            report.refused.append((shard, "doc/" + doc_id, f"document {doc_id!r} was added lazily (its chunks have no keys) "
                                   f"and the target {table.directory} is an eager index, which ranks chunks by their keys: add "
                                   f"its file to the target (`sharedctx index add --store {table.directory} FILE`), or merge "
                                   "into a lazy index"))
            continue
        table.put(doc)
        lexicon.save(Segment.of(doc))
        report.documents_added += 1


def _same(a: _Doc, b: _Doc) -> bool:
    return a.text == b.text and a.chunk_keys == b.chunk_keys and a.metadata == b.metadata and a.source == b.source


def _when(doc: _Doc) -> str:
    import datetime

    return datetime.datetime.fromtimestamp(doc.updated / 1e9, tz=datetime.timezone.utc).isoformat(timespec="milliseconds")


def _fill_keys(doc: _Doc, store: TreeStore) -> bool:
    """Give a lazily added record the root keys of its chunks from ``store``; False when a chunk is not stored."""
    roots = doc.root_keys.clone()
    for c, key in enumerate(doc.chunk_keys):
        if not bool(torch.isnan(roots[c]).any()):
            continue
        nodes = store.get_chunk(key)
        if nodes is None or (0, 0) not in nodes or nodes[(0, 0)].key is None:
            return False
        roots[c] = nodes[(0, 0)].key.float()
    doc.root_keys = roots
    return True
