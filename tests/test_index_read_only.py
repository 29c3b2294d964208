"""``ContextIndex.load(dir, llm, read_only=True)``: an index opened for answering writes nothing to its directory (no
manifest, no access times, no SQLite journal or lock file), so several processes can serve one store; every write
raises `ReadOnlyIndexError`; a chunk missing from the store is encoded in memory, not stored."""

from __future__ import annotations

import sqlite3

import pytest
from conftest import snapshot

from sharedctx.errors import ReadOnlyIndexError, StoreError
from sharedctx.index import ContextIndex
from sharedctx.index.store import TreeStore

DOCS = {
    "keeper": "The lighthouse keeper writes in the logbook every evening before the lamp is lit. " * 6,
    "baker": "The baker opens the shop at five and sells rye bread to the fishermen on the quay. " * 6,
}
QUESTIONS = ("When does the keeper write in the logbook?", "What does the baker sell?")


@pytest.fixture
def built(llm, tmp_path, one_thread):
    store = tmp_path / "ix"
    with ContextIndex(llm, store) as index:
        for doc_id, text in DOCS.items():
            index.add_text(text, doc_id=doc_id)
    return store


def answers(index: ContextIndex) -> list[list[int]]:
    return [index.query(q, max_new_tokens=6).token_ids for q in QUESTIONS]


def test_read_only_index_answers_like_a_writable_one_and_writes_nothing(llm, built):
    with ContextIndex.load(built, llm, max_batch_queries=1) as writable:
        expected = answers(writable)
        cited = [c.doc_id for c in writable.retrieve(QUESTIONS[1])]
    before = snapshot(built)
    index = ContextIndex.load(built, llm, read_only=True)
    assert answers(index) == expected
    assert [c.doc_id for c in index.retrieve(QUESTIONS[1])] == cited
    assert {d.doc_id for d in index.documents()} == set(DOCS)
    assert snapshot(built) == before  # nothing written while open: no -wal or -shm file either
    for write in (lambda: index.add_text("more text", doc_id="x"), lambda: index.add_many([built]),
                  lambda: index.delete("keeper"), index.prune, lambda: index.merge([])):
        with pytest.raises(ReadOnlyIndexError, match="open read-only"):
            write()
    with pytest.raises(ReadOnlyIndexError):
        index.store.put_chunk("chunk/x", {}, n_tokens=1)
    index.close()
    assert snapshot(built) == before


def test_chunks_missing_from_a_read_only_store_are_encoded_in_memory(llm, built):
    with ContextIndex.load(built, llm, max_batch_queries=1) as writable:
        expected = answers(writable)
        keys = sorted(writable.store.chunk_keys())
    store = TreeStore(built / "nodes")  # evicted, as a size-limited store does
    for key in keys:
        store.delete(key)
    store.close()
    before = snapshot(built)
    with ContextIndex.load(built, llm, read_only=True, max_batch_queries=1) as index:
        for rounds in (1, 2):  # not stored: encoded again by each query that needs it
            assert answers(index) == expected
            assert index.counters["chunks_encoded"] >= rounds
        assert not any(key in index.store for key in keys)
    assert snapshot(built) == before


def test_read_only_needs_a_built_and_closed_index(llm, tmp_path, built):
    with pytest.raises(StoreError, match="holds no sharedctx index"):
        ContextIndex.load(tmp_path / "nothing", llm, read_only=True)
    with pytest.raises(StoreError, match="build it first"):
        ContextIndex(llm, tmp_path / "empty", read_only=True)
    assert not (tmp_path / "empty").exists()
    writer = ContextIndex.load(built, llm)
    writer.add_text("A late addition about the harbour master and his dog. " * 4, doc_id="late")
    try:  # its writes are still in the SQLite journal: a snapshot would miss them
        with pytest.raises(StoreError, match="not yet checkpointed"):
            ContextIndex.load(built, llm, read_only=True)
    finally:
        writer.close()
    with ContextIndex.load(built, llm, read_only=True) as index:  # closed: everything is in the snapshot
        assert "late" in index


def test_a_damaged_record_is_reported_but_left_in_place(llm, built, caplog):
    con = sqlite3.connect(str(built / "docs" / "cache.db"))
    rowid, value = con.execute("SELECT rowid, value FROM Cache WHERE key = 'doc/baker'").fetchone()
    con.execute("UPDATE Cache SET value = ? WHERE rowid = ?", (bytes(value[:100]) + b"\xff" + bytes(value[101:]), rowid))
    con.commit()
    con.close()
    before = snapshot(built)
    with ContextIndex.load(built, llm, read_only=True) as index:
        assert [d.doc_id for d in index.documents()] == ["keeper"]
        assert index.quarantined() == []  # not moved aside: that is a write
    assert "left as it is (open read-only)" in caplog.text
    assert snapshot(built) == before
