"""ContextIndex: encode once, query many times; incremental edits; persistence; threads; processes; healing."""

from __future__ import annotations

import multiprocessing as mp
import os
import random
from concurrent.futures import ThreadPoolExecutor

import diskcache
import pytest
import torch

from conftest import make_llm
from sharedctx.index.chunking import chunk_text, split_units
from sharedctx.index import ContextIndex, DocumentNotFoundError
from sharedctx.tree import chunk_spans

CFG = dict(chunk_size=64, node_keep=4, injection_layers=2, tree_height=3, policy="query")  # the paper's walk; the default is tested apart
COLOURS = ["red", "green", "blue", "amber", "violet", "white", "black", "silver"]


def document(seed: int, paragraphs: int = 30) -> str:
    rng = random.Random(seed)
    out = []
    for p in range(paragraphs):
        lines = [f"Section {seed}.{p}: the lantern of {rng.choice(['Harrow', 'Kell', 'Orm', 'Vane'])} point is {rng.choice(COLOURS)}."]
        for _ in range(rng.randint(0, 3)):
            lines.append(" ".join(rng.choice(["tide", "rock", "gull", "keeper", "night", "shore", "stone"]) for _ in range(rng.randint(3, 9))) + ".")
        out.append("\n".join(lines) + "\n\n")
    return "".join(out)


QUESTIONS = [f"What colour is the lantern of {p} point in section {s}?" for p in ("Harrow", "Kell", "Orm", "Vane") for s in range(4)]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return make_llm(gates=1.0, **CFG)


def build(llm, directory, docs=3, **kw):
    index = ContextIndex(llm, directory, **kw)
    for i in range(docs):
        index.add_text(document(i), doc_id=f"doc{i}", metadata={"n": i})
    return index


def answer_key(ans):
    return ans.text, [(c.doc_id, c.chunk, c.level, c.index, c.char_start, c.char_end) for c in ans.citations]


# ---------------------------------------------------------------------- chunking
def test_units_cover_text_exactly():
    text = "a\n\n\nbb\n" + "x" * 500 + " y" * 300 + "\n  \nend"
    spans = list(split_units(text, 128))
    assert spans[0][0] == 0 and spans[-1][1] == len(text)
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
    assert all(e - s <= 128 for s, e in spans)
    assert text[spans[0][0] : spans[0][1]] == "a\n\n\n"  # blank lines stay with the line they end


def test_chunks_bounded_and_offsets_exact(llm):
    text = document(0)
    chunks = list(chunk_text(text, llm.tokenizer, 64))
    assert all(1 <= c.n_tokens <= 64 for c in chunks)
    assert sum(c.n_tokens for c in chunks) == len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    ids = torch.cat([c.ids for c in chunks])
    offsets = torch.cat([c.offsets for c in chunks])
    assert llm.tokenizer.decode(ids) == text and int(offsets[0, 0]) == 0 and int(offsets[-1, 1]) == len(text)
    # content-defined boundaries still pack chunks well; better when lines are short against the chunk
    for size, least in ((64, 0.65), (256, 0.8)):
        sizes = [c.n_tokens for c in chunk_text(document(0, paragraphs=120), llm.tokenizer, size)]
        assert sum(sizes) / (size * len(sizes)) > least


def test_local_edit_changes_few_chunks_unlike_fixed_chunking(llm):
    text = document(5, paragraphs=60)
    edited = text.replace("Section 5.20:", "Section 5.20 (revised after the storm of that winter):", 1)
    assert edited != text

    def chunk_set(t):
        return {tuple(c.ids.tolist()) for c in chunk_text(t, llm.tokenizer, 64)}

    new = chunk_set(edited) - chunk_set(text)
    ids_a = llm.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids_b = llm.tokenizer(edited, add_special_tokens=False)["input_ids"]
    fixed_a = {tuple(ids_a[s:e]) for s, e in chunk_spans(len(ids_a), 64)}
    fixed_new = {tuple(ids_b[s:e]) for s, e in chunk_spans(len(ids_b), 64)} - fixed_a
    assert len(new) <= 3, len(new)
    assert len(fixed_new) > 20  # fixed-count chunking would re-encode the rest of the document


