"""Answering a question from a `ContextIndex`: its options checked once (`QueryOptions`), retrieval done and the
prompt made ready once (`PreparedQuery`, holding the `GenerationRequest` the model decodes), and the `Answer` that
joins the model's completion with what retrieval did. A query answered alone, in a batch or streamed goes through
these same steps; only who runs `sharedctx.generation.decode` differs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..config import MODES
from ..generation import SAMPLING_FIELDS, GenerationRequest, SamplingOptions, sampling_options
from ..stats import AnswerStats, Completion, Timings
from .ingest import ChunkCounts
from .results import Answer, Citation

__all__ = ["QueryOptions", "PreparedQuery", "QUERY_OPTIONS", "by_score"]

#: what `ContextIndex.query` / `stream` take besides ``mode`` and the fields of `SamplingOptions`
QUERY_OPTIONS = frozenset({"top_k_chunks", "max_injected_states", "prompt", "chat", "system"})


@dataclass(frozen=True)
class QueryOptions:
    """The options of one question, checked before anything runs (an error reaches its caller, never a batch)."""

    mode: str
    sampling: SamplingOptions
    top_k_chunks: int | None = None
    max_injected_states: int | None = None
    prompt: str | Sequence[int] | None = None  # latent mode: what the model reads instead of the bare question
    chat: bool = True
    system: str | None = None

    @classmethod
    def parse(cls, mode: str, options: Mapping[str, Any]) -> QueryOptions:
        """Options of `ContextIndex.query` / `stream`; an unknown key raises TypeError, a bad value ValueError."""
        unknown = sorted(set(options) - QUERY_OPTIONS - SAMPLING_FIELDS)
        if unknown:
            raise TypeError(f"unknown query options {unknown}; known: {sorted(QUERY_OPTIONS | SAMPLING_FIELDS)}")
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if options.get("prompt") is not None and mode != "latent":
            raise ValueError(f"prompt= replaces what the model reads only in latent mode; {mode} mode builds its own prompt")
        sampling = sampling_options({k: v for k, v in options.items() if k in SAMPLING_FIELDS}, what="query options")
        return cls(mode, sampling, **{k: v for k, v in options.items() if k in QUERY_OPTIONS})


@dataclass(frozen=True)
class PreparedQuery:
    """One question made ready: the citations retrieval chose, what it touched, and the request the model decodes
    (prompt tokenised and checked once, injected states, sampling options). ``t0`` and ``t_retrieved`` time it."""

    options: QueryOptions
    citations: list[Citation]
    counts: ChunkCounts
    dropped: int  # text passages that did not fit the window
    request: GenerationRequest
    t0: float
    t_retrieved: float

    def answer(self, done: Completion, end: float, first_token_s: float) -> Answer:
        """The `Answer`: the model's statistics with what retrieval did, timed from the question."""
        injection = self.request.injection
        stats = AnswerStats(
            prompt_tokens=done.stats.prompt_tokens,
            generated_tokens=done.stats.generated_tokens,
            injected_states=0 if injection is None else injection.n_states,
            injected_nodes=done.stats.injected_nodes,
            batch_size=done.stats.batch_size,
            mode=self.options.mode,
            documents=len({c.doc_id for c in self.citations}),
            chunks_selected=len({(c.doc_id, c.chunk) for c in self.citations}),
            chunks_encoded=self.counts.chunks_encoded,
            chunks_cached=self.counts.chunks_cached,
            text_passages_dropped=self.dropped,
        )
        timings = Timings(**{**done.timings.to_dict(), "retrieve_s": self.t_retrieved - self.t0,
                             "inject_s": self.request.prepare_s, "first_token_s": first_token_s,
                             "total_s": end - self.t0})
        return Answer(text=done.text, citations=by_score(self.citations), stats=stats, timings=timings, token_ids=list(done.token_ids))


def by_score(citations: list[Citation]) -> list[Citation]:
    """Citations best score first (ties in document order)."""
    return sorted(citations, key=lambda x: (-x.score, x.doc_id, x.token_start))
