"""The lexical index (`sharedctx.index.lexicon`): BM25 through inverted postings equals the old scan
(`sharedctx.ops.scoring.BM25`) bit for bit; it follows adds, replacements and deletions (add then delete equals never
added); kept on disk, what is loaded equals what is counted again; a missing, stale or damaged lexicon is counted
again from the documents with a message, never trusted; an index made before it works."""

from __future__ import annotations

import logging
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import damage_entry, make_llm

from sharedctx import ContextIndex
from sharedctx.index.documents import _Doc
from sharedctx.index.lexicon import ChunkLexicon, LexiconFiles, Segment, chunk_texts
from sharedctx.index.forest import Forest
from sharedctx.ops.scoring import BM25

pytestmark = pytest.mark.usefixtures("one_thread")

WORDS = [f"w{i}" for i in range(400)] + ["the", "and", "of", "Zebra", "lantern", "café", "x_1", "42"]
QUESTIONS = ["w1 w2 w3", "where is the zebra lantern?", "w399 w0 w0 of", "nothing matches here", "café 42 x_1", "w7"]


def fake_doc(doc_id: str, chunks: list[str], seq: int = 0) -> _Doc:
    """A document record without a model: one "token" per chunk, spanning the chunk's text."""
    text, offsets = "", []
    for c in chunks:
        offsets.append((len(text), len(text) + len(c)))
        text += c + " "
    n = len(chunks)
    return _Doc(doc_id, seq, text, torch.zeros(n, dtype=torch.long), torch.tensor(offsets, dtype=torch.long).reshape(n, 2),
                torch.arange(n + 1), torch.zeros(n, 4), [f"chunk/{doc_id}/{i}" for i in range(n)], {}, None)


def random_docs(rng: random.Random, n: int, prefix: str = "d") -> list[_Doc]:
    docs = []
    for i in range(n):
        chunks = [" ".join(rng.choice(WORDS[: rng.randint(3, len(WORDS))]) for _ in range(rng.randint(0, 60)))
                  for _ in range(rng.randint(1, 6))]
        docs.append(fake_doc(f"{prefix}{i}", chunks, seq=rng.randint(0, 5)))
    return docs


def forest_texts(docs: list[_Doc]) -> list[str]:
    forest = Forest.of(docs, 4)
    return [t for d in forest.docs for t in chunk_texts(d)]


def assert_same_as_bm25(view, docs: list[_Doc]) -> None:
    texts = forest_texts(docs)
    bm = BM25(texts)
    for q in QUESTIONS:
        new, old = view.scores(q), bm.scores(q)
        assert torch.equal(new, old), (q, float((new - old).abs().max()))
        assert torch.argsort(new, descending=True, stable=True).tolist() == torch.argsort(old, descending=True, stable=True).tolist()
        others = texts[:3] + ["zebra zebra lantern", ""]
        assert torch.equal(view.scores(q, others), bm.scores(q, others))


@pytest.mark.parametrize("seed", range(4))
def test_scores_equal_the_bm25_scan_on_random_corpora(seed):
    docs = random_docs(random.Random(seed), 30)
    lexicon = ChunkLexicon()
    assert_same_as_bm25(lexicon.view(Forest.of(docs, 4).docs), docs)
    assert_same_as_bm25(Forest.of(docs, 4).lexicon(), docs)  # a forest without a kept lexicon counts its own
    assert ChunkLexicon().view([]).scores("w1").numel() == 0


