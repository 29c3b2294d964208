"""How an index builds and retrieves: `BuildOptions` and `RetrievalSettings`, settled once when an index opens
(`settle`) from what was asked, what the index was built with (its manifest) and the model's policy, and checked
together (a lazy build needs the lexical policy, ...)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

from ..config import POLICIES

__all__ = ["BuildOptions", "RetrievalSettings", "settle"]


@dataclass(frozen=True)
class BuildOptions:
    """How an index builds: ``encode`` (``eager``: every chunk now; ``lazy``: when a query first injects it), chunks
    encoded per batch, and the fill at which a chunk closes at a content-defined boundary."""

    encode: str = "eager"
    batch_chunks: int = 16
    min_fill: float = 0.75


@dataclass(frozen=True)
class RetrievalSettings:
    """How an index retrieves for a question: its policy, chunks kept at most (``top_k``) and the budget of injected
    states (``max_states``, None: none beyond ``top_k``), and the margin under which both children are expanded."""

    policy: str
    top_k: int
    max_states: int | None = None
    expand_margin: float | None = None


def settle(held: Mapping[str, Any], model_policy: str, *, policy: str | None, encode: str | None, top_k: int, batch_chunks: int,
           min_fill: float, max_states: int | None, expand_margin: float | None, hybrid: bool) -> tuple[RetrievalSettings, BuildOptions]:
    """The settings of an index being opened: ``policy`` and ``encode`` as asked, else as the index was built
    (``held``, its manifest), else the model's policy and ``eager``; each checked, and against the other (``hybrid``:
    an embedder was given)."""
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if batch_chunks < 1:
        raise ValueError(f"batch_chunks must be >= 1, got {batch_chunks}")
    if policy is None:
        policy = held.get("policy") or model_policy
    if encode is None:
        encode = held.get("encode") or "eager"
        if encode == "lazy" and policy != "lexical":
            encode = "eager"  # asked for a key-based policy: new documents get keys; lazy ones say what to do
    if policy not in POLICIES:
        raise ValueError(f"policy must be one of {POLICIES}, got {policy!r}")
    if expand_margin is not None and policy not in ("query", "lexical"):
        raise ValueError(f"expand_margin needs the 'query' or 'lexical' policy, not {policy!r}")
    if hybrid and policy != "lexical":
        raise ValueError(f"embedder= fuses embedding similarity with the BM25 ranks of the 'lexical' policy; the {policy!r} "
                         "policy ranks chunks by keys: use policy='lexical' with it")
    if encode not in ("eager", "lazy"):
        raise ValueError(f"encode must be 'eager' or 'lazy', got {encode!r}")
    if encode == "lazy" and policy != "lexical":
        raise ValueError(
            f"encode='lazy' needs policy='lexical': the {policy!r} policy ranks chunks by keys that only encoding "
            "makes; use encode='eager' with it"
        )
    return RetrievalSettings(policy, top_k, max_states, expand_margin), BuildOptions(encode, batch_chunks, min_fill)
