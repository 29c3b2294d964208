"""The lexical index of a ContextIndex: BM25 over every chunk's text through inverted postings kept in the store.

The ``lexical`` policy ranks every chunk of every document by BM25 of its text for the question's words. Scanning
each chunk's word counts per query is linear in the corpus; here a query reads only the postings of its own terms.

**What is kept.** For each document, a *segment*: the term frequencies of its chunks (a CSR matrix, chunk x the
document's own terms) counted with `sharedctx.ops.scoring.words`, and a checksum of what they were counted from (the
text, the chunks' character spans and the tokenizer's rules, `tokenizer_id()`), with the tokenizer that counted them
(a segment from before stemming records none: version 1). On disk, one checked safetensors blob per document in
``DIR/lexicon`` (a `BlobCache` like the document table: atomic writes, safe across processes, never pickled; no
JSON beyond the blob's metadata). Segments hold raw counts, never scores, so a document added or removed touches
its own segment only: N, the mean chunk length and document frequencies are applied when a query is scored.

**Kept in sync.** `ContextIndex` writes a document's segment right after its record and drops it with the record;
`merge_into` writes those of the records it copies. A segment is never trusted: it is used only when its checksum
equals the one of the record being indexed. A segment missing (an index made before this module, a writer that
does not know it, a crash between the two writes), counted by another version of the tokenizer (an index from
before stemming upgrades itself so), stale or damaged is counted again from the record's text and written back, with
a log message. Readers of one directory agree because every process checks every segment.

**In memory.** Documents are grouped into *tiers*: immutable CSC postings (term -> chunk rows and their frequencies)
over a group of documents, with each chunk's length and each term's document frequency. New documents form a new
tier; a tier is merged with the next older one when it reaches half its size (so there are O(log n) tiers and each
posting is rebuilt O(log n) times); a tier that loses a document is rebuilt from the segments it keeps (no text is
read again). A query sums the tiers' document frequencies for each of its terms and scores the tiers' postings.

**Why not bm25s.** bm25s (the benchmarks' BM25 baseline) stores the *scores* ``idf(t) * tf-part`` of every
(document, term) in float32 at indexing time, with N, the mean length and the document frequencies baked in: one
added document changes every stored score, so there is no incremental update, only a full re-index. It scores only
its own documents, not other texts (a chunk's nodes) under the same statistics, which the tree walk needs; its Lucene
variant leaves out BM25's ``(k1 + 1)`` factor and its float32 scores differ in the last bits, so scores would
not equal `BM25`'s (the walk's ``expand_margin`` compares them). Its layout is what we keep: CSC postings, a query
reading the columns of its terms. scipy builds the CSC from the segments' CSR rows (``tocsc``, linear time).

Scores equal `sharedctx.ops.scoring.BM25` over the same chunk texts bit for bit: the same float64 operations in
the same order (Lucene idf ``log(1 + (N - df + 0.5) / (df + 0.5))``, k1 = 1.5, b = 0.75), cast to float32.
"""

from __future__ import annotations

import contextlib
import hashlib
import itertools
import logging
import shutil
import threading
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import StoreError
from ..ops.scoring import TOKENIZER_VERSION, bm25_idf, bm25_text_score, tokenizer_id, words
from .documents import _Doc
from .snapshot import is_damaged
from .store import BlobCache

__all__ = ["ChunkLexicon", "LexiconFiles", "LexiconView", "Segment", "chunk_texts", "doc_checksum"]

logger = logging.getLogger(__name__)

FORMAT = "sharedctx-lexicon-1"
#: the tokenizer of segments written before segments recorded theirs (surface words, no stemming)
_FIRST_TOKENIZER = "1"


def chunk_texts(doc: _Doc) -> list[str]:
    """The text of each chunk of ``doc`` (characters from its first token's start to its last token's end)."""
    return [doc.text[a:b] for a, b in _chunk_spans(doc)]


