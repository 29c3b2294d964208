"""The ``lexical`` policy: BM25 of node text for the question's words ranks chunks and walks trees."""

from __future__ import annotations

import pytest
import torch

from conftest import make_llm
from sharedctx import ContextIndex
from sharedctx.ops.scoring import BM25, words

pytestmark = pytest.mark.usefixtures("one_thread")

FILLER = "The cat sat on the mat and looked at the garden for a while. "


def test_words_drop_stopwords_and_case():
    assert words("What is THE zebra's Lantern?") == ["zebra", "s", "lantern"]


def test_bm25_prefers_rare_matching_terms():
    texts = ["the garden is green", "a zebra in the garden", "the garden gate", "nothing here"]
    bm = BM25(texts)
    s = bm.scores("where is the zebra")
    assert int(s.argmax()) == 1 and s[0] == 0 and s[3] == 0
    # a rare term counts more than a common one
    assert bm.scores("zebra")[1] > bm.scores("garden")[1] > 0
    # other texts are scored with the fitted statistics
    assert torch.equal(bm.scores("zebra", ["zebra zebra", "gate"]) > 0, torch.tensor([True, False]))
    assert BM25([]).scores("x").numel() == 0


def _text_with_needle(n_chars: int, at: float, needle: str) -> tuple[str, int]:
    """Filler of ``n_chars`` characters (= tokens: the test tokenizer is byte-level) with ``needle`` written over it
    inside one 32-character leaf (chunks of 256 split three times), so no split cuts its words."""
    body = (FILLER * (n_chars // len(FILLER) + 1))[:n_chars]
    start = int(at * n_chars) // 32 * 32 + 4
    assert len(needle) <= 28
    return body[:start] + needle + body[start + len(needle) :], start


@pytest.mark.parametrize("at", [0.1, 0.45, 0.8])
def test_lexical_walk_reaches_the_needle_at_the_finest_level(at):
    llm = make_llm(gates=1.0, policy="lexical", chunk_size=256, tree_height=3, node_keep=4)
    text, _ = _text_with_needle(1000, at, " zebra lantern ")
    tree = llm.encode(text)
    ids = llm.prompt_ids("Where does the zebra lantern glow?")
    inj = llm.prepare_injection(tree, ids, query_text="Where does the zebra lantern glow?")
    texts = {(n.level, n.index, n.chunk): llm.span_text(tree, n.start, n.end) for n in inj.nodes[0]}
    assert "".join(texts[k] for k in sorted(texts, key=lambda k: [n for n in inj.nodes[0] if (n.level, n.index, n.chunk) == k][0].start)) == text
    holding = [k for k, t in texts.items() if "zebra" in t]
    assert holding and all(level == 3 for level, _, _ in holding), texts
    # the same choice without an explicit query text: the query tokens are decoded
    again = llm.prepare_injection(tree, ids)
    assert [(n.chunk, n.level, n.index) for n in again.nodes[0]] == [(n.chunk, n.level, n.index) for n in inj.nodes[0]]


def test_lexical_query_never_sees_scored_tokens():
    llm = make_llm(gates=1.0, policy="lexical", chunk_size=256)
    text, _ = _text_with_needle(900, 0.5, " zebra lantern ")
    tree = llm.encode(text)
    tok = llm.tokenizer
    q = torch.tensor(tok("Tell me about the garden. zebra lantern", add_special_tokens=False)["input_ids"])[None]
    labels = torch.full_like(q, -100)
    cut = len(tok("Tell me about the garden. ", add_special_tokens=False)["input_ids"])
    labels[:, cut:] = q[:, cut:]  # "zebra lantern" is the target: it must not steer the walk
    with_target = llm.prepare_injection(tree, q, labels=labels)
    changed = q.clone()
    changed[:, cut:] = torch.tensor(tok("x" * (q.shape[1] - cut), add_special_tokens=False)["input_ids"])
    without = llm.prepare_injection(tree, changed, labels=labels)
    assert [(n.chunk, n.level, n.index) for n in with_target.nodes[0]] == [(n.chunk, n.level, n.index) for n in without.nodes[0]]


def test_index_with_lexical_policy_ranks_and_cites_the_needle(tmp_path):
    llm = make_llm(gates=1.0, policy="lexical", chunk_size=256, tree_height=3, node_keep=4)
    index = ContextIndex(llm, tmp_path / "ix", top_k=1)
    for i in range(3):
        index.add_text((FILLER * 20) + f"Document {i} ends. ", doc_id=f"plain{i}")
    text, _ = _text_with_needle(2000, 0.6, " zebra lantern ")
    index.add_text(text, doc_id="needle")
    cites = index.retrieve("Where does the zebra lantern glow?")
    assert {c.doc_id for c in cites} == {"needle"}
    best = cites[0]
    assert "zebra" in best.text and best.level == 3 and best.score > 0 and best.chunk_score > 0
    ans = index.query("Where does the zebra lantern glow?", max_new_tokens=3)
    assert ans.stats["injected_states"] > 0 and ans.citations[0].doc_id == "needle"
    # the statistics follow the documents: deleting the needle leaves no chunk with those words
    index.delete("needle")
    assert all(c.score == 0 for c in index.retrieve("Where does the zebra lantern glow?"))
    index.close()


def test_expand_margin_with_lexical_scores(tmp_path):
    llm = make_llm(gates=1.0, policy="lexical", chunk_size=256, tree_height=3, node_keep=4)
    index = ContextIndex(llm, tmp_path / "ix", top_k=4, expand_margin=0.0)
    text, _ = _text_with_needle(1000, 0.3, " zebra lantern ")
    index.add_text(text)
    cites = index.retrieve("Where does the zebra lantern glow?")
    # siblings tie at 0 away from the needle, so they are expanded both: more leaves than a single walk keeps
    assert sum(c.level == 3 for c in cites) > 2
    index.close()


def test_index_policy_overrides_the_model_policy(tmp_path):
    llm = make_llm(gates=1.0, policy="right", chunk_size=256, tree_height=3, node_keep=4)
    index = ContextIndex(llm, tmp_path / "ix", top_k=1, policy="lexical")
    for i in range(3):
        index.add_text((FILLER * 20) + f"Document {i} ends. ", doc_id=f"plain{i}")
    text, _ = _text_with_needle(2000, 0.6, " zebra lantern ")
    index.add_text(text, doc_id="needle")
    best = index.retrieve("Where does the zebra lantern glow?")[0]
    assert best.doc_id == "needle" and "zebra" in best.text and best.level == 3
    assert llm.config.policy == "right"  # the model is untouched
    index.close()
    with pytest.raises(ValueError, match="policy must be"):
        ContextIndex(llm, tmp_path / "other", policy="bm25")
    with pytest.raises(ValueError, match="expand_margin needs"):
        ContextIndex(llm, tmp_path / "other2", expand_margin=0.1)
