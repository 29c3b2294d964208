"""Selection: how a question picks the nodes to inject, for one document's tree or an index's forest.

Three pieces, each written once and used by `SharedLLM.select` and `ContextIndex` alike:

- **scorers** (`make_scorer`): how well each node matches the question: cosine of hidden-state keys
  (``query``) or BM25 of node texts (``lexical``), behind one protocol, `Scorer`;
- **the walker** (`walk_trees`, steered by `make_chooser`): level by level over every chunk at once, expand one
  child of each split and preserve the other (both children when their scores are within ``expand_margin``);
- **budgets** (`rank_chunks`, `chunk_state_budget`): which chunks of a forest are walked at all.

The walk is shared by precomputed trees (node keys looked up) and on-the-fly encoding (node keys computed by a
batched pass), so both select the same nodes for the same query by construction.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Iterator, Protocol, Sequence

import torch

from .ops.sampling import split_point
from .ops.scoring import BM25, cosine_scores
from .tree import NodeId, NodeStates

__all__ = [
    "Span",
    "Scorer",
    "SelectedNode",
    "Selection",
    "make_scorer",
    "make_chooser",
    "walk_trees",
    "rank_chunks",
    "chunk_state_budget",
    "query_lengths",
    "row_chunks",
    "LEFT",
    "RIGHT",
    "BOTH",
]

Span = tuple[int, int]

#: what a chooser decides for one split: expand the left child, the right one, or both
LEFT, RIGHT, BOTH = 0, 1, 2


class Scorer(Protocol):
    """``scorer(node_ids, spans) -> (N,)``: how well each given node matches the question (higher is better)."""

    def __call__(self, node_ids: Sequence[NodeId], spans: Sequence[Span]) -> torch.Tensor: ...


#: ``choose(level, left_ids, left_spans, right_ids, right_spans) -> [LEFT | RIGHT | BOTH, ...]``
Chooser = Callable[[int, list[NodeId], list[Span], list[NodeId], list[Span]], list[int]]


@dataclass
class SelectedNode:
    """A preserved node chosen for injection: which node, which tokens, and its states (given, or read on first
    use through ``loader``, so a walk that only cites text never loads states).

    ``chunk`` numbers the node's chunk among those injected together: chunk positions follow its order, so
    callers number chunks in document order.
    """

    chunk: int
    level: int
    index: int
    start: int
    end: int
    loader: Callable[[], NodeStates] | None = field(default=None, repr=False, compare=False)
    _states: NodeStates | None = field(default=None, repr=False, compare=False)

    @property
    def node_id(self) -> NodeId:
        return (self.chunk, self.level, self.index)

    @property
    def span(self) -> Span:
        return (self.start, self.end)

    @property
    def states(self) -> NodeStates:
        if self._states is None:
            if self.loader is None:
                raise ValueError(f"node {self.node_id} has no states and no loader")
            self._states = self.loader()
        return self._states

    @states.setter
    def states(self, value: NodeStates) -> None:
        self._states = value


@dataclass
class Selection:
    """The nodes a walk preserved, chunk by chunk, each chunk's nodes in document order."""

    nodes: list[SelectedNode] = field(default_factory=list)

    def __iter__(self) -> Iterator[SelectedNode]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    def __getitem__(self, i: int) -> SelectedNode:
        return self.nodes[i]

    @property
    def spans(self) -> list[Span]:
        return [n.span for n in self.nodes]


# ---------------------------------------------------------------------- scorers
def make_scorer(
    policy: str,
    *,
    query_key: torch.Tensor | None = None,
    keys_of: Callable[[Sequence[NodeId], Sequence[Span]], torch.Tensor] | None = None,
    query_text: str | None = None,
    lexicon: BM25 | None = None,
    text_of: Callable[[NodeId, Span], str] | None = None,
) -> Scorer | None:
    """The scorer of ``policy``: ``query`` scores nodes by the cosine of ``keys_of(ids, spans) (N, hidden)`` with
    ``query_key``; ``lexical`` by BM25 (statistics of ``lexicon``) of ``text_of(id, span)`` for ``query_text``.
    The blind policies (``right``, ``left``, ``random``) need none: None."""
    if policy == "query":
        if query_key is None or keys_of is None:
            raise ValueError("the 'query' policy needs a query key (and node keys)")

        def by_keys(node_ids: Sequence[NodeId], spans: Sequence[Span]) -> torch.Tensor:
            return cosine_scores(query_key, keys_of(node_ids, spans))

        return by_keys
    if policy == "lexical":
        if query_text is None or lexicon is None or text_of is None:
            raise ValueError("the 'lexical' policy needs the query text (and node texts under BM25 statistics)")

        def by_words(node_ids: Sequence[NodeId], spans: Sequence[Span]) -> torch.Tensor:
            return lexicon.scores(query_text, [text_of(n, s) for n, s in zip(node_ids, spans)])

        return by_words
    return None


