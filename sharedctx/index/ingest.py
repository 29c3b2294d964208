"""Adding documents to a ContextIndex: cut into content-defined chunks, encode the chunks the store lacks (in
padded batches, through the model's one `LowerEncoder`), store their nodes, then write the document record.

A chunk is content-addressed: chunks already in the store are reused, never encoded twice; a chunk missing from
the store when a query needs it (evicted, corrupt, or left for later by ``encode="lazy"``) is encoded then.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import torch

from ..encoder import ChunkNodes
from ..errors import InputError, StoreError
from .chunking import chunk_text
from .documents import _Doc
from .results import AddResult

#: a `ContextIndex` (not imported here: facade.py imports this module)
ContextIndex = Any

__all__ = ["ChunkCounts", "ingest_text", "chunk_nodes"]

logger = logging.getLogger(__name__)


@dataclass
class ChunkCounts:
    """Chunks a query read from the store and chunks it had to encode."""

    chunks_encoded: int = 0
    chunks_cached: int = 0

    def add(self, other: ChunkCounts) -> None:
        self.chunks_encoded += other.chunks_encoded
        self.chunks_cached += other.chunks_cached


def ingest_text(index: ContextIndex, doc_id: str, text: str, metadata: dict[str, Any], source: str | None) -> AddResult:
    """Add (or replace) the document ``doc_id`` of ``text``; the record is written last, so a failed build leaves
    no record behind."""
    llm = index.llm
    with index._lock:
        old = index._docs.get(doc_id)
        known = {k: d.root_keys[i] for d in index._docs.values() for i, k in enumerate(d.chunk_keys)}
    ids_parts, off_parts, keys, roots = [], [], [], []
    pending: dict[str, list[int]] = {}
    pending_ids: dict[str, torch.Tensor] = {}
    encoded = reused = deferred = 0
    unknown_root = torch.full((llm.base.config.hidden_size,), float("nan"))  # lazy chunks have no key yet
    vocab = llm.base.config.vocab_size

    def flush() -> None:
        nonlocal encoded
        if not pending:
            return
        order = list(pending)
        nodes = llm.encoder.encode_chunks([pending_ids[k] for k in order])
        for k, chunk in zip(order, nodes):
            index.store.put_chunk(k, chunk, n_tokens=pending_ids[k].numel())
            for i in pending[k]:
                roots[i] = chunk[(0, 0)].key
        encoded += len(order)
        pending.clear()
        pending_ids.clear()

    for chunk in chunk_text(text, llm.tokenizer, llm.config.chunk_size, min_fill=index.min_fill):
        if chunk.ids.numel() and int(chunk.ids.max()) >= vocab:
            raise InputError(f"the tokenizer produced id {int(chunk.ids.max())} outside the model's vocabulary of {vocab}")
        key = index.store.key(chunk.ids)
        ids_parts.append(chunk.ids)
        off_parts.append(chunk.offsets)
        keys.append(key)
        roots.append(None)
        i = len(keys) - 1
        if key in pending:  # repeated within this batch: encoded once
            pending[key].append(i)
            reused += 1
            continue
        if key in known and key in index.store:
            roots[i] = known[key]
            reused += 1
            continue
        stored = index.store.get_chunk(key)
        if stored is not None and (0, 0) in stored and stored[(0, 0)].key is not None:
            roots[i] = stored[(0, 0)].key
            reused += 1
            continue
        if index.encode == "lazy":
            roots[i] = unknown_root
            deferred += 1
            continue
        pending[key] = [i]
        pending_ids[key] = chunk.ids
        if len(pending) >= index.batch_chunks:
            flush()
    flush()
    if not keys:
        raise InputError(f"document {doc_id!r} has no tokens to index")
    ids = torch.cat(ids_parts)
    lengths = torch.tensor([0] + [p.numel() for p in ids_parts])
    result = AddResult(doc_id, int(ids.numel()), len(keys), encoded, reused, chunks_deferred=deferred)
    if old is not None and old.chunk_keys == keys and old.text == text and old.metadata == metadata:
        result.unchanged = True
        return result
    doc = _Doc(
        doc_id=doc_id,
        seq=old.seq if old is not None else time.time_ns(),
        text=text,
        ids=ids,
        offsets=torch.cat(off_parts),
        bounds=torch.cumsum(lengths, 0),
        root_keys=torch.stack([r.float() for r in roots]),
        chunk_keys=keys,
        metadata=metadata,
        source=source,
    )
    index.table.put(doc)
    segment = index.lexicon.segment(doc)  # its word counts, written after the record (see sharedctx.index.lexicon)
    with index._lock:
        result.replaced = old is not None
        index._docs[doc_id] = doc
        index.lexicon.put(doc, segment)
        index._forest = None
    return result


def chunk_nodes(index: ContextIndex, doc: _Doc, c: int, counts: ChunkCounts) -> ChunkNodes:
    """A chunk's nodes from the store, or encoded again (and stored, unless the index is read-only) when missing,
    evicted or corrupt."""
    key = doc.chunk_keys[c]
    nodes = index.store.get_chunk(key)
    if nodes is not None:
        counts.chunks_cached += 1
        return nodes
    ids = doc.chunk_ids(c)
    if index.store.key(ids) != key:
        raise StoreError(f"document {doc.doc_id!r} is inconsistent (chunk {c} does not match its address); add it again")
    nodes = index.llm.encoder.encode_chunks([ids])[0]
    counts.chunks_encoded += 1
    if index.store.read_only:  # a read-only index encodes in memory only
        return nodes
    try:
        index.store.put_chunk(key, nodes, n_tokens=ids.numel())
    except StoreError as exc:  # answering still works; the next query encodes it again
        logger.warning("could not store chunk %d of %r: %s", c, doc.doc_id, exc)
    return nodes
