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
from .ops.scoring import BM25, cosine_scores
from .tree import NodeId

__all__ = ["Walk", "walk_trees", "make_chooser", "rank_chunks"]

Span = tuple[int, int]
#: ``keys_fn(node_ids, spans) -> (N, hidden)`` keys of the given nodes
KeysFn = Callable[[Sequence[NodeId], Sequence[Span]], torch.Tensor]
#: ``texts_fn(node_ids, spans) -> list[str]`` text of the given nodes
TextsFn = Callable[[Sequence[NodeId], Sequence[Span]], list[str]]
#: ``choose(level, left_ids, left_spans, right_ids, right_spans) -> list[bool]`` True expands the right child
Chooser = Callable[[int, list[NodeId], list[Span], list[NodeId], list[Span]], list[bool]]


@dataclass
class Walk:
    """The preserved nodes of every walked chunk, each list in document order."""

    preserved: dict[int, list[tuple[NodeId, Span]]]

    def nodes(self) -> list[tuple[NodeId, Span]]:
        return [item for chunk in sorted(self.preserved) for item in self.preserved[chunk]]


def make_chooser(
    policy: str,
    *,
    query_key: torch.Tensor | None = None,
    keys_fn: KeysFn | None = None,
    generator: torch.Generator | None = None,
    query_text: str | None = None,
    texts_fn: TextsFn | None = None,
    lexicon: BM25 | None = None,
) -> Chooser:
    """A chooser for ``policy``: ``right``/``left`` always expand that child; ``random`` flips a coin from
    ``generator``; ``query`` expands the child whose key has the higher cosine with ``query_key``; ``lexical``
    the child whose text (``texts_fn``) has the higher BM25 score for ``query_text`` under ``lexicon``'s term
    statistics. Ties go right."""
    if policy == "right":
        return lambda level, li, ls, ri, rs: [True] * len(li)
    if policy == "left":
        return lambda level, li, ls, ri, rs: [False] * len(li)
    if policy == "random":

        def choose_random(level, li, ls, ri, rs):
            return [bool(b) for b in torch.randint(0, 2, (len(li),), generator=generator).tolist()]

        return choose_random
    if policy == "query":
        if query_key is None or keys_fn is None:
            raise ValueError("the 'query' policy needs a query key and node keys")

        def choose_query(level, li, ls, ri, rs):
            keys = keys_fn(li + ri, ls + rs)  # (2n, hidden)
            scores = cosine_scores(query_key, keys)
            n = len(li)
            return (scores[n:] >= scores[:n]).tolist()

        return choose_query
    if policy == "lexical":
        if query_text is None or texts_fn is None or lexicon is None:
            raise ValueError("the 'lexical' policy needs the query text, node texts and a BM25 lexicon")

        def choose_lexical(level, li, ls, ri, rs):
            scores = lexicon.scores(query_text, texts_fn(li + ri, ls + rs))
            n = len(li)
            return (scores[n:] >= scores[:n]).tolist()

        return choose_lexical
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
    query_key: torch.Tensor | None = None,
    root_keys: torch.Tensor | None = None,
    *,
    scores: torch.Tensor | None = None,
    top_k: int | None = None,
    states_per_chunk: Sequence[int] | None = None,
    max_states: int | None = None,
) -> list[int]:
    """Indices of the chunks to inject, best first: by cosine of each chunk root key ``(n, hidden)`` with the
    query (or by given ``scores``), at most ``top_k`` of them and at most ``max_states`` injected states in all."""
    if scores is None:
        if query_key is None or root_keys is None:
            raise ValueError("rank_chunks needs a query key and root keys, or scores")
        scores = cosine_scores(query_key, root_keys)
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
