"""Selection policies: which child of each split to expand, walked level by level over every chunk at once.

The walk is shared by precomputed trees (node keys looked up) and on-the-fly encoding (node keys computed
by a batched pass), so both select the same nodes for the same query by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .ops.sampling import split_point
from .tree import NodeId

__all__ = ["Walk", "walk_trees", "make_chooser", "rank_chunks"]

Span = tuple[int, int]
#: ``scores_fn(node_ids, spans) -> (N,)`` how well each given node matches the query (higher is better)
ScoresFn = Callable[[Sequence[NodeId], Sequence[Span]], torch.Tensor]
#: ``choose(level, left_ids, left_spans, right_ids, right_spans) -> list[bool]`` True expands the right child
Chooser = Callable[[int, list[NodeId], list[Span], list[NodeId], list[Span]], list[bool]]


@dataclass
class Walk:
    """The preserved nodes of every walked chunk, each list in document order."""

    preserved: dict[int, list[tuple[NodeId, Span]]]

    def nodes(self) -> list[tuple[NodeId, Span]]:
        return [item for chunk in sorted(self.preserved) for item in self.preserved[chunk]]


def make_chooser(policy: str, *, scores_fn: ScoresFn | None = None, generator: torch.Generator | None = None) -> Chooser:
    """A chooser for ``policy``: ``right``/``left`` always expand that child; ``random`` flips a coin from
    ``generator``; ``query`` and ``lexical`` expand the child that ``scores_fn`` scores higher (ties go right):
    cosine of node keys with the query key, or BM25 of node texts for the question's words."""
    if policy == "right":
        return lambda level, li, ls, ri, rs: [True] * len(li)
    if policy == "left":
        return lambda level, li, ls, ri, rs: [False] * len(li)
    if policy == "random":

        def choose_random(level, li, ls, ri, rs):
            return [bool(b) for b in torch.randint(0, 2, (len(li),), generator=generator).tolist()]

        return choose_random
    if policy in ("query", "lexical"):
        if scores_fn is None:
            raise ValueError(f"the {policy!r} policy needs node scores for the query")

        def choose_higher(level, li, ls, ri, rs):
            scores = scores_fn(li + ri, ls + rs)  # (2n,)
            n = len(li)
            return (scores[n:] >= scores[:n]).tolist()

        return choose_higher
    raise ValueError(f"unknown policy {policy!r}; use 'query', 'lexical', 'right', 'left' or 'random'")


def walk_trees(
    chunk_spans: dict[int, Span],
    height: int,
    choose: Chooser,
    *,
    split_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Walk:
    """Walk the tree of each chunk (``{chunk: span}``) down ``height`` levels.

    At each of the first ``height - 1`` levels the current node is split, ``choose`` picks the child to expand
    and the other is preserved; at the last level both children are preserved. A node too short to split
    (one token) is preserved whole. Choices for all chunks of a level are made in one call.
    """
    preserved: dict[int, list[tuple[NodeId, Span]]] = {c: [] for c in chunk_spans}
    current: dict[int, tuple[NodeId, Span]] = {c: ((c, 0, 0), span) for c, span in chunk_spans.items()}
    for level in range(1, height + 1):
        splits: list[tuple[int, NodeId, Span, NodeId, Span]] = []
        for chunk, ((c, lv, idx), (s, e)) in current.items():
            if e - s < 2:
                preserved[chunk].append(((c, lv, idx), (s, e)))
                continue
            b = split_point(e - s, split_noise, generator) if split_noise > 0 else max(1, (e - s) // 2)
            splits.append((chunk, (c, level, 2 * idx), (s, s + b), (c, level, 2 * idx + 1), (s + b, e)))
        current = {}
        if not splits:
            break
        if level == height:
            for chunk, lid, lsp, rid, rsp in splits:
                preserved[chunk] += [(lid, lsp), (rid, rsp)]
            break
        right = choose(level, [x[1] for x in splits], [x[2] for x in splits], [x[3] for x in splits], [x[4] for x in splits])
        for (chunk, lid, lsp, rid, rsp), go_right in zip(splits, right):
            keep, expand = ((lid, lsp), (rid, rsp)) if go_right else ((rid, rsp), (lid, lsp))
            preserved[chunk].append(keep)
            current[chunk] = expand
    for chunk in preserved:
        preserved[chunk].sort(key=lambda item: item[1][0])
    return Walk(preserved)


def rank_chunks(
    scores: torch.Tensor,
    *,
    top_k: int | None = None,
    states_per_chunk: Sequence[int] | None = None,
    max_states: int | None = None,
) -> list[int]:
    """Indices of the chunks to inject, best first by ``scores (n,)`` (e.g. cosine of each chunk root key with the
    query key, or BM25), at most ``top_k`` of them and at most ``max_states`` injected states in all."""
    order = torch.argsort(scores, descending=True, stable=True).tolist()
    limit = len(order) if top_k is None else min(top_k, len(order))
    chosen: list[int] = []
    used = 0
    for c in order:
        if len(chosen) >= limit:
            break
        cost = 0 if states_per_chunk is None else int(states_per_chunk[c])
        if max_states is not None and used + cost > max_states:
            continue
        chosen.append(c)
        used += cost
    if not chosen and order and max_states is not None and not math.isinf(max_states):
        raise ValueError(f"max_injected_states={max_states} is smaller than one chunk's states ({states_per_chunk[order[0]]})")
    return chosen