def test_adds_removals_and_replacements_keep_it_equal_and_tiers_few():
    rng = random.Random(7)
    lexicon = ChunkLexicon()
    docs: dict[str, _Doc] = {}
    for step in range(120):
        if docs and rng.random() < 0.3:
            doc_id = rng.choice(sorted(docs))
            if rng.random() < 0.5:
                del docs[doc_id]
                lexicon.remove(doc_id)
            else:  # replaced: a new record of the same id
                docs[doc_id] = random_docs(rng, 1, prefix=doc_id + "-")[0]
                docs[doc_id].doc_id = doc_id
                lexicon.put(docs[doc_id])
        else:
            doc = random_docs(rng, 1, prefix=f"s{step}-")[0]
            docs[doc.doc_id] = doc
            lexicon.put(doc, Segment.of(doc))
        if step % 10 == 9:
            ordered = Forest.of(list(docs.values()), 4).docs
            assert_same_as_bm25(lexicon.view(ordered), ordered)
            assert len(lexicon._tiers) <= 2 + int(np.log2(max(2, sum(t.nnz for t in lexicon._tiers))))


def test_add_then_delete_equals_never_added():
    docs = random_docs(random.Random(1), 12)
    extra = random_docs(random.Random(2), 3, prefix="extra")
    never, added = ChunkLexicon(), ChunkLexicon()
    never.view(docs)
    added.view(docs)
    for d in extra:
        added.put(d)
    added.view(docs + extra)
    for d in extra:
        added.remove(d.doc_id)
    a, b = never.view(docs), added.view(docs)
    for q in QUESTIONS:
        assert torch.equal(a.scores(q), b.scores(q))
    assert {t: a.df(t) for t in never.vocab} == {t: b.df(t) for t in never.vocab}
    assert all(b.df(t) == 0 for t in set(added.vocab) - set(never.vocab))


# ---------------------------------------------------------------------- in a ContextIndex, on disk
FILLER = "The cat sat on the mat and looked at the garden for a while. "
TEXTS = {
    "keeper": "The lighthouse keeper writes in the logbook every evening before the lamp is lit. " * 9,
    "baker": "The baker opens the shop at five and sells rye bread to the fishermen on the quay. " * 9,
    "zebra": FILLER * 12 + "A zebra lantern glows green above the harbour gate. " + FILLER * 6,
}
ASK = ["Who writes in the logbook?", "What does the baker sell?", "Where does the zebra lantern glow?", "garden cat"]


@pytest.fixture(scope="module")
def lexical_llm():
    return make_llm(gates=1.0, policy="lexical", chunk_size=128, tree_height=3, node_keep=4)


def open_index(llm, store: Path, **options) -> ContextIndex:
    return ContextIndex(llm, store, encode="lazy", max_batch_queries=1, **options)


def answers(index: ContextIndex) -> list[list[tuple]]:
    return [[(c.doc_id, c.chunk, c.level, c.index, round(c.score, 5), round(c.chunk_score, 5)) for c in index.retrieve(q)] for q in ASK]


def build(llm, store: Path, texts=TEXTS) -> list[list[tuple]]:
    with open_index(llm, store) as index:
        for doc_id, text in texts.items():
            index.add_text(text, doc_id=doc_id)
        return answers(index)


def index_view(index: ContextIndex):
    return index.live.forest().lexicon()


def test_index_ranks_as_the_scan_and_persisted_equals_counted(lexical_llm, tmp_path):
    expected = build(lexical_llm, tmp_path / "ix")
    with open_index(lexical_llm, tmp_path / "ix") as index:
        assert answers(index) == expected
        view = index_view(index)
        assert_same_as_bm25(view, index.live.all())
        files = LexiconFiles(tmp_path / "ix" / "lexicon")
        assert sorted(files.ids()) == sorted(TEXTS)
        for doc in index.live.all():  # what is on disk is what counting the record gives
            kept, state = files.load(doc.doc_id, Segment.of(doc).checksum)
            fresh = Segment.of(doc)
            assert state == "ok" and kept.terms == fresh.terms
            for name in ("indptr", "local", "counts"):
                assert np.array_equal(getattr(kept, name), getattr(fresh, name))
        files.close()


def test_add_then_delete_in_an_index_leaves_no_trace(lexical_llm, tmp_path):
    expected = build(lexical_llm, tmp_path / "ix")
    with open_index(lexical_llm, tmp_path / "ix") as index:
        index.add_text("The zebra keeper sells lantern bread in the logbook garden. " * 5, doc_id="late")
        assert answers(index) != expected
        index.delete("late")
        assert answers(index) == expected
        assert "late" not in index.lexicon.files.ids()


