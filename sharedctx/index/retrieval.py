"""Retrieval over an index's forest of chunk trees: rank chunks, walk the kept trees, cite what was kept.

For a question, the chunks of every document are ranked (BM25 of their text under the ``lexical`` policy, read
from the index's inverted lexicon, `sharedctx.index.lexicon`, fused with an embedder's similarity by reciprocal rank
fusion when the index has one, `sharedctx.index.embedding`; else cosine of their root keys with the query key),
the best are kept within ``top_k`` and a budget of injected states, and their trees are walked by
`sharedctx.policy.walk_trees` with the policy's scorer, exactly as `SharedLLM.select` walks one document. Node
states are read from the store only when injected.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

from ..errors import InputError
from ..encoder import ChunkNodes
from ..model import SharedLLM
from ..ops.sampling import sample_indices
from ..ops.scoring import cosine_scores, reciprocal_rank_fusion
from ..policy import (
    Scorer,
    SelectedNode,
    Selection,
    make_chooser,
    make_scorer,
    rank_chunks,
    walk_trees,
)
from .documents import _Doc
from .embedding import ChunkEmbeddings
from .forest import Forest
from .ingest import ChunkCounts
from .results import Citation
from .settings import RetrievalSettings

__all__ = ["ChunkLoader", "Retrieved", "retrieve", "PassagePrompt", "passage_prompt", "render_passages", "text_prompt", "TEXT_PROMPT"]

TEXT_PROMPT = "Answer the question using the context passages.\n\n{passages}\n\nQuestion: {question}"


@dataclass
class Retrieved:
    """What retrieval chose for one question: the walked nodes (``node.chunk`` numbers the kept chunks in
    document order), the document chunk and chunk score behind each kept chunk, and the policy's scorer."""

    selection: Selection
    owners: list[tuple[_Doc, int, float]]  # by node.chunk: (document, chunk within it, chunk score)
    scorer: Scorer
    counts: ChunkCounts

    def citations(self, keep: int, sampling: str) -> list[Citation]:
        """One citation per selected node, in walk order (no state is loaded to make them)."""
        nodes = list(self.selection)
        if not nodes:
            return []
        scores = self.scorer([n.node_id for n in nodes], [n.span for n in nodes]).tolist()
        out = []
        for node, score in zip(nodes, scores):
            doc, c, chunk_score = self.owners[node.chunk]
            t0, t1 = int(doc.bounds[c]) + node.start, int(doc.bounds[c]) + node.end
            a, b = char_span(doc, t0, t1)
            n_states = len(sample_indices(node.end - node.start, keep, sampling))  # what injecting the node reads
            out.append(Citation(doc.doc_id, c, node.level, node.index, a, b, t0, t1, float(score), chunk_score, n_states, doc.text[a:b], dict(doc.metadata)))
        return out


#: a kept chunk's nodes from the store (or encoded again): ``load(document, chunk, counts)``
ChunkLoader = Callable[[_Doc, int, ChunkCounts], ChunkNodes]


def retrieve(
    llm: SharedLLM,
    forest: Forest,
    question: str,
    question_ids: torch.Tensor | None,
    *,
    settings: RetrievalSettings,
    load_chunk: ChunkLoader,
    embeddings: ChunkEmbeddings | None = None,
) -> Retrieved:
    """Rank the forest's chunks for ``question``, keep the best, walk their trees (see the module's docstring).

    ``question_ids`` (the question's prompt ids) give the query key of the key-based policies; the ``lexical``
    policy reads the question's words and needs none. Node states are loaded through ``load_chunk``, only for
    the nodes that scoring or injecting reads."""
    entries, root_keys = forest.entries, forest.root_keys
    if not entries:
        raise InputError("the index holds no documents; add some first")
    policy, cfg = settings.policy, llm.config
    counts = ChunkCounts()
    loaded: dict[int, Any] = {}
    kept: list[int] = []

    def load(rank: int, node: tuple[int, int]):
        """A zero-argument loader of a kept node's states: the store is read (or the chunk encoded) on the first
        call only, so retrieval under the lexical policy never touches states it does not inject."""

        def states():
            if rank not in loaded:
                loaded[rank] = load_chunk(*entries[kept[rank]], counts)
            return loaded[rank][node]

        return states

    def text_of(node_id, span) -> str:
        doc, c = entries[kept[node_id[0]]]
        return span_text(doc, int(doc.bounds[c]) + span[0], int(doc.bounds[c]) + span[1])

    if policy == "lexical":
        lexicon = forest.lexicon()
        chunk_scores = lexicon.scores(question)
        if embeddings is not None:  # hybrid: BM25 and embedding ranks fused
            chunk_scores = reciprocal_rank_fusion([chunk_scores, forest.dense(embeddings).scores(question)])
        scorer = make_scorer("lexical", query_text=question, lexicon=lexicon, text_of=text_of)
    else:
        if bool(torch.isnan(root_keys).any()):
            raise InputError(
                f"documents of this index were added with encode='lazy' and have no keys for the {policy!r} policy: "
                "query it with policy='lexical', or add them again to an eager index"
            )
        if question_ids is None:
            raise ValueError(f"the {policy!r} policy ranks chunks by the question's query key: pass question_ids")
        qkey = llm.query_keys(question_ids.reshape(1, -1).to(llm.device), [question_ids.numel()])[0].cpu()
        chunk_scores = cosine_scores(qkey, root_keys)

        def keys_of(node_ids, spans):
            return torch.stack([load(n[0], (n[1], n[2]))().key for n in node_ids])

        scorer = make_scorer("query", query_key=qkey, keys_of=keys_of)  # blind policies still cite by keys
    budgets = forest.budgets(keep=cfg.node_keep, height=cfg.tree_height, expand_margin=settings.expand_margin)
    kept += sorted(rank_chunks(scores=chunk_scores, top_k=settings.top_k, states_per_chunk=budgets, max_states=settings.max_states))
    spans = {rank: (0, int(entries[g][0].chunk_ids(entries[g][1]).numel())) for rank, g in enumerate(kept)}
    chooser = make_chooser(policy, scorer=scorer, generator=torch.Generator().manual_seed(cfg.seed), expand_margin=settings.expand_margin)
    walked = walk_trees(spans, cfg.tree_height, chooser)
    selection = Selection(
        [SelectedNode(n.chunk, n.level, n.index, n.start, n.end, loader=load(n.chunk, (n.level, n.index))) for n in walked]
    )
    owners = [(*entries[g], float(chunk_scores[g])) for g in kept]
    return Retrieved(selection, owners, scorer, counts)


