"""The documents an open index holds in memory (`LiveDocuments`, under one lock) and the `Forest` over them: every
chunk of every document in document order, with what ranking reads (root keys, token counts, BM25 statistics,
embeddings). Retrieval reads a forest; adding and deleting documents change the live set, which makes a new forest
on the next question."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

import torch

from ..policy import chunk_state_budget
from .documents import _Doc
from .embedding import ChunkEmbeddings, DenseView
from .lexicon import ChunkLexicon, LexiconView, Segment

__all__ = ["Forest", "LiveDocuments"]


@dataclass
class Forest:
    """Every chunk of every document in document order, their root keys and token counts, and BM25 over their
    text (a `LexiconView` of the index's kept lexicon, else one counted on first use). Rebuilt when documents
    change."""

    entries: list[tuple[_Doc, int]]
    root_keys: torch.Tensor  # (n_chunks, hidden)
    n_tokens: list[int]  # (n_chunks,) tokens of each chunk
    docs: list[_Doc] = field(default_factory=list, repr=False)
    _lexicon: LexiconView | None = field(default=None, repr=False)
    _dense: DenseView | None = field(default=None, repr=False)
    _budgets: dict[tuple, list[int]] = field(default_factory=dict, repr=False)

    @classmethod
    def of(cls, docs: list[_Doc], hidden: int, lexicon: ChunkLexicon | None = None) -> Forest:
        """The forest of ``docs``; with ``lexicon`` (the index's), its view of them is made now, under the caller's
        lock, so that the documents and their statistics are the same set."""
        docs = sorted(docs, key=lambda d: (d.seq, d.doc_id))
        entries = [(d, c) for d in docs for c in range(d.n_chunks)]
        keys = torch.cat([d.root_keys for d in docs]) if docs else torch.zeros(0, hidden)
        n_tokens = torch.cat([d.bounds.diff() for d in docs]).tolist() if docs else []
        return cls(entries, keys, n_tokens, docs, None if lexicon is None else lexicon.view(docs))

    def lexicon(self) -> LexiconView:
        if self._lexicon is None:
            self._lexicon = ChunkLexicon().view(self.docs)
        return self._lexicon

    def dense(self, embeddings: ChunkEmbeddings) -> DenseView:
        """The piece embeddings of the forest's chunks (documents not embedded yet are embedded now, once)."""
        if self._dense is None:
            self._dense = embeddings.view(self.docs)
        return self._dense

    def budgets(self, *, keep: int, height: int, expand_margin: float | None) -> list[int]:
        """`chunk_state_budget` of every chunk, computed once per forest (not per query)."""
        key = (keep, height, expand_margin)
        if key not in self._budgets:
            memo = {n: chunk_state_budget(n, keep=keep, height=height, expand_margin=expand_margin) for n in set(self.n_tokens)}
            self._budgets[key] = [memo[n] for n in self.n_tokens]
        return self._budgets[key]


class LiveDocuments:
    """The documents of an open index by id, with the lexicon that follows them, under one lock; `forest` is the
    `Forest` over them, made on first use after a change (with the lexicon's view of the same set when
    ``rank_by_lexicon``, the ``lexical`` policy)."""

    def __init__(self, hidden: int, lexicon: ChunkLexicon, *, rank_by_lexicon: bool) -> None:
        self.hidden, self.lexicon, self.rank_by_lexicon = hidden, lexicon, rank_by_lexicon
        self.lock = threading.RLock()
        self._docs: dict[str, _Doc] = {}
        self._forest: Forest | None = None

    def __len__(self) -> int:
        return len(self._docs)

    def __contains__(self, doc_id: str) -> bool:
        return doc_id in self._docs

    def get(self, doc_id: str) -> _Doc | None:
        return self._docs.get(doc_id)

    def all(self) -> list[_Doc]:
        """The documents in the order they were first added."""
        with self.lock:
            return sorted(self._docs.values(), key=lambda d: (d.seq, d.doc_id))

    def known_roots(self) -> dict[str, torch.Tensor]:
        """The root key of every chunk the documents hold, by chunk address."""
        with self.lock:
            return {k: d.root_keys[i] for d in self._docs.values() for i, k in enumerate(d.chunk_keys)}

    def chunk_keys(self) -> set[str]:
        with self.lock:
            return {k for d in self._docs.values() for k in d.chunk_keys}

    def put(self, doc: _Doc, segment: Segment | None = None) -> None:
        """Add or replace a document (its word counts go to the lexicon with it)."""
        with self.lock:
            self._docs[doc.doc_id] = doc
            self.lexicon.put(doc, segment)
            self._forest = None

    def remove(self, doc_id: str) -> None:
        with self.lock:
            self._docs.pop(doc_id, None)
            self.lexicon.remove(doc_id)
            self._forest = None

    def sync(self, docs: dict[str, _Doc]) -> None:
        """Hold exactly ``docs`` (a document table as read): documents gone are dropped, changed ones replaced."""
        with self.lock:
            for doc_id in [d for d in self._docs if d not in docs]:
                del self._docs[doc_id]
            for doc_id, doc in docs.items():
                old = self._docs.get(doc_id)
                if old is None or old.chunk_keys != doc.chunk_keys or old.seq != doc.seq:
                    self._docs[doc_id] = doc
            self._forest = None

    def forest(self) -> Forest:
        with self.lock:
            if self._forest is None:
                lexicon = self.lexicon if self.rank_by_lexicon else None  # its view is made here, under the lock
                self._forest = Forest.of(list(self._docs.values()), self.hidden, lexicon)
            return self._forest
