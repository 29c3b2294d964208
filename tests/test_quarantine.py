"""A damaged document record is never deleted, not even by a read: it is quarantined (bytes kept), reported with
how to restore it, and restored from its source file when that file still holds the same text. A corrupt node
database says that nodes are a rebuildable cache and how to rebuild it."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest
from conftest import damage_entry

from sharedctx.cli import main
from sharedctx.errors import StoreError
from sharedctx.index import ContextIndex

TEXT = "The lighthouse keeper writes in the logbook every evening. " * 12


def build(llm, tmp_path: Path) -> tuple[Path, Path]:
    source = tmp_path / "keeper.txt"
    source.write_text(TEXT)
    store = tmp_path / "ix"
    index = ContextIndex(llm, store)
    index.add(source)
    index.close()
    return store, source


def damage_record(store: Path) -> bytes:
    """Flip bytes inside the one document record (in its SQLite row, or in its file when stored as one)."""
    return damage_entry(store / "docs", "doc/%", 200, b"\xff\xfe\xfd")


def kept_bytes(store: Path) -> list[bytes]:
    """The bytes of every quarantined record still on disk."""
    con = sqlite3.connect(str(store / "docs" / "cache.db"))
    rows = con.execute("SELECT value, filename FROM Cache WHERE key LIKE 'quarantine/%'").fetchall()
    con.close()
    return [bytes(v) if v is not None else (store / "docs" / f).read_bytes() for v, f in rows]


def test_list_quarantines_a_damaged_record_and_never_deletes_it(llm, tmp_path, capsys):
    store, source = build(llm, tmp_path)
    bad = damage_record(store)
    for _ in range(2):  # the first read sets it aside; later ones still report it
        assert main(["index", "list", "--store", str(store)]) == 0
        out, err = capsys.readouterr()
        assert "0 documents, 1 damaged (quarantined)" in out
        assert str(source) in err and "restored automatically" in err and f"sharedctx index add --store {store}" in err
        assert kept_bytes(store) == [bad]
    assert main(["index", "list", "--store", str(store), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["documents"] == [] and [q["doc_id"] for q in listed["quarantined"]] == [str(source)]
    assert listed["quarantined"][0]["restorable"] is True

    source.write_text(TEXT + " Changed since.")  # no longer the same text: not restored, reported with the way back
    index = ContextIndex(llm, store)
    assert index.documents() == []
    (q,) = index.quarantined()
    assert q.doc_id == str(source) and not q.restorable and "has changed" in q.why_not
    assert f"sharedctx index remove --store {store}" in q.advice(store)
    index.close()
    assert kept_bytes(store) == [bad]
    assert main(["index", "remove", "--store", str(store), str(source)]) == 0  # dropping it is the user's call
    assert kept_bytes(store) == []


def test_a_damaged_record_is_restored_from_its_unchanged_source(llm, tmp_path):
    store, source = build(llm, tmp_path)
    index = ContextIndex(llm, store)
    (before,) = index.documents()
    index.close()
    damage_record(store)
    index = ContextIndex(llm, store)  # opening reads the table: quarantined, then restored from the file
    (after,) = index.documents()
    assert (after.doc_id, after.tokens, after.chunks) == (before.doc_id, before.tokens, before.chunks)
    assert index.quarantined() == [] and kept_bytes(store) == []
    assert index.query("Who writes in the logbook?", max_new_tokens=3).citations
    index.close()


def test_a_record_damaged_under_an_open_index_is_written_back(llm, tmp_path):
    store, source = build(llm, tmp_path)
    index = ContextIndex(llm, store)
    source.unlink()  # no source to restore from: the open index's copy is the only one
    damage_record(store)
    index.refresh()
    assert [d.doc_id for d in index.documents()] == [str(source)] and index.quarantined() == []
    index.close()
    assert main(["index", "list", "--store", str(store)]) == 0  # sound on disk again


def test_a_corrupt_node_database_says_how_to_rebuild(llm, tmp_path):
    store, _ = build(llm, tmp_path)
    (store / "nodes" / "cache.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(StoreError, match=r"(?s)cache that can be rebuilt.*rm -r .*nodes.*documents beside it are kept"):
        ContextIndex(llm, store)


def test_context_index_delete_drops_a_quarantined_document(llm, tmp_path):
    """`ContextIndex.delete` removes a quarantined document as `sharedctx index remove` does (it raised before)."""
    store, source = build(llm, tmp_path)
    bad = damage_record(store)
    source.write_text(TEXT + " Changed since.")  # not restorable: stays quarantined
    index = ContextIndex(llm, store)
    assert index.documents() == [] and [q.doc_id for q in index.quarantined()] == [str(source)]
    assert kept_bytes(store) == [bad]
    index.delete(str(source))
    assert index.quarantined() == [] and kept_bytes(store) == []
    with pytest.raises(KeyError):
        index.delete(str(source))
    index.close()
