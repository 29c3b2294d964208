"""Scores between a query key and node keys."""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["cosine_scores"]


def cosine_scores(query_key: torch.Tensor, node_keys: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``query_key (H,)`` with each row of ``node_keys (N, H)``; returns ``(N,)`` float32."""
    q = query_key.to(torch.float32).reshape(1, -1)
    k = node_keys.to(device=q.device, dtype=torch.float32)
    return F.cosine_similarity(k, q.expand_as(k), dim=-1)
