"""What an answer cost: `AnswerStats` (what it read and produced), `Timings` (seconds spent) and the `Completion`
that carries them with the text; one set of types for `SharedLLM` completions and `ContextIndex` answers, each
serialised by ``to_dict()``."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Iterator

__all__ = ["Timings", "AnswerStats", "Completion"]


class _FieldMapping(Mapping):
    """Read-only mapping view of a dataclass's fields, so ``stats["prompt_tokens"]`` reads as ``stats.prompt_tokens``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self._names():
            raise KeyError(key)
        return getattr(self, key)

    def __iter__(self) -> Iterator[str]:
        return iter(self._names())

    def __len__(self) -> int:
        return len(self._names())

    @classmethod
    def _names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(cls))  # type: ignore[arg-type]


@dataclass(eq=True)
class Timings(_FieldMapping):
    """Seconds spent on one answer. ``first_token_s`` and ``total_s`` count from the call (retrieval included)."""

    retrieve_s: float = 0.0  # ranking chunks and walking trees (ContextIndex)
    inject_s: float = 0.0  # building the injected states (selection, encoding on the fly)
    prefill_s: float = 0.0
    first_token_s: float = 0.0
    decode_s: float = 0.0
    total_s: float = 0.0
    tokens_per_s: float = 0.0

    def to_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


@dataclass(eq=True)
class AnswerStats(_FieldMapping):
    """What one answer read and produced; the same type for `SharedLLM` completions and `ContextIndex` answers
    (fields an answer has no use for stay at their defaults)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0
    injected_states: int = 0
    #: provenance of the injected nodes (document order)
    injected_nodes: list = field(default_factory=list)
    batch_size: int = 1
    #: a single context tree: its tokens and chunks
    context_tokens: int = 0
    chunks: int = 0
    #: a ContextIndex answer: how it was read and what retrieval touched
    mode: str | None = None
    documents: int = 0
    chunks_selected: int = 0
    chunks_encoded: int = 0
    chunks_cached: int = 0
    text_passages_dropped: int = 0

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["injected_nodes"] = [dataclasses.asdict(n) if dataclasses.is_dataclass(n) else dict(n) for n in self.injected_nodes]
        return out


@dataclass
class Completion:
    """A generated answer with what it cost."""

    text: str
    token_ids: list[int]
    stats: AnswerStats = field(default_factory=AnswerStats)
    timings: Timings = field(default_factory=Timings)

    def report(self) -> dict[str, Any]:
        """``stats`` as a plain dict with ``token_ids`` and ``timings``: what a ``stats=`` dict of a streaming call receives."""
        return {**self.stats.to_dict(), "token_ids": list(self.token_ids), "timings": self.timings.to_dict()}
