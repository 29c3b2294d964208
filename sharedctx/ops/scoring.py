"""Scores of nodes for a query: cosine between hidden-state keys, BM25 between texts (the ``lexical`` policy), and
reciprocal rank fusion of several rankings (the index's ``hybrid`` ranker).

`words` is THE lexical tokenizer: the in-memory `BM25`, the index's inverted lexicon (`sharedctx.index.lexicon`) and
the lexical tree walk all count its terms. It lower-cases, splits on ``\\w+``, drops English stop words and reduces each
word to its Snowball English (Porter2) stem, so "founded", "founding" and "founds" are one term. Counts kept on disk
record `tokenizer_id()`, and counts made by another version of these rules are counted again.
"""

from __future__ import annotations

import functools
import hashlib
import math
import re
import threading
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

from ..errors import MissingDependencyError

__all__ = [
    "cosine_scores",
    "BM25",
    "bm25_idf",
    "bm25_text_score",
    "words",
    "reciprocal_rank_fusion",
    "competition_ranks",
    "RRF_K",
    "tokenizer_id",
    "TOKENIZER_VERSION",
]


def cosine_scores(query_key: torch.Tensor, node_keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``query_key (H,)`` with each row of ``node_keys (N, H)``; returns ``(N,)`` float32."""
    q = query_key.to(torch.float32).reshape(1, -1)
    k = node_keys.to(device=q.device, dtype=torch.float32)
    return F.cosine_similarity(k, q.expand_as(k), dim=-1)


_WORD = re.compile(r"\w+", re.UNICODE)
#: common English function words, dropped from queries and texts
STOPWORDS = frozenset(
    """a about above after again all am an and any are as at be because been before being below between both but by
    can could did do does doing down during each few for from further had has have having he her here hers herself him
    himself his how i if in into is it its itself just me more most my myself no nor not of off on once only or other
    our ours out over own same she should so some such than that the their theirs them themselves then there these they
    this those through to too under until up very was we were what when where which while who whom why will with would
    you your yours yourself""".split()
)


#: the version of `words`' rules: 1 kept the surface words; 2 reduces them to Snowball English stems
TOKENIZER_VERSION = 2
_STEMMER_ALGORITHM = "english"
_local = threading.local()  # PyStemmer's stemmer objects are not thread-safe: one per thread
#: word -> its stem ("" for a stop word), shared by threads (dict reads and writes are atomic); at most _MAX_STEMS words
_TERMS: dict[str, str] = {}
_MAX_STEMS = 1 << 20


def _pystemmer():
    try:
        import Stemmer  # PyStemmer: the Snowball algorithms, compiled (a core dependency of sharedctx)
    except ImportError as exc:
        raise MissingDependencyError(
            "the lexical tokenizer stems words with PyStemmer, which is not installed: `pip install PyStemmer` "
            "(a dependency of sharedctx; reinstall sharedctx to get it)"
        ) from exc
    return Stemmer


@functools.cache
def tokenizer_id() -> str:
    """What counts made by `words` are labelled with: `TOKENIZER_VERSION` and a digest of the word pattern, the stop
    words and the stemmer (algorithm and library version), so that counts kept under other rules are found stale."""
    rules = [_WORD.pattern, " ".join(sorted(STOPWORDS)), _STEMMER_ALGORITHM, f"PyStemmer {_pystemmer().version()}"]
    return f"{TOKENIZER_VERSION}:" + hashlib.sha256("\0".join(rules).encode()).hexdigest()[:16]


def _stem_many(missing: list[str]) -> list[str]:
    stemmer = getattr(_local, "stemmer", None)
    if stemmer is None:
        stemmer = _local.stemmer = _pystemmer().Stemmer(_STEMMER_ALGORITHM, 0)  # no cache of its own: _TERMS is
    return stemmer.stemWords(missing)


def words(text: str, *, stem: bool = True) -> list[str]:
    """The terms BM25 counts in ``text``: lower-cased ``\\w+`` tokens without English stop words, each reduced to its
    Snowball English stem ("founded" -> "found", "keepers" -> "keeper"). ``stem=False``: the surface words (version 1
    of these rules), for comparisons."""
    found = _WORD.findall(text.lower())
    if not stem:
        return [w for w in found if w not in STOPWORDS]
    terms = _TERMS
    try:  # one lookup per token once its word has been seen
        return [t for t in map(terms.__getitem__, found) if t]
    except KeyError:  # words not seen yet: stemmed in one call
        pass
    missing = [w for w in dict.fromkeys(found) if w not in terms]
    content = [w for w in missing if w not in STOPWORDS]
    new = dict.fromkeys(missing, "")
    new.update(zip(content, _stem_many(content)))
    if len(terms) + len(new) > _MAX_STEMS:
        terms.clear()
    terms.update(new)
    out = []
    for w in found:  # another thread may have cleared the table since
        t = new[w] if w in new else terms.get(w)
        if t is None:
            t = "" if w in STOPWORDS else _stem_many([w])[0]
        if t:
            out.append(t)
    return out


def bm25_idf(n: int, df: int) -> float:
    """Lucene's BM25 idf of a term found in ``df`` of ``n`` texts: ``log(1 + (n - df + 0.5) / (df + 0.5))``."""
    return math.log(1.0 + (n - df + 0.5) / (df + 0.5))


def bm25_text_score(terms: Sequence[str], counts: Counter, idf: Callable[[str], float], *, k1: float, b: float, avg_len: float) -> float:
    """BM25 of one text (its word ``counts``) for the query ``terms``, under the statistics behind ``idf`` and
    ``avg_len``. The one place these operations are written: `BM25` and the index's lexicon both call it, so their
    scores agree to the last bit."""
    length = sum(counts.values())
    norm = k1 * (1.0 - b + b * length / avg_len) if avg_len else k1
    total = 0.0
    for t in terms:
        tf = counts.get(t, 0)
        if tf:
            total += idf(t) * tf * (k1 + 1.0) / (tf + norm)
    return total


class BM25:
    """Okapi BM25 with term statistics (document frequencies, mean length) from ``texts``.

    ``scores(query)`` scores the fitted texts; ``scores(query, others)`` scores other texts (e.g. the nodes inside a
    chunk) with the same statistics, so scores of siblings are comparable. Texts sharing no term with the query
    score 0. ``stem=False`` counts surface words (the tokenizer before stemming; for comparisons).
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75, stem: bool = True) -> None:
        self.k1, self.b, self.stem = k1, b, stem
        self._counts = [Counter(words(t, stem=stem)) for t in texts]
        self.n = len(self._counts)
        self.avg_len = (sum(sum(c.values()) for c in self._counts) / self.n) if self.n else 0.0
        df: Counter[str] = Counter()
        for c in self._counts:
            df.update(c.keys())
        self._df = df

    def idf(self, term: str) -> float:
        return bm25_idf(self.n, self._df.get(term, 0))

    def _score(self, terms: list[str], counts: Counter) -> float:
        return bm25_text_score(terms, counts, self.idf, k1=self.k1, b=self.b, avg_len=self.avg_len)

    def scores(self, query: str, texts: Sequence[str] | None = None) -> torch.Tensor:
        """``(N,)`` float32 scores of the fitted texts (or of ``texts``) for ``query``."""
        terms = list(dict.fromkeys(words(query, stem=self.stem)))
        counts = self._counts if texts is None else [Counter(words(t, stem=self.stem)) for t in texts]
        return torch.tensor([self._score(terms, c) for c in counts], dtype=torch.float32)


#: the constant of reciprocal rank fusion (Cormack, Clarke and Buettcher, SIGIR 2009: k = 60)
RRF_K = 60.0


def competition_ranks(scores: torch.Tensor) -> torch.Tensor:
    """``(n,)`` int64 1-based ranks of ``scores (n,)``, highest first; equal scores share the best rank of their group
    (``[3, 5, 5, 1] -> [3, 1, 1, 4]``)."""
    s = scores.to(torch.float64).reshape(-1)
    ascending = torch.sort(s).values
    return 1 + s.numel() - torch.searchsorted(ascending, s, right=True)


def reciprocal_rank_fusion(rankings: Sequence[torch.Tensor | None], *, k: float = RRF_K) -> torch.Tensor:
    """Fused ``(n,)`` float64 scores of ``n`` items scored by several rankers: ``sum over rankers of 1 / (k + rank)``,
    with `competition_ranks` (higher score first; ties share a rank, so a tie favours neither item).

    A ranker given as None has no opinion and adds nothing; one that scores every item alike adds the same to each: either
    way the order of the others is kept. An item first for every ranker is first."""
    given = [r.reshape(-1) for r in rankings if r is not None]
    if not given:
        raise ValueError("reciprocal_rank_fusion needs at least one ranking")
    n = given[0].numel()
    if any(r.numel() != n for r in given):
        raise ValueError(f"rankings of different lengths: {[r.numel() for r in given]}")
    fused = torch.zeros(n, dtype=torch.float64)
    for r in given:
        fused += 1.0 / (k + competition_ranks(r).to(torch.float64))
    return fused
