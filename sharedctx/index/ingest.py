"""Adding documents to a ContextIndex: cut into content-defined chunks, encode the chunks the store lacks (in
padded batches, through the model's one `LowerEncoder`) and store their nodes; the document's record is returned for
the index to write (`build_document`).

A chunk is content-addressed: chunks already in the store are reused, never encoded twice; a chunk missing from
the store when a query needs it (evicted, corrupt, or left for later by ``encode="lazy"``) is encoded then.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch

from ..encoder import ChunkNodes, LowerEncoder
from ..errors import InputError, StoreError
from ..model import SharedLLM
from .chunking import chunk_text
from .documents import _Doc, _iter_files
from .results import AddResult
from .settings import BuildOptions
from .store import TreeStore

__all__ = ["ChunkCounts", "build_document", "chunk_nodes", "files_to_add"]

logger = logging.getLogger(__name__)


@dataclass
class ChunkCounts:
    """Chunks a query read from the store and chunks it had to encode."""

    chunks_encoded: int = 0
    chunks_cached: int = 0

    def add(self, other: ChunkCounts) -> None:
        self.chunks_encoded += other.chunks_encoded
        self.chunks_cached += other.chunks_cached


def build_document(
    llm: SharedLLM,
    store: TreeStore,
    doc_id: str,
    text: str,
    metadata: dict[str, Any],
    source: str | None,
    *,
    old: _Doc | None,
    known: Mapping[str, torch.Tensor],
    options: BuildOptions,
) -> tuple[_Doc | None, AddResult]:
    """The record of document ``doc_id`` of ``text`` with its chunks in ``store``: chunks the store lacks are encoded
    and stored (unless deferred by ``encode="lazy"``). ``known`` gives the root keys of chunks the index's documents
    hold, ``old`` the document this one replaces. Returns the record to write (None when ``old`` is the same
    document: nothing to write) and what adding did. Nothing but the store is written here: the caller writes the
    record, after the chunks, so a failed build leaves no record behind."""
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
            store.put_chunk(k, chunk, n_tokens=pending_ids[k].numel())
            for i in pending[k]:
                roots[i] = chunk[(0, 0)].key
        encoded += len(order)
        pending.clear()
        pending_ids.clear()

    for chunk in chunk_text(text, llm.tokenizer, llm.config.chunk_size, min_fill=options.min_fill):
        if chunk.ids.numel() and int(chunk.ids.max()) >= vocab:
            raise InputError(f"the tokenizer produced id {int(chunk.ids.max())} outside the model's vocabulary of {vocab}")
        key = store.key(chunk.ids)
        ids_parts.append(chunk.ids)
        off_parts.append(chunk.offsets)
        keys.append(key)
        roots.append(None)
        i = len(keys) - 1
        if key in pending:  # repeated within this batch: encoded once
            pending[key].append(i)
            reused += 1
            continue
        if key in known and key in store:
            roots[i] = known[key]
            reused += 1
            continue
        stored = store.get_chunk(key)
        if stored is not None and (0, 0) in stored and stored[(0, 0)].key is not None:
            roots[i] = stored[(0, 0)].key
            reused += 1
            continue
        if options.encode == "lazy":
            roots[i] = unknown_root
            deferred += 1
            continue
        pending[key] = [i]
        pending_ids[key] = chunk.ids
        if len(pending) >= options.batch_chunks:
            flush()
    flush()
    if not keys:
        raise InputError(f"document {doc_id!r} has no tokens to index")
    ids = torch.cat(ids_parts)
    lengths = torch.tensor([0] + [p.numel() for p in ids_parts])
    result = AddResult(doc_id, int(ids.numel()), len(keys), encoded, reused, chunks_deferred=deferred, replaced=old is not None)
    if old is not None and old.chunk_keys == keys and old.text == text and old.metadata == metadata:
        result.unchanged, result.replaced = True, False
        return None, result
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
    return doc, result


def chunk_nodes(store: TreeStore, encoder: LowerEncoder, doc: _Doc, c: int, counts: ChunkCounts) -> ChunkNodes:
    """A chunk's nodes from the store, or encoded again (and stored, unless the store is read-only) when missing,
    evicted or corrupt."""
    key = doc.chunk_keys[c]
    nodes = store.get_chunk(key)
    if nodes is not None:
        counts.chunks_cached += 1
        return nodes
    ids = doc.chunk_ids(c)
    if store.key(ids) != key:
        raise StoreError(f"document {doc.doc_id!r} is inconsistent (chunk {c} does not match its address); add it again")
    nodes = encoder.encode_chunks([ids])[0]
    counts.chunks_encoded += 1
    if store.read_only:  # a read-only index encodes in memory only
        return nodes
    try:
        store.put_chunk(key, nodes, n_tokens=ids.numel())
    except StoreError as exc:  # answering still works; the next query encodes it again
        logger.warning("could not store chunk %d of %r: %s", c, doc.doc_id, exc)
    return nodes


def files_to_add(paths: Iterable[str | os.PathLike], *, follow_links: bool) -> tuple[list[Path], list[tuple[str, str]]]:
    """The text files under ``paths`` (files, and directories walked recursively, hidden entries skipped), and the
    entries skipped with why (logged): see `ContextIndex.add_many`."""
    work: list[Path] = []
    skipped: list[tuple[str, str]] = []
    for item in paths:
        if not isinstance(item, (str, os.PathLike)):
            raise InputError(f"add_many() takes paths, got {type(item).__name__}; add texts with add_text()")
        for path, reason in _iter_files(Path(item), follow_links=follow_links):
            if reason is None:
                work.append(path)
            else:
                logger.warning("skipping %s: %s", path, reason)
                skipped.append((str(path), reason))
    return work, skipped