def make_chooser(
    policy: str,
    *,
    scorer: Scorer | None = None,
    generator: torch.Generator | None = None,
    expand_margin: float | None = None,
) -> Chooser:
    """A chooser for ``policy``: ``right``/``left`` always expand that child; ``random`` flips a coin from
    ``generator``; ``query`` and ``lexical`` expand the child that ``scorer`` scores higher (ties go right), and
    both children when ``expand_margin`` is set and their scores differ by at most that much."""
    if expand_margin is not None and policy not in ("query", "lexical"):
        raise ValueError(f"expand_margin needs the 'query' or 'lexical' policy, not {policy!r}")
    if policy == "right":
        return lambda level, li, ls, ri, rs: [RIGHT] * len(li)
    if policy == "left":
        return lambda level, li, ls, ri, rs: [LEFT] * len(li)
    if policy == "random":

        def choose_random(level, li, ls, ri, rs):
            return [RIGHT if b else LEFT for b in torch.randint(0, 2, (len(li),), generator=generator).tolist()]

        return choose_random
    if policy in ("query", "lexical"):
        if scorer is None:
            raise ValueError(f"the {policy!r} policy needs node scores for the query")

        def choose_higher(level, li, ls, ri, rs):
            scores = scorer(li + ri, ls + rs)  # (2n,)
            n = len(li)
            left, right = scores[:n].tolist(), scores[n:].tolist()
            out = []
            for sl, sr in zip(left, right):
                if expand_margin is not None and abs(sr - sl) <= expand_margin:
                    out.append(BOTH)
                else:
                    out.append(RIGHT if sr >= sl else LEFT)
            return out

        return choose_higher
    raise ValueError(f"unknown policy {policy!r}; use 'query', 'lexical', 'right', 'left' or 'random'")


# ---------------------------------------------------------------------- the walker
def walk_trees(
    chunk_spans: dict[int, Span],
    height: int,
    choose: Chooser,
    *,
    split_noise: float = 0.0,
    generator: torch.Generator | None = None,
) -> Selection:
    """Walk the tree of each chunk (``{chunk: span}``) down ``height`` levels.

    At each of the first ``height - 1`` levels every node being expanded is split, ``choose`` picks the child to
    expand (or both) and the other is preserved; at the last level both children are preserved. A node too short
    to split (one token) is preserved whole. The choices of a level, for all chunks, are made in one call.
    """
    preserved: dict[int, list[tuple[NodeId, Span]]] = {c: [] for c in chunk_spans}
    current: list[tuple[int, NodeId, Span]] = [(c, (c, 0, 0), span) for c, span in chunk_spans.items()]
    for level in range(1, height + 1):
        splits: list[tuple[int, NodeId, Span, NodeId, Span]] = []
        for chunk, node, (s, e) in current:
            if e - s < 2:
                preserved[chunk].append((node, (s, e)))
                continue
            c, _, idx = node
            b = split_point(e - s, split_noise, generator) if split_noise > 0 else max(1, (e - s) // 2)
            splits.append((chunk, (c, level, 2 * idx), (s, s + b), (c, level, 2 * idx + 1), (s + b, e)))
        current = []
        if not splits:
            break
        if level == height:
            for chunk, lid, lsp, rid, rsp in splits:
                preserved[chunk] += [(lid, lsp), (rid, rsp)]
            break
        decisions = choose(level, [x[1] for x in splits], [x[2] for x in splits], [x[3] for x in splits], [x[4] for x in splits])
        for (chunk, lid, lsp, rid, rsp), decision in zip(splits, decisions):
            if decision == BOTH:
                current += [(chunk, lid, lsp), (chunk, rid, rsp)]
                continue
            keep, expand = ((lid, lsp), (rid, rsp)) if decision == RIGHT else ((rid, rsp), (lid, lsp))
            preserved[chunk].append(keep)
            current.append((chunk, *expand))
    nodes = []
    for chunk in sorted(preserved):
        for (c, level, index), (s, e) in sorted(preserved[chunk], key=lambda item: item[1][0]):
            nodes.append(SelectedNode(c, level, index, s, e))
    return Selection(nodes)


# ---------------------------------------------------------------------- budgets over a forest
def chunk_state_budget(n_tokens: int, *, keep: int, height: int, expand_margin: float | None = None) -> int:
    """Upper bound on the states one walk of a chunk of ``n_tokens`` injects (with ``expand_margin`` set, every
    leaf may be kept)."""
    if expand_margin is not None:
        return (2**height) * min(keep, -(-n_tokens // 2**height))
    total, length = 0, n_tokens
    for level in range(1, height + 1):
        if length < 2:
            return total + min(keep, length)
        big = -(-length // 2)
        total += min(keep, big) if level < height else min(keep, big) + min(keep, length - big)
        length = big
    return total


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


def query_lengths(batch: int, length: int, query_length: int | Sequence[int] | None, labels: torch.Tensor | None) -> list[int]:
    """How many leading tokens of each of ``batch`` rows of ``length`` make its query: ``query_length`` as given, or
    with ``labels`` the tokens before the first scored one (no target ever reaches the query), else the whole row."""
    if query_length is not None:
        qls = [int(query_length)] * batch if isinstance(query_length, int) else [int(q) for q in query_length]
    elif labels is not None:
        labels = torch.as_tensor(labels)
        qls = []
        for row in labels.reshape(batch, -1):
            scored = (row[1:] != -100).nonzero()
            # logits at t predict token t+1: tokens from the first scored one on never reach the query
            qls.append(int(scored[0]) + 1 if scored.numel() else length)
    else:
        qls = [length] * batch
    if len(qls) != batch or any(not 1 <= q <= length for q in qls):
        raise ValueError(f"query lengths must be in [1, {length}] for each of {batch} rows, got {qls}")
    return qls


def row_chunks(chunks: Sequence[int] | Sequence[Sequence[int]] | None, batch: int) -> list[Sequence[int] | None]:
    """The chunks each row walks: one list for all rows, a list per row, or None (every chunk)."""
    if chunks is None:
        return [None] * batch
    if chunks and isinstance(chunks[0], (list, tuple)):
        if len(chunks) != batch:
            raise ValueError(f"got chunk lists for {len(chunks)} rows, batch is {batch}")
        return list(chunks)
    return [chunks] * batch