# ---------------------------------------------------------------------- build once, reuse
def test_hit_miss_and_second_build_encodes_nothing(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    results = [index.add_text(document(i), doc_id=f"doc{i}", metadata={"n": i}) for i in range(3)]
    assert all(r.unchanged and r.chunks_encoded == 0 for r in results)
    index.close()
    passes = llm.encoder.passes
    fresh = ContextIndex.load(tmp_path / "ix", llm)
    again = [fresh.add_text(document(i), doc_id=f"doc{i}", metadata={"n": i}) for i in range(3)]
    other_id = fresh.add_text(document(1), doc_id="copy-of-doc1")
    assert llm.encoder.passes == passes  # the lower model never ran
    assert all(r.chunks_encoded == 0 for r in again + [other_id]) and other_id.chunks_reused == other_id.chunks
    assert fresh.store.stats["misses"] == 0


def test_first_build_encodes_each_distinct_chunk_once(llm, tmp_path):
    index = ContextIndex(llm, tmp_path / "ix")
    text = document(7) + document(7)  # the same content twice in one document
    distinct = {tuple(c.ids.tolist()) for c in chunk_text(text, llm.tokenizer, 64)}
    r = index.add_text(text)
    assert r.chunks_encoded == len(distinct) < r.chunks
    assert r.chunks_encoded + r.chunks_reused == r.chunks
    assert len(index.store) == len(distinct)


def test_insert_and_edit_encode_only_new_chunks(llm, tmp_path):
    index = build(llm, tmp_path / "ix", docs=2)
    passes = llm.encoder.passes
    r = index.add_text(document(9), doc_id="doc9")
    assert r.chunks_encoded == r.chunks and llm.encoder.passes > passes
    edited = document(9).replace("Section 9.15:", "Section 9.15 (rewritten):", 1)
    r2 = index.add_text(edited, doc_id="doc9")
    assert r2.replaced and 1 <= r2.chunks_encoded <= 3 and r2.chunks_reused >= r2.chunks - 3
    assert [d.doc_id for d in index.documents()] == ["doc0", "doc1", "doc9"]


def test_store_states_equal_core_encoding(llm, tmp_path):
    index = ContextIndex(llm, tmp_path / "ix")
    text = document(3, paragraphs=4)
    index.add_text(text, doc_id="d")
    chunk = next(chunk_text(text, llm.tokenizer, 64))
    tree = llm.encode(chunk.ids)
    stored = index.store.get_chunk(index.store.key(chunk.ids))
    assert {(l, i) for _, l, i in tree.nodes} == set(stored)
    for (_, level, i), st in tree.nodes.items():
        got = stored[(level, i)]
        assert torch.allclose(got.key, st.key, atol=1e-5)
        if st.keys is not None:
            assert torch.allclose(got.keys, st.keys, atol=1e-5) and torch.allclose(got.values, st.values, atol=1e-5)


def test_single_chunk_answer_equals_core_generation(llm, tmp_path):
    index = ContextIndex(llm, tmp_path / "ix", top_k=1)
    text = "The lantern is green.\nThe keeper is old.\n"  # one chunk: the index reads exactly what the core reads
    index.add_text(text)
    q = "What colour is the lantern?"
    ans = index.query(q, max_new_tokens=8, mode="latent")
    assert ans.text == llm.generate(q, context=text, max_new_tokens=8)
    assert ans.stats["injected_states"] > 0 and ans.citations


def test_delete_and_unknown_id(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    index.delete("doc1")
    assert [d.doc_id for d in index.documents()] == ["doc0", "doc2"]
    assert all(c.doc_id != "doc1" for q in QUESTIONS[:4] for c in index.retrieve(q, top_k_chunks=20))
    with pytest.raises(DocumentNotFoundError, match="no document 'doc1'"):
        index.delete("doc1")
    with pytest.raises(KeyError):
        index.delete("never-added")
    assert [d.doc_id for d in ContextIndex.load(tmp_path / "ix", llm).documents()] == ["doc0", "doc2"]


def test_persist_and_reload_give_same_retrieval_and_answers(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    before = [answer_key(index.query(q, max_new_tokens=6, mode=m)) for q, m in zip(QUESTIONS[:3], ("latent", "text", "hybrid"))]
    cites = [c.to_dict() for c in index.retrieve(QUESTIONS[5])]
    assert index.persist() == tmp_path / "ix"
    copy = index.persist(tmp_path / "copy")
    index.close()
    for directory in (tmp_path / "ix", copy):
        again = ContextIndex.load(directory, llm)
        after = [answer_key(again.query(q, max_new_tokens=6, mode=m)) for q, m in zip(QUESTIONS[:3], ("latent", "text", "hybrid"))]
        assert after == before
        assert [c.to_dict() for c in again.retrieve(QUESTIONS[5])] == cites
        assert again.counters["chunks_encoded"] == 0
        again.close()


def test_citations_map_back_to_text(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    docs = {f"doc{i}": document(i) for i in range(3)}
    ans = index.query(QUESTIONS[0], max_new_tokens=4)
    assert ans.citations and sum(c.n_states for c in ans.citations) == ans.stats["injected_states"]
    for c in ans.citations:
        assert docs[c.doc_id][c.char_start : c.char_end] == c.text and c.text
        assert c.metadata == {"n": int(c.doc_id[3:])}
        assert -1.0 <= c.score <= 1.0
    assert [c.score for c in ans.citations] == sorted((c.score for c in ans.citations), reverse=True)


def test_budgets_and_expanding_both_children(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    q = QUESTIONS[1]
    base = index.query(q, max_new_tokens=1, top_k_chunks=3)
    assert base.stats["chunks_selected"] == 3
    assert all(len([c for c in base.citations if (c.doc_id, c.chunk) == key]) == 4 for key in {(c.doc_id, c.chunk) for c in base.citations})
    small = index.query(q, max_new_tokens=1, max_injected_states=40)
    assert small.stats["injected_states"] <= 40 and small.stats["chunks_selected"] >= 1
    with pytest.raises(ValueError, match="max_injected_states"):
        index.retrieve(q, max_injected_states=3)
    wide = ContextIndex(llm, tmp_path / "ix", expand_margin=2.0, top_k=3)  # every split is "close": keep the leaves
    cites = wide.retrieve(q)
    assert {c.level for c in cites} == {3} and len(cites) == 3 * 8


# ---------------------------------------------------------------------- concurrency
def test_16_concurrent_queries_equal_sequential(llm, tmp_path):
    """Concurrent queries share batched forwards and each still gets the answer it gets alone."""
    build(llm, tmp_path / "ix").close()
    alone = ContextIndex.load(tmp_path / "ix", llm, max_batch_queries=1)
    modes = ["latent", "latent", "text", "hybrid"] * 4
    lengths = [6, 3, 5, 7] * 4
    sequential = [answer_key(alone.query(q, mode=m, max_new_tokens=n)) for q, m, n in zip(QUESTIONS, modes, lengths)]
    index = ContextIndex.load(tmp_path / "ix", llm, max_batch_queries=8, batch_wait_s=0.2)
    with ThreadPoolExecutor(max_workers=16) as pool:
        answers = list(pool.map(lambda a: index.query(a[0], mode=a[1], max_new_tokens=a[2]), zip(QUESTIONS, modes, lengths)))
        retrieved = list(pool.map(lambda q: [c.to_dict() for c in index.retrieve(q)], QUESTIONS))
    assert [answer_key(a) for a in answers] == sequential
    assert index.batch_stats["items"] == 16 and index.batch_stats["largest"] > 1
    assert max(a.stats["batch_size"] for a in answers) > 1
    assert all(a.timings["total_s"] >= a.timings["first_token_s"] >= a.timings["retrieve_s"] for a in answers)
    assert retrieved == [[c.to_dict() for c in index.retrieve(q)] for q in QUESTIONS]


def test_query_options_are_checked_before_batching(llm, tmp_path):
    index = build(llm, tmp_path / "ix", docs=1)
    with pytest.raises(TypeError, match="unknown query options"):
        index.query(QUESTIONS[0], temprature=0.5)
    with pytest.raises(ValueError, match="temperature"):
        index.query(QUESTIONS[0], temperature=-1.0)
    with pytest.raises(ValueError, match="max_batch_queries"):
        ContextIndex(llm, tmp_path / "other", max_batch_queries=0)
    assert index.batch_stats["items"] == 0
    index.close()


def _build_in_process(directory: str, seed: int) -> None:
    import sys

    sys.path.insert(0, os.path.dirname(__file__))
    torch.set_num_threads(1)
    from conftest import make_llm as mk

    index = ContextIndex(mk(gates=1.0, **CFG), directory)
    order = [0, 1, 2, 3] if seed == 0 else [3, 2, 1, 0]
    for i in order:
        index.add_text(document(i), doc_id=f"doc{i}")
    index.close()


def test_two_processes_building_one_store_end_consistent(llm, tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_build_in_process, args=(str(tmp_path / "ix"), s)) for s in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    index = ContextIndex.load(tmp_path / "ix", llm)
    assert [d.doc_id for d in index.documents()] == sorted(d.doc_id for d in index.documents()) or len(index) == 4
    assert sorted(d.doc_id for d in index.documents()) == [f"doc{i}" for i in range(4)]
    for d in index.live.all():
        for key in d.chunk_keys:
            assert index.store.get_chunk(key) is not None
    assert index.store.stats["corrupt"] == 0 and index.store.stats["refused"] == 0
    passes = llm.encoder.passes
    for i in range(4):
        assert index.add_text(document(i), doc_id=f"doc{i}").chunks_encoded == 0
    ans = index.query(QUESTIONS[0], max_new_tokens=3)
    assert ans.stats["chunks_encoded"] == 0 and llm.encoder.passes - passes == 1  # only the query key pass


# ---------------------------------------------------------------------- healing
def test_corruption_detected_and_healed(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    before = answer_key(index.query(QUESTIONS[2], max_new_tokens=6))
    # bit rot and truncation inside the database rows (entries this small live in SQLite; large ones in files,
    # see test_store.py)
    import sqlite3

    con = sqlite3.connect(str(tmp_path / "ix" / "nodes" / "cache.db"))
    rows = con.execute("SELECT rowid, value FROM Cache WHERE key LIKE 'chunk/%'").fetchall()
    assert rows and all(v is not None for _, v in rows)
    for i, (rowid, value) in enumerate(rows):
        bad = bytes(value[: len(value) // 2]) if i % 2 else bytes(value[:300]) + b"\x00\x01\x02" + bytes(value[303:])
        con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bad, rowid))
    con.commit()
    con.close()
    healed = index.query(QUESTIONS[2], max_new_tokens=6)
    # re-encoded one by one rather than in the build's batches, keys differ in the last float bits: near-tied
    # citations may swap places, but the answer and the cited nodes are the same
    assert healed.text == before[0] and sorted(answer_key(healed)[1]) == sorted(before[1])
    assert healed.stats["chunks_encoded"] > 0 and index.store.stats["corrupt"] == healed.stats["chunks_encoded"]
    again = index.query(QUESTIONS[2], max_new_tokens=6)
    assert again.stats["chunks_encoded"] == 0 and answer_key(again) == answer_key(healed)


class _Boom:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_pickle_planted_in_index_is_refused_and_recomputed(llm, tmp_path):
    index = build(llm, tmp_path / "ix")
    before = answer_key(index.query(QUESTIONS[3], max_new_tokens=6))
    marker = tmp_path / "pwned"
    raw = diskcache.Cache(str(tmp_path / "ix" / "nodes"))
    for d in index.live.all():
        for key in d.chunk_keys:
            raw.set(key, _Boom(str(marker)))
    raw.close()
    after = index.query(QUESTIONS[3], max_new_tokens=6)
    assert not marker.exists()
    assert answer_key(after) == before and after.stats["chunks_encoded"] > 0
    assert index.store.stats["refused"] == after.stats["chunks_encoded"]


def test_eviction_then_recompute(llm, tmp_path):
    index = build(llm, tmp_path / "ix", size_limit=60_000)
    assert index.store.stats["volume_bytes"] <= 60_000 + 20_000
    total = sum(d.n_chunks for d in index.live.all())
    assert len(index.store) < total  # evicted
    ans = index.query(QUESTIONS[4], max_new_tokens=4, top_k_chunks=8)
    assert ans.stats["chunks_encoded"] + ans.stats["chunks_cached"] == ans.stats["chunks_selected"]
    assert ans.stats["chunks_encoded"] > 0


# ---------------------------------------------------------------------- lazy encoding
def test_lazy_index_encodes_nothing_to_add_and_retrieve_and_equals_eager(llm, tmp_path, monkeypatch):
    eager = build(llm, tmp_path / "eager", policy="lexical")
    calls = []
    real = llm.encoder.encode_chunks
    monkeypatch.setattr(llm.encoder, "encode_chunks", lambda chunks: calls.append(len(chunks)) or real(chunks))
    lazy = ContextIndex(llm, tmp_path / "lazy", policy="lexical", encode="lazy")
    for i in range(3):
        r = lazy.add_text(document(i), doc_id=f"doc{i}", metadata={"n": i})
        assert r.chunks_encoded == 0 and r.chunks_deferred == r.chunks > 1
    for q in QUESTIONS[:6]:  # retrieval and text-mode answers: no lower-model pass at all, the same results
        cites = [(c.doc_id, c.chunk, c.level, c.index, c.score, c.n_states, c.text) for c in lazy.retrieve(q)]
        assert cites == [(c.doc_id, c.chunk, c.level, c.index, c.score, c.n_states, c.text) for c in eager.retrieve(q)]
        assert answer_key(lazy.query(q, mode="text", max_new_tokens=4)) == answer_key(eager.query(q, mode="text", max_new_tokens=4))
    assert calls == []
    # a latent query encodes the chunks it injects, once, and answers as the eager index does
    first = lazy.query(QUESTIONS[0], mode="latent", max_new_tokens=5)
    assert first.stats["chunks_encoded"] > 0 and calls
    assert answer_key(first) == answer_key(eager.query(QUESTIONS[0], mode="latent", max_new_tokens=5))
    again = lazy.query(QUESTIONS[0], mode="latent", max_new_tokens=5)
    assert again.stats["chunks_encoded"] == 0 and answer_key(again) == answer_key(first)
    # reopened, a lazy index keeps its chunks' text; a key-based policy is refused with the reason
    lazy.close()
    reopened = ContextIndex.load(tmp_path / "lazy", llm, policy="lexical")
    assert answer_key(reopened.query(QUESTIONS[1], mode="text", max_new_tokens=4)) == answer_key(eager.query(QUESTIONS[1], mode="text", max_new_tokens=4))
    reopened.close()
    with ContextIndex.load(tmp_path / "lazy", llm, policy="query") as keyed:
        with pytest.raises(Exception, match="encode='lazy'"):
            keyed.retrieve(QUESTIONS[0])
    with pytest.raises(ValueError, match="needs policy='lexical'"):
        ContextIndex(llm, tmp_path / "x", policy="query", encode="lazy")
    with pytest.raises(ValueError, match="'eager' or 'lazy'"):
        ContextIndex(llm, tmp_path / "y", policy="lexical", encode="later")
    eager.close()


def test_prune_reclaims_removed_nodes_and_spares_documents_other_processes_added(llm, tmp_path):
    pruner = ContextIndex(llm, tmp_path / "ix")
    pruner.add_text(document(0), doc_id="gone")
    other = ContextIndex(llm, tmp_path / "ix")  # another process: its view of the table is its own
    other.add_text(document(1), doc_id="kept")
    reader = ContextIndex(llm, tmp_path / "ix")  # a reader holding the record of "kept"
    kept = reader.table.get("kept").chunk_keys
    pruner.delete("gone")
    removed = pruner.prune()  # pruner never saw "kept": the table on disk is read right before deleting
    assert removed > 0 and all(k in pruner.store for k in kept)
    assert pruner.prune() == 0
    reader.refresh()  # it sees "gone" removed (a reader still querying "gone" would encode its chunks again)
    ans = reader.query("What colour is the lantern of Harrow point?", max_new_tokens=2)
    assert ans.stats.chunks_encoded == 0 and ans.stats.chunks_cached > 0  # nothing it reads was lost