def test_missing_stale_or_damaged_lexicon_is_counted_again_with_a_message(lexical_llm, tmp_path, caplog):
    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    # stale: the baker's kept counts are another text's; damaged: the keeper's blob has flipped bytes
    files = LexiconFiles(store / "lexicon")
    files.save(Segment.count("baker", ["nothing but other words"], checksum="0" * 64))
    files.close()
    damage_entry(store / "lexicon", "seg/keeper", 60)
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:
        assert answers(index) == expected
    assert "stale (1) or damaged (1)" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:  # written back
        assert answers(index) == expected
    assert "counted the words" not in caplog.text


def test_an_index_from_before_the_lexicon_works_and_gets_one(lexical_llm, tmp_path, caplog):
    import shutil

    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    shutil.rmtree(store / "lexicon")  # the layout of an older index: documents and nodes only
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:
        assert answers(index) == expected
    assert "missing (3: an index from before the lexicon" in caplog.text
    assert sorted(LexiconFiles(store / "lexicon").ids()) == sorted(TEXTS)


def test_read_only_index_without_a_lexicon_counts_in_memory_and_writes_nothing(lexical_llm, tmp_path):
    import shutil

    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    shutil.rmtree(store / "lexicon")
    before = sorted(p.name for p in store.iterdir())
    with open_index(lexical_llm, store, read_only=True) as index:
        assert answers(index) == expected
    assert sorted(p.name for p in store.iterdir()) == before


def test_other_writers_and_merged_shards_are_followed(lexical_llm, tmp_path, caplog):
    store = tmp_path / "ix"
    build(lexical_llm, store, {"keeper": TEXTS["keeper"]})
    reader = open_index(lexical_llm, store)
    with open_index(lexical_llm, store) as writer:  # another process's handle
        writer.add_text(TEXTS["baker"], doc_id="baker")
    reader.refresh()
    assert reader.retrieve(ASK[1])[0].doc_id == "baker"
    build(lexical_llm, tmp_path / "shard", {"zebra": TEXTS["zebra"]})
    with caplog.at_level(logging.INFO, logger="sharedctx"):
        reader.merge([tmp_path / "shard"])
        assert reader.retrieve(ASK[2])[0].doc_id == "zebra"
    assert "counted the words" not in caplog.text  # the merge wrote the shard's counts with its records
    assert_same_as_bm25(index_view(reader), reader.live.all())
    reader.delete("baker")
    assert sorted(reader.lexicon.files.ids()) == ["keeper", "zebra"]
    from sharedctx.index import DocumentTable

    table = DocumentTable(store)  # as `sharedctx index remove` does, without a model: the record only
    table.delete("keeper")
    table.close()
    reader.refresh()
    assert_same_as_bm25(index_view(reader), reader.live.all())
    assert "keeper" in reader.lexicon.files.ids()  # an orphan until pruned
    reader.prune()
    assert reader.lexicon.files.ids() == ["zebra"]
    reader.close()


def test_cli_remove_and_prune_drop_kept_counts(lexical_llm, tmp_path):
    from sharedctx.cli import main

    store = tmp_path / "ix"
    build(lexical_llm, store)
    assert main(["index", "remove", "--store", str(store), "baker"]) == 0
    files = LexiconFiles(store / "lexicon")
    assert sorted(files.ids()) == ["keeper", "zebra"]
    files.save(Segment.count("gone", ["an orphan left by a crash"], "0" * 64))
    files.close()
    assert main(["index", "prune", "--store", str(store)]) == 0
    files = LexiconFiles(store / "lexicon")
    assert sorted(files.ids()) == ["keeper", "zebra"]
    files.close()


