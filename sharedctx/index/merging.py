"""Merging into an index: node-store shards (written by `sharedctx.distributed.build_index`) or whole index
directories, checked against the index's manifest before anything is copied. Needs no model."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable

from ..errors import StoreMismatchError
from .documents import DocumentTable
from .lexicon import LexiconFiles, Segment
from .store import MergeReport, TreeStore, merge_stores

__all__ = ["merge_into"]


def merge_into(table: DocumentTable, store: TreeStore, shards: Iterable[str | os.PathLike]) -> MergeReport:
    """Merge ``shards`` into the index of ``table`` and ``store`` (usable without a model; see `ContextIndex.merge`).

    A shard is a node store (a directory `TreeStore` bound to a model) or an index directory (``docs`` and
    ``nodes``). All shards are checked against the index's manifest before anything is copied."""
    held = table.manifest() or {}
    mine = {k: held.get(k) for k in ("fingerprint", "signature")}
    nodes: list[Path] = []
    indexes: list[Path] = []
    for shard in map(Path, shards):
        if (shard / "docs").is_dir():
            theirs = DocumentTable(shard)
            manifest = theirs.manifest() or {}
            theirs.close()
            if {k: manifest.get(k) for k in mine} != mine:
                raise StoreMismatchError(
                    f"the index {shard} was built by base model {manifest.get('fingerprint')} with lower-side options "
                    f"{manifest.get('signature')}; the target {table.directory} by {mine['fingerprint']} with "
                    f"{mine['signature']}. Merge only indexes built with the same model and options"
                )
            indexes.append(shard)
            nodes.append(shard / "nodes")
        else:
            nodes.append(shard)
    report = merge_stores(store, nodes)
    lexicon = LexiconFiles(table.directory / "lexicon")  # the copied documents' word counts
    for shard in indexes:
        theirs = DocumentTable(shard)
        try:
            for doc_id in theirs.ids():
                doc = theirs.get(doc_id)
                if doc is None:
                    continue
                old = table.get(doc_id)
                if old is not None and old.seq >= doc.seq:
                    continue
                table.put(doc)
                lexicon.save(Segment.of(doc))
                report.documents_added += 1
        finally:
            theirs.close()
    lexicon.close()
    return report