def _chunk_spans(doc: _Doc) -> list[tuple[int, int]]:
    bounds = doc.bounds.tolist()
    offsets = doc.offsets
    out = []
    for t0, t1 in itertools.pairwise(bounds):
        out.append((int(offsets[t0, 0]), int(offsets[t1 - 1, 1])) if t1 > t0 else (0, 0))
    return out


def doc_checksum(doc: _Doc) -> str:
    """What a segment of ``doc`` is checked against: its text, its chunks' character spans, the counting rules."""
    h = hashlib.sha256(f"{FORMAT}\0{tokenizer_id()}\0".encode())
    h.update(np.asarray(_chunk_spans(doc), dtype="<i8").tobytes())
    h.update(doc.text.encode("utf-8"))
    return h.hexdigest()


# ---------------------------------------------------------------------- one document's counts
@dataclass(frozen=True, eq=False)
class Segment:
    """Term frequencies of one document's chunks: row ``c`` holds ``counts[indptr[c]:indptr[c+1]]`` of the terms
    ``terms[local[indptr[c]:indptr[c+1]]]``."""

    doc_id: str
    checksum: str
    terms: tuple[str, ...]  # the document's own vocabulary
    indptr: np.ndarray  # (n_chunks + 1,) int64
    local: np.ndarray  # (nnz,) int32 index into terms
    counts: np.ndarray  # (nnz,) int32, all > 0
    tokenizer: str = field(default_factory=tokenizer_id)  # the rules of `words` that counted them

    @property
    def n_chunks(self) -> int:
        return len(self.indptr) - 1

    @property
    def lengths(self) -> np.ndarray:
        """``(n_chunks,)`` int64: words (stop words dropped) per chunk, BM25's document length."""
        total = np.concatenate([[0], np.cumsum(self.counts, dtype=np.int64)])
        return total[self.indptr[1:]] - total[self.indptr[:-1]]

    @classmethod
    def count(cls, doc_id: str, texts: Iterable[str], checksum: str = "") -> Segment:
        """Count the words of each chunk text."""
        vocab: dict[str, int] = {}
        indptr, local, counts = [0], [], []
        for text in texts:
            for term, n in Counter(words(text)).items():
                local.append(vocab.setdefault(term, len(vocab)))
                counts.append(n)
            indptr.append(len(local))
        return cls(doc_id, checksum, tuple(vocab), np.asarray(indptr, dtype=np.int64),
                   np.asarray(local, dtype=np.int32), np.asarray(counts, dtype=np.int32))

    @classmethod
    def of(cls, doc: _Doc) -> Segment:
        return cls.count(doc.doc_id, chunk_texts(doc), doc_checksum(doc))

    def to_blob(self) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        vocab = np.frombuffer("\n".join(self.terms).encode("utf-8"), dtype=np.uint8).copy()
        tensors = {"indptr": self.indptr, "local": self.local, "counts": self.counts, "vocab": vocab}
        meta = {"kind": "lexicon", "format": FORMAT, "doc_id": self.doc_id, "checksum": self.checksum, "tokenizer": self.tokenizer}
        return {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()}, meta

    @classmethod
    def from_blob(cls, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> Segment:
        raw = bytes(tensors["vocab"].numpy().tobytes()).decode("utf-8")
        seg = cls(meta["doc_id"], meta["checksum"], tuple(raw.split("\n")) if raw else (),
                  tensors["indptr"].numpy().astype(np.int64), tensors["local"].numpy().astype(np.int32),
                  tensors["counts"].numpy().astype(np.int32), meta.get("tokenizer", _FIRST_TOKENIZER))
        n = len(seg.local)
        if (meta.get("format") != FORMAT or seg.indptr[0] != 0 or seg.indptr[-1] != n or len(seg.counts) != n
                or np.any(np.diff(seg.indptr) < 0) or (n and (seg.local.min() < 0 or seg.local.max() >= len(seg.terms)))
                or np.any(seg.counts <= 0)):
            raise ValueError("inconsistent lexicon segment")
        return seg


# ---------------------------------------------------------------------- on disk
class LexiconFiles:
    """``DIR/lexicon``: one checked blob per document's `Segment` (key ``seg/<doc_id>``).

    With ``read_only``, the directory is read as a snapshot when it exists and nothing is ever written (segments
    counted again stay in memory)."""

    def __init__(self, directory: str | Path, *, read_only: bool = False) -> None:
        self.directory = Path(directory)
        self.read_only = read_only
        self._blobs: BlobCache | None = None
        try:
            if not read_only or (self.directory / "cache.db").is_file():
                self._blobs = BlobCache(self.directory, size_limit=None, read_only=read_only)
        except StoreError as exc:
            self._damaged(exc)

    def _damaged(self, exc: StoreError) -> None:
        """The lexicon's database is damaged or unreadable: it is a cache of counts derived from the records, so it
        is deleted and started again (read-only: left as it is, and every document is counted in memory)."""
        if self._blobs is not None:
            with contextlib.suppress(Exception):  # closing a damaged database may fail too; it is dropped either way
                self._blobs.close()
            self._blobs = None
        if not self.read_only and not is_damaged(exc):  # busy, locked, no permission: not ours to delete
            raise exc
        if self.read_only:
            logger.warning("lexicon %s cannot be read (%s); counting every document's words in memory instead (open "
                           "read-only: nothing is written; open the index once without read_only to rebuild it)", self.directory, exc)
            return
        shutil.rmtree(self.directory, ignore_errors=True)
        logger.warning("lexicon %s was damaged (%s); deleted it: every document's words are counted again from its record "
                       "(the lexicon is a cache the records rebuild)", self.directory, exc)
        self._blobs = BlobCache(self.directory, size_limit=None)

    def _guard(self, op: Callable[[BlobCache], Any], default: Any) -> Any:
        """Run ``op`` on the database; when it turns out damaged, start the lexicon again and run ``op`` once more."""
        if self._blobs is None:
            return default
        try:
            return op(self._blobs)
        except StoreError as exc:
            if not is_damaged(exc):
                raise
            self._damaged(exc)
        return default if self._blobs is None else op(self._blobs)

    def load(self, doc_id: str, checksum: str, n_chunks: int | None = None) -> tuple[Segment | None, str]:
        """The segment of ``doc_id`` if counted from what ``checksum`` names (with ``n_chunks`` rows); else None and
        why: ``missing``, ``tokenizer`` (another version of `words`), ``stale`` or ``damaged`` (dropped unless read-only)."""
        if self._blobs is None:
            return None, "missing"
        counts = self._blobs.counts
        corrupt = counts["corrupt"] + counts["refused"]
        got = self._guard(lambda b: b.get("seg/" + doc_id), None)
        if got is None:
            return None, "damaged" if counts["corrupt"] + counts["refused"] > corrupt else "missing"
        try:
            seg = Segment.from_blob(*got)
        except (KeyError, ValueError, UnicodeDecodeError) as exc:
            logger.warning("lexicon %s: the segment of %r is unreadable (%s)", self.directory, doc_id, exc)
            return None, "damaged"
        if seg.doc_id == doc_id and seg.tokenizer != tokenizer_id():
            return None, "tokenizer"
        if seg.doc_id != doc_id or seg.checksum != checksum:
            return None, "stale"
        if n_chunks is not None and seg.n_chunks != n_chunks:
            logger.warning("lexicon %s: the segment of %r has %d chunk rows for a document of %d chunks", self.directory,
                           doc_id, seg.n_chunks, n_chunks)
            return None, "damaged"
        return seg, "ok"

    def save(self, segment: Segment) -> None:
        if not self.read_only:
            self._guard(lambda b: b.set("seg/" + segment.doc_id, *segment.to_blob()), None)

    def delete(self, doc_id: str) -> bool:
        return bool(not self.read_only and self._guard(lambda b: b.delete("seg/" + doc_id), False))

    def ids(self) -> list[str]:
        return [k[4:] for k in self._guard(lambda b: b.keys("seg/"), [])]

    def prune(self, live: Iterable[str]) -> int:
        """Delete the segments of documents not in ``live``; returns how many. List first, then read ``live``
        (the table's ids on disk now): a segment written after its record is never taken for an orphan."""
        candidates = self.ids()
        keep = set(live)
        return sum(self.delete(d) for d in candidates if d not in keep)

    def close(self) -> None:
        if self._blobs is not None:
            self._blobs.close()


# ---------------------------------------------------------------------- postings over a group of documents
@dataclass(frozen=True, eq=False)
class _Held:
    """A document's segment as indexed: the record it was counted from and its terms' global ids."""

    doc: _Doc
    segment: Segment
    gids: np.ndarray  # (len(segment.terms),) int32


@dataclass(frozen=True, eq=False)
class _Tier:
    """Immutable CSC postings over a group of documents: term ``g``'s chunks are ``rows[indptr[g]:indptr[g+1]]``
    with frequencies ``tf[...]``; ``df[g]`` = how many chunks hold it."""

    members: dict[str, _Held]
    spans: dict[str, tuple[int, int]]  # doc_id -> its rows [start, stop)
    indptr: np.ndarray  # (n_terms + 1,)
    rows: np.ndarray  # (nnz,) int32
    tf: np.ndarray  # (nnz,) int32
    lengths: np.ndarray  # (n_rows,) int64
    total_length: int

    @property
    def nnz(self) -> int:
        return len(self.rows)

    @property
    def n_rows(self) -> int:
        return len(self.lengths)

    def df(self, g: int) -> int:
        return int(self.indptr[g + 1] - self.indptr[g]) if g + 1 < len(self.indptr) else 0

    @classmethod
    def build(cls, held: Sequence[_Held], n_terms: int) -> _Tier:
        from scipy.sparse import csr_matrix

        spans, start = {}, 0
        for h in held:
            spans[h.segment.doc_id] = (start, start + h.segment.n_chunks)
            start += h.segment.n_chunks
        per_row = [np.diff(h.segment.indptr) for h in held]
        indptr = np.concatenate([[0], np.cumsum(np.concatenate(per_row or [np.zeros(0, np.int64)]))]).astype(np.int64)
        cols = np.concatenate([h.gids[h.segment.local] for h in held] or [np.zeros(0, np.int32)])
        data = np.concatenate([h.segment.counts for h in held] or [np.zeros(0, np.int32)])
        csc = csr_matrix((data, cols, indptr), shape=(start, n_terms)).tocsc()
        lengths = np.concatenate([h.segment.lengths for h in held] or [np.zeros(0, np.int64)])
        return cls({h.segment.doc_id: h for h in held}, spans, csc.indptr.astype(np.int64), csc.indices.astype(np.int32),
                   csc.data.astype(np.int32), lengths, int(lengths.sum()))


# ---------------------------------------------------------------------- scoring
@dataclass(frozen=True, eq=False)
class LexiconView:
    """BM25 over a fixed set of chunks (a `Forest`'s), in the caller's order; immutable, safe to share.

    ``scores(query)`` scores those chunks, ``scores(query, texts)`` other texts (a chunk's nodes) under the same
    statistics: the interface and the results of `sharedctx.ops.scoring.BM25` over the same chunk texts."""

    tiers: tuple[_Tier, ...]
    vocab: dict[str, int]
    order: np.ndarray  # (n,) the caller's chunk i is row order[i] of the tiers' rows end to end
    k1: float = 1.5
    b: float = 0.75
    n: int = field(init=False)
    avg_len: float = field(init=False)

    def __post_init__(self) -> None:
        n = sum(t.n_rows for t in self.tiers)
        object.__setattr__(self, "n", n)
        object.__setattr__(self, "avg_len", (sum(t.total_length for t in self.tiers) / n) if n else 0.0)

    def df(self, term: str) -> int:
        g = self.vocab.get(term)
        return 0 if g is None else sum(t.df(g) for t in self.tiers)

    def idf(self, term: str) -> float:
        return bm25_idf(self.n, self.df(term))

    def scores(self, query: str, texts: Sequence[str] | None = None) -> torch.Tensor:
        """``(N,)`` float32 scores of the chunks (or of ``texts``) for ``query``."""
        terms = list(dict.fromkeys(words(query)))
        if texts is not None:
            return torch.tensor([self._score(terms, Counter(words(t))) for t in texts], dtype=torch.float32)
        k1, b, avg = self.k1, self.b, self.avg_len
        out = np.zeros(self.n, dtype=np.float64)
        offsets = np.cumsum([0] + [t.n_rows for t in self.tiers])
        norms: dict[int, np.ndarray] = {}
        for term in terms:
            g = self.vocab.get(term)
            if g is None:
                continue
            df = sum(t.df(g) for t in self.tiers)
            if not df:
                continue
            idf = bm25_idf(self.n, df)
            for i, tier in enumerate(self.tiers):
                if not tier.df(g):
                    continue
                a, z = tier.indptr[g], tier.indptr[g + 1]
                rows, tf = tier.rows[a:z], tier.tf[a:z]
                if i not in norms:  # the same operations, in the same order, as BM25._score
                    norms[i] = k1 * (1.0 - b + b * tier.lengths / avg) if avg else np.full(tier.n_rows, k1)
                out[offsets[i] + rows] += idf * tf * (k1 + 1.0) / (tf + norms[i][rows])
        return torch.from_numpy(out[self.order].astype(np.float32))

    def _score(self, terms: list[str], counts: Counter) -> float:
        return bm25_text_score(terms, counts, self.idf, k1=self.k1, b=self.b, avg_len=self.avg_len)


# ---------------------------------------------------------------------- the index's lexicon
class ChunkLexicon:
    """The documents' segments, their tiers of postings, and views for a set of documents.

    Args:
        directory: where segments are kept (``DIR/lexicon``); None keeps them in memory only.
        read_only: never write (see `LexiconFiles`).

    The owner tells it which documents the index holds (`sync`, `put`, `remove`, under the owner's lock, so that
    the lexicon and the documents change together); segments are loaded or counted when a view needs them (or at
    once with ``sync(..., load=True)``).
    """

    def __init__(self, directory: str | Path | None = None, *, read_only: bool = False, k1: float = 1.5, b: float = 0.75) -> None:
        self.files = LexiconFiles(directory, read_only=read_only) if directory is not None else None
        self.k1, self.b = k1, b
        self.vocab: dict[str, int] = {}
        self._wanted: dict[str, _Doc] = {}
        self._held: dict[str, _Held] = {}
        self._tiers: list[_Tier] = []
        self._built = True
        self._lock = threading.RLock()

    # what the index holds
    def sync(self, docs: Iterable[_Doc], *, load: bool = False) -> None:
        """Index exactly ``docs`` (their records, by identity): documents gone are dropped, new or changed ones are
        loaded from their segments (or counted) now with ``load``, else when a view needs them."""
        with self._lock:
            wanted = {d.doc_id: d for d in docs}
            if wanted.keys() != self._wanted.keys() or any(self._wanted[k] is not d for k, d in wanted.items()):
                self._wanted = wanted
                self._built = False
            if load:
                self._resolve()

    def segment(self, doc: _Doc) -> Segment:
        """The segment of ``doc`` counted from its text and written to disk (call it outside the owner's lock)."""
        seg = Segment.of(doc)
        if self.files is not None:
            self.files.save(seg)
        return seg

    def put(self, doc: _Doc, segment: Segment | None = None) -> None:
        """``doc`` (new or replacing its earlier version) is in the index, with its segment when already counted."""
        with self._lock:
            self._wanted[doc.doc_id] = doc
            self._built = False
            if segment is not None and segment.checksum == doc_checksum(doc) and segment.n_chunks == doc.n_chunks:
                self._hold(doc, segment)

    def remove(self, doc_id: str) -> None:
        """``doc_id`` left the index: dropped here and its segment deleted from disk."""
        with self._lock:
            self._wanted.pop(doc_id, None)
            self._built = False
            if self.files is not None:
                self.files.delete(doc_id)

    def prune(self, live: Iterable[str]) -> int:
        """Delete kept segments of documents not in ``live`` (read after the segments are listed); how many."""
        return 0 if self.files is None else self.files.prune(live)

    def view(self, docs: Sequence[_Doc]) -> LexiconView:
        """BM25 over the chunks of ``docs``, in that order (document by document, chunks in order)."""
        with self._lock:
            self.sync(docs)
            self._resolve()
            tiers = tuple(self._tiers)
            start, where = 0, {}
            for tier in tiers:
                for doc_id, (a, z) in tier.spans.items():
                    where[doc_id] = (start + a, z - a)
                start += tier.n_rows
            firsts = np.asarray([where[d.doc_id][0] for d in docs], dtype=np.int64)
            sizes = np.asarray([where[d.doc_id][1] for d in docs], dtype=np.int64)
            order = np.repeat(firsts - (np.cumsum(sizes) - sizes), sizes) + np.arange(int(sizes.sum()), dtype=np.int64)
            return LexiconView(tiers, self.vocab, order, self.k1, self.b)

    def close(self) -> None:
        if self.files is not None:
            self.files.close()

    # internals
    def _hold(self, doc: _Doc, segment: Segment) -> None:
        vocab = self.vocab
        gids = np.fromiter((vocab.setdefault(t, len(vocab)) for t in segment.terms), dtype=np.int32, count=len(segment.terms))
        self._held[doc.doc_id] = _Held(doc, segment, gids)

    def _resolve(self) -> None:
        """Bring the held segments and the tiers to the wanted documents."""
        if self._built:
            return
        for doc_id in [d for d in self._held if d not in self._wanted]:
            del self._held[doc_id]
        why: Counter[str] = Counter()
        for doc_id, doc in self._wanted.items():
            held = self._held.get(doc_id)
            if held is not None and held.doc is doc:
                continue
            checksum = doc_checksum(doc)
            if held is not None and held.segment.checksum == checksum:  # the same content, read again
                self._held[doc_id] = _Held(doc, held.segment, held.gids)
                continue
            seg, state = self.files.load(doc_id, checksum, doc.n_chunks) if self.files is not None else (None, "memory")
            if seg is None:
                seg = Segment.count(doc_id, chunk_texts(doc), checksum)
                if self.files is not None:
                    why[state] += 1
                    self.files.save(seg)
            self._hold(doc, seg)
        where = self.files.directory if self.files else "-"
        kept = "" if self.files is None or not self.files.read_only else "; not written back (open read-only)"
        if why["tokenizer"]:
            logger.info("lexicon %s: upgraded the word counts of %d documents to tokenizer version %d (words reduced to their "
                        "Snowball stems): they were counted by another version, and were counted again from their text%s",
                        where, why.pop("tokenizer"), TOKENIZER_VERSION, kept)
        if why:
            level = logging.WARNING if why["stale"] or why["damaged"] else logging.INFO
            logger.log(level, "lexicon %s: counted the words of %d documents again from their text, as their kept counts were "
                       "missing (%d: an index from before the lexicon, or added by a writer without it), stale (%d) or damaged (%d)%s",
                       where, sum(why.values()), why["missing"], why["stale"], why["damaged"], kept)
        self._rebuild_tiers()
        self._built = True

    def _rebuild_tiers(self) -> None:
        tiers, placed = [], set()
        for tier in self._tiers:
            live = [h for d, h in tier.members.items() if self._held.get(d) is h]
            if len(live) == len(tier.members):
                tiers.append(tier)
            elif live:  # lost documents: rebuilt from the segments it keeps
                tiers.append(_Tier.build(live, len(self.vocab)))
            placed.update(h.segment.doc_id for h in live)
        new = [h for d, h in self._held.items() if d not in placed]
        if new:
            tiers.append(_Tier.build(new, len(self.vocab)))
        tiers.sort(key=lambda t: -t.nnz)
        while len(tiers) > 1 and 2 * tiers[-1].nnz >= tiers[-2].nnz:
            newer, older = tiers.pop(), tiers.pop()
            tiers.append(_Tier.build([*older.members.values(), *newer.members.values()], len(self.vocab)))
            tiers.sort(key=lambda t: -t.nnz)
        self._tiers = tiers
