"""What a ContextIndex returns: citations, answers, and reports of what adding documents did."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..stats import AnswerStats, Timings

__all__ = ["Citation", "Answer", "AddResult", "BuildReport", "DocumentInfo"]


@dataclass
class Citation:
    """A preserved node whose states were selected: where it comes from, what it says, how well it matched."""

    doc_id: str
    chunk: int  # chunk index within the document
    level: int  # 0 = the whole chunk, 1..h = nodes of its tree
    index: int
    char_start: int
    char_end: int
    token_start: int  # token span within the document
    token_end: int
    score: float  # cosine of the node key with the query key
    chunk_score: float  # cosine of the chunk root key with the query key
    n_states: int
    text: str
    metadata: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class Answer:
    """An answer with the citations it read, statistics and timings."""

    text: str
    citations: list[Citation]
    stats: AnswerStats = field(default_factory=AnswerStats)
    timings: Timings = field(default_factory=Timings)
    token_ids: list[int] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready: the answer, its statistics, timings and citations."""
        return {"answer": self.text, "stats": self.stats.to_dict(), "timings": self.timings.to_dict(), "citations": [c.to_dict() for c in self.citations]}


@dataclass
class AddResult:
    doc_id: str
    tokens: int
    chunks: int
    chunks_encoded: int
    chunks_reused: int
    unchanged: bool = False  # the same document was already indexed: nothing written
    chunks_deferred: int = 0  # ContextIndex(encode="lazy"): left to encode when a latent query first needs them
    replaced: bool = False  # a document of this id was replaced


@dataclass
class BuildReport:
    added: list[AddResult] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): not text, or a link left out
    failed: list[tuple[str, str]] = field(default_factory=list)  # (path, reason): could not be read

    @property
    def documents(self) -> int:
        return len(self.added)

    @property
    def chunks(self) -> int:
        return sum(r.chunks for r in self.added)

    @property
    def chunks_encoded(self) -> int:
        return sum(r.chunks_encoded for r in self.added)

    @property
    def chunks_reused(self) -> int:
        return sum(r.chunks_reused for r in self.added)

    @property
    def chunks_deferred(self) -> int:
        return sum(r.chunks_deferred for r in self.added)

    @property
    def tokens(self) -> int:
        return sum(r.tokens for r in self.added)

    def to_dict(self) -> dict[str, Any]:
        return {
            "documents": self.documents,
            "tokens": self.tokens,
            "chunks": self.chunks,
            "chunks_encoded": self.chunks_encoded,
            "chunks_reused": self.chunks_reused,
            "chunks_deferred": self.chunks_deferred,
            "skipped": [{"path": p, "reason": r} for p, r in self.skipped],
            "failed": [{"path": p, "reason": r} for p, r in self.failed],
            "added": [asdict(r) for r in self.added],
        }


@dataclass
class DocumentInfo:
    doc_id: str
    tokens: int
    chunks: int
    chars: int
    source: str | None
    metadata: dict[str, Any]