def test_a_quarantined_document_leaves_the_lexicon_and_returns_restored(lexical_llm, tmp_path):
    from test_quarantine import damage_record

    sources = tmp_path / "src"
    sources.mkdir()
    store = tmp_path / "ix"
    with open_index(lexical_llm, store) as index:
        for doc_id, text in TEXTS.items():
            (sources / f"{doc_id}.txt").write_text(text)
            index.add(sources / f"{doc_id}.txt", doc_id=doc_id)
    damage_record_of(store, "baker", damage_record)
    (sources / "baker.txt").rename(sources / "away.txt")  # not restorable: the document is gone from the index
    with open_index(lexical_llm, store) as index:
        assert "baker" not in index and [q.doc_id for q in index.quarantined()] == ["baker"]
        assert_same_as_bm25(index_view(index), index.live.all())
    (sources / "away.txt").rename(sources / "baker.txt")  # its source is back: restored when opened
    with open_index(lexical_llm, store) as index:  # (restored as a new document: it comes last, so ties may differ)
        assert "baker" in index and index.retrieve(ASK[1])[0].doc_id == "baker"
        assert_same_as_bm25(index_view(index), index.live.all())


def damage_record_of(store: Path, doc_id: str, damage) -> None:
    """Flip bytes in ``doc_id``'s record only (`damage` flips the first record it finds: move the others aside)."""
    con = sqlite3.connect(str(store / "docs" / "cache.db"))
    con.execute("UPDATE Cache SET key = 'hold/' || key WHERE key LIKE 'doc/%' AND key != ?", ("doc/" + doc_id,))
    con.commit()
    damage(store)
    con.execute("UPDATE Cache SET key = substr(key, 6) WHERE key LIKE 'hold/%'")
    con.commit()
    con.close()


def test_a_persisted_copy_carries_its_counts(lexical_llm, tmp_path, caplog):
    expected = build(lexical_llm, tmp_path / "ix")
    with open_index(lexical_llm, tmp_path / "ix") as index:
        index.persist(tmp_path / "copy")
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, tmp_path / "copy") as copy:
        assert answers(copy) == expected
    assert "counted the words" not in caplog.text


def test_an_index_counted_before_stemming_upgrades_itself_once(lexical_llm, tmp_path, caplog, monkeypatch):
    """Segments written by the tokenizer of version 1 (surface words, no tokenizer recorded) are found by their
    tokenizer, counted again with stems, written back, and said so once; the index then answers as a new one."""
    import functools

    import sharedctx.index.lexicon as lexicon_module
    from sharedctx.ops.scoring import tokenizer_id, words

    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    files = LexiconFiles(store / "lexicon")
    with monkeypatch.context() as m:  # what sharedctx wrote before stemming: surface words, no "tokenizer" in the blob
        m.setattr(lexicon_module, "words", functools.partial(words, stem=False))
        for doc_id in TEXTS:
            tensors, meta = Segment.count(doc_id, [TEXTS[doc_id]], checksum="0" * 64).to_blob()
            del meta["tokenizer"]
            files._blobs.set("seg/" + doc_id, tensors, meta)
    old, state = files.load("keeper", "0" * 64)
    assert old is None and state == "tokenizer"
    files.close()
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:
        assert answers(index) == expected
    assert "upgraded the word counts of 3 documents to tokenizer version 2" in caplog.text
    assert "WARNING" not in caplog.text and "stale" not in caplog.text
    files = LexiconFiles(store / "lexicon")
    with open_index(lexical_llm, store) as index:
        for doc_id in TEXTS:  # written back, stemmed
            seg, state = files.load(doc_id, lexicon_module.doc_checksum(index.live.get(doc_id)))
            assert state == "ok" and seg.tokenizer == tokenizer_id()
            assert doc_id != "keeper" or ("lighthous" in seg.terms and "lighthouse" not in seg.terms)
    files.close()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:  # upgraded once
        assert answers(index) == expected
    assert "upgraded" not in caplog.text and "counted the words" not in caplog.text
