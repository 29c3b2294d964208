"""Scoring windows of a text, shared by the evaluations (`evaluate`: perplexity; `reading`: reading and copy
gains): where the windows start, and the summed negative log-likelihood of a window's last tokens."""

from __future__ import annotations

from typing import Any

import torch

__all__ = ["window_starts", "scored_nll", "window_nll"]


def window_starts(doc_length: int, total_length: int, n_windows: int) -> list[int]:
    """Start offsets of ``n_windows`` stretches of ``total_length`` tokens spread evenly over a document."""
    if doc_length < total_length:
        raise ValueError(f"the text has {doc_length} tokens, fewer than --total-length {total_length}; use a longer text or a shorter length")
    last = doc_length - total_length
    if n_windows <= 1:
        return [last // 2]
    return [int(round(i * last / (n_windows - 1))) for i in range(n_windows)]


def scored_nll(logits: torch.Tensor, targets: torch.Tensor) -> float:
    """Summed NLL of ``targets (S,)`` under ``logits (S, V)``."""
    return float(torch.nn.functional.cross_entropy(logits.float(), targets.to(logits.device), reduction="sum"))


def window_nll(llm: Any, ids: torch.Tensor, score_last: int, *, context: torch.Tensor | None = None) -> float:
    """NLL of the last ``score_last`` tokens of ``ids (T,)``, reading ``context`` when given (query = unscored prefix)."""
    t = ids.numel()
    q = t - score_last
    out = llm(ids[None].to(llm.device), context=context, query_length=q if context is not None else None, logits_to_keep=score_last + 1)
    return scored_nll(out.logits[0, :-1], ids[q:])
