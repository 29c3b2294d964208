"""Damaged caches and records (issue 24): the lexicon is a cache, so a damaged one is rebuilt, never a reason the index
cannot be opened; a damaged source entry beside a quarantined record does not lock the index; read-only openings of
damaged databases raise `StoreError` naming the file; a lexicon segment whose row count disagrees with its document is
counted again. Each test failed on the code before issue 24."""

from __future__ import annotations

import logging
import shutil
import sqlite3
from pathlib import Path

import pytest
from conftest import snapshot
from test_lexicon import ASK, TEXTS, answers, build, lexical_llm, open_index  # noqa: F401
from test_quarantine import build as build_one, damage_record, kept_bytes

from sharedctx.cli import main
from sharedctx.errors import StoreError
from sharedctx.index import ContextIndex
from sharedctx.index.lexicon import LexiconFiles, Segment, chunk_texts

pytestmark = pytest.mark.usefixtures("one_thread")


def test_a_damaged_source_entry_beside_a_quarantined_record_does_not_lock_the_index(llm, tmp_path, capsys):
    store, source = build_one(llm, tmp_path)
    damage_record(store)
    con = sqlite3.connect(str(store / "docs" / "cache.db"))
    con.execute("UPDATE Cache SET value = ? WHERE key LIKE 'src/%'", (b"{garbage",))
    con.commit()
    con.close()
    assert main(["index", "list", "--store", str(store)]) == 0
    out, err = capsys.readouterr()
    assert "0 documents, 1 damaged" in out and "its source entry" in err and "is damaged too" in err
    with ContextIndex(llm, store) as index:  # opening (as `ask --store` does) reports it too
        (q,) = index.quarantined()
        assert not q.restorable and q.doc_id == str(source)
    assert main(["index", "remove", "--store", str(store), str(source)]) == 0
    assert kept_bytes(store) == []


def _truncate(db: Path) -> None:
    data = db.read_bytes()
    db.write_bytes(data[: len(data) // 3])


def _garbage(db: Path) -> None:
    db.write_bytes(b"this is not a database at all" * 200)


@pytest.mark.parametrize("damage", [_truncate, _garbage], ids=["truncated", "garbage"])
def test_a_damaged_lexicon_database_is_rebuilt_with_a_log_line(lexical_llm, tmp_path, caplog, damage):
    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    damage(store / "lexicon" / "cache.db")
    before = snapshot(store)
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store, read_only=True) as index:
        assert answers(index) == expected  # read-only: counted in memory, nothing written
    assert snapshot(store) == before and "counting every document's words in memory" in caplog.text
    for policy in ("lexical", "query", "right"):  # every policy opens it (the others keep the lexicon for later)
        caplog.clear()
        damage(store / "lexicon" / "cache.db")
        with caplog.at_level(logging.INFO, logger="sharedctx"), ContextIndex(lexical_llm, store, policy=policy, encode="lazy" if policy == "lexical" else None, max_batch_queries=1) as index:
            if policy == "lexical":
                assert answers(index) == expected
        assert "was damaged" in caplog.text and "deleted it" in caplog.text
    with open_index(lexical_llm, store) as index:  # rebuilt: sound from now on
        assert answers(index) == expected and sorted(index.lexicon.files.ids()) == sorted(TEXTS)


def test_index_remove_succeeds_and_says_so_with_a_damaged_lexicon_database(lexical_llm, tmp_path, capsys):
    store = tmp_path / "ix"
    build(lexical_llm, store)
    _garbage(store / "lexicon" / "cache.db")
    assert main(["index", "remove", "--store", str(store), "baker"]) == 0
    assert "removed 1 documents" in capsys.readouterr().out
    with open_index(lexical_llm, store) as index:
        assert sorted(d.doc_id for d in index.documents()) == ["keeper", "zebra"]


@pytest.mark.parametrize("folder", ["docs", "nodes"])
def test_read_only_opening_of_a_damaged_database_raises_store_error_naming_it(llm, tmp_path, folder):
    store, _ = build_one(llm, tmp_path)
    _garbage(store / folder / "cache.db")
    with pytest.raises(StoreError, match=str(store / folder / "cache.db")) as info:
        ContextIndex.load(store, llm, read_only=True)
    assert not isinstance(info.value, sqlite3.DatabaseError)


def test_read_only_reading_of_a_database_damaged_later_raises_store_error(llm, tmp_path):
    store, _ = build_one(llm, tmp_path)
    index = ContextIndex.load(store, llm, read_only=True, max_batch_queries=1)
    db = store / "docs" / "cache.db"
    shutil.copyfile(db, tmp_path / "saved.db")
    _garbage(db)
    index.table._blobs._cache._local = type(index.table._blobs._cache._local)()  # a new connection, as a new thread makes
    with pytest.raises(StoreError, match=str(db)):
        index.table.ids()
    index.close()


@pytest.mark.parametrize("rows", ["extra", "none"])
def test_a_segment_whose_rows_disagree_with_its_document_is_counted_again(lexical_llm, tmp_path, caplog, rows):
    store = tmp_path / "ix"
    expected = build(lexical_llm, store)
    with open_index(lexical_llm, store) as index:
        doc = index.live.get("keeper")
        texts = chunk_texts(doc) + ["extra words for a chunk that is not there"] if rows == "extra" else []
        bad = Segment.count("keeper", texts, Segment.of(doc).checksum)  # the right checksum, the wrong rows
    files = LexiconFiles(store / "lexicon")
    files.save(bad)
    files.close()
    with caplog.at_level(logging.INFO, logger="sharedctx"), open_index(lexical_llm, store) as index:
        assert answers(index) == expected
    assert "chunk rows for a document of" in caplog.text and "damaged (1)" in caplog.text