@dataclass(frozen=True)
class PassagePrompt:
    """The question with the passages that fit the model's window: its text, its token ids (tokenised once, what the
    model reads) and how many passages did not fit (reported in the answer's stats, never silently dropped)."""

    text: str
    ids: torch.Tensor  # (T,)
    dropped: int


def render_passages(question: str, citations: list[Citation]) -> str:
    """The passage prompt: the cited spans as numbered passages in document order, then the question."""
    cites = sorted(citations, key=lambda x: (x.doc_id, x.token_start))
    passages = "\n\n".join(f"[{i + 1}] ({c.doc_id}) {c.text.strip()}" for i, c in enumerate(cites))
    return TEXT_PROMPT.format(passages=passages, question=question)


def passage_prompt(llm: SharedLLM, question: str, citations: list[Citation], max_new_tokens: int, *, chat: bool = True,
                   system: str | None = None) -> PassagePrompt:
    """The question with the cited spans as passages: all of them when they fit the window with ``max_new_tokens``
    to generate (one tokenisation), else the best first, as many as fit.

    To choose, the parts of the prompt are tokenised once each (every passage's text, the numbers, the blank line
    between passages; the template and the question are what the full prompt holds besides), never the whole
    prompt per passage; the chosen prompt is then tokenised to be sure, dropping the lowest-scored passage while it
    does not fit (tokens of parts need not add up exactly at their joins)."""
    budget = (llm.max_positions or 1 << 30) - max_new_tokens
    ranked = sorted(citations, key=lambda x: -x.score)

    def make(cites: list[Citation]) -> PassagePrompt:
        text = render_passages(question, cites)
        return PassagePrompt(text, llm.prompt_ids(text, chat=chat, system=system)[0], len(citations) - len(cites))

    full = make(ranked)
    if full.ids.numel() <= budget:
        return full

    def count(text: str) -> int:
        return len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])

    body = [count(f" ({c.doc_id}) {c.text.strip()}") for c in ranked]
    number = [count(f"[{k + 1}]") for k in range(len(ranked))]  # the k-th passage in the prompt, whichever it is
    gap = count("\n\n")
    used = full.ids.numel() - sum(body) - sum(number) - gap * (len(ranked) - 1)  # the template and the question
    chosen: list[Citation] = []
    for cite, cost in zip(ranked, body):
        more = cost + number[len(chosen)] + (gap if chosen else 0)
        if used + more <= budget:
            chosen.append(cite)
            used += more
    while True:
        prompt = make(chosen)
        if prompt.ids.numel() <= budget or not chosen:
            return prompt
        chosen.pop()


def text_prompt(llm: SharedLLM, question: str, citations: list[Citation], max_new_tokens: int) -> tuple[str, int]:
    """`passage_prompt`'s text and how many passages did not fit (for a prompt the caller puts in its own turns)."""
    prompt = passage_prompt(llm, question, citations, max_new_tokens)
    return prompt.text, prompt.dropped


def char_span(doc: _Doc, t0: int, t1: int) -> tuple[int, int]:
    """Character span of a document's tokens ``[t0, t1)`` (empty when ``t1 <= t0``)."""
    if t1 <= t0:
        return 0, 0
    return int(doc.offsets[t0, 0]), int(doc.offsets[t1 - 1, 1])


def span_text(doc: _Doc, t0: int, t1: int) -> str:
    """Text of a document's tokens ``[t0, t1)``."""
    a, b = char_span(doc, t0, t1)
    return doc.text[a:b]
