"""Scores of nodes for a query: cosine between hidden-state keys, and BM25 between texts (the ``lexical`` policy)."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F

__all__ = ["cosine_scores", "BM25", "bm25_idf", "bm25_text_score", "words"]


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


def words(text: str) -> list[str]:
    """Lower-cased word tokens of ``text`` without stop words (the terms BM25 counts)."""
    return [w for w in _WORD.findall(text.lower()) if w not in STOPWORDS]


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
    score 0.
    """

    def __init__(self, texts: Sequence[str], *, k1: float = 1.5, b: float = 0.75) -> None:
        self.k1, self.b = k1, b
        self._counts = [Counter(words(t)) for t in texts]
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
        terms = list(dict.fromkeys(words(query)))
        counts = self._counts if texts is None else [Counter(words(t)) for t in texts]
        return torch.tensor([self._score(terms, c) for c in counts], dtype=torch.float32)
