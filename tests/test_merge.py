"""Merging indexes and node-store shards (`sharedctx.index.merge`, ``sharedctx index merge``): the newer copy of a
document is never lost, a merge never changes its sources, and everything it leaves out is reported.

Each test here failed on the code before issue 24 (the merge kept whichever record was *first added* last, copied a
lazy record over an eager one, quarantined a damaged record in the source and dropped it silently, opened sources for
writing, skipped chunks whose value file was gone, and a garbage manifest was a bare JSON error)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
from conftest import damage_entry, snapshot

from sharedctx.cli import main
from sharedctx.errors import StoreError
from sharedctx.index import ContextIndex, DocumentTable
from sharedctx.index.store import BlobCache, TreeStore

V1 = "The lighthouse keeper writes in the logbook every evening before the lamp is lit. " * 6
V2 = "The keeper moved to the mainland; the logbook is kept by the harbour master now. " * 6


def lazy(llm, store: Path) -> ContextIndex:
    return ContextIndex(llm, store, policy="lexical", encode="lazy")


def text_of(store: Path, doc_id: str) -> str:
    table = DocumentTable(store, read_only=True)
    try:
        return table.get(doc_id).text
    finally:
        table.close()


def test_merge_keeps_the_copy_written_last(llm, tmp_path, capsys):
    """The fault campaign's case: A and B add f (v1), A adds f again as v2; merging B into A kept B's v1 because B's
    record was *first added* later (exit 0). Both directions now keep v2 and report the conflict."""
    f = tmp_path / "f.txt"
    f.write_text(V1)
    a, b = tmp_path / "A", tmp_path / "B"
    for store in (a, b):
        with lazy(llm, store) as index:
            index.add(f)
    time.sleep(0.01)
    f.write_text(V2)
    with lazy(llm, a) as index:
        index.add(f)
    doc_id = str(f)
    assert main(["index", "merge", "--store", str(a), str(b), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert text_of(a, doc_id) == V2
    assert out["documents_added"] == 0 and [c["doc_id"] for c in out["conflicts"]] == [doc_id]
    assert "kept the target's copy, written later" in out["conflicts"][0]["resolution"]
    assert main(["index", "merge", "--store", str(b), str(a)]) == 0  # the other way: the shard's newer copy is taken
    assert "took the shard's copy" in capsys.readouterr().err
    assert text_of(b, doc_id) == V2


def test_a_lazy_record_never_replaces_an_eager_one(llm, tmp_path):
    """A lazy record (no chunk keys) copied over an eager index's record made every key-based query fail."""
    f = tmp_path / "f.txt"
    f.write_text(V1)
    eager, shard = tmp_path / "eager", tmp_path / "lazy"
    with ContextIndex(llm, eager) as index:
        index.add(f)
    with lazy(llm, shard) as index:
        index.add(f)  # the same text, added later
        index.add_text(V2, doc_id="only-lazy")  # no keys anywhere
    with ContextIndex(llm, eager) as index:
        report = index.merge([shard])
        assert index.query("Who writes in the logbook?", max_new_tokens=2).citations  # keys intact
        assert report.documents_present == 1 and report.documents_added == 0
        assert [k for _, k, _ in report.refused] == ["doc/only-lazy"] and "added lazily" in report.refused[0][2]
    with ContextIndex(llm, shard, top_k=64) as index:  # encodes every chunk it injects: the shard's store has them
        index.query("Where is the keeper now?", max_new_tokens=1)
    with ContextIndex(llm, eager) as index:
        report = index.merge([shard])  # the lazy record's keys come from the chunks now stored
        assert report.documents_added == 1 and report.refused == []
        assert index.query("Where is the keeper now?", max_new_tokens=2).citations


def _damage_one_record(store: Path, doc_id: str) -> None:
    damage_entry(store / "docs", "doc/" + doc_id, 200)


def test_merge_reports_a_damaged_record_and_leaves_its_source_unchanged(llm, tmp_path, capsys):
    shard = tmp_path / "shard"
    with ContextIndex(llm, shard) as index:
        index.add_text(V1, doc_id="sound")
        index.add_text(V2, doc_id="damaged")
    _damage_one_record(shard, "damaged")
    before = snapshot(shard)
    target = tmp_path / "target"
    ContextIndex(llm, target).close()
    assert main(["index", "merge", "--store", str(target), str(shard), "--json"]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["documents_added"] == 1 and [r["key"] for r in out["refused"]] == ["doc/damaged"]
    assert "damaged" in out["refused"][0]["reason"]
    assert snapshot(shard) == before  # not quarantined there, not even opened for writing


def test_merge_never_opens_a_source_for_writing(llm, tmp_path, monkeypatch):
    """A refused folder gained a cache.db; a read-only shard could not be merged. (Running as root, chmod cannot make
    a folder read-only, so the test refuses every writable opening of a source instead.)"""
    import diskcache

    shard = tmp_path / "shard"
    with ContextIndex(llm, shard) as index:
        index.add_text(V1, doc_id="keeper")
    target = tmp_path / "target"
    index = ContextIndex(llm, target)
    real = diskcache.Cache.__init__

    def guarded(self, directory=None, *args, **kwargs):
        if directory is not None and Path(directory).resolve().is_relative_to(tmp_path.resolve() / "shard"):
            raise PermissionError(13, "Permission denied (a read-only shard)", directory)
        real(self, directory, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "__init__", guarded)
    before = snapshot(shard)
    report = index.merge([shard])
    assert report.documents_added == 1 and report.chunks_added > 0 and snapshot(shard) == before
    folder = tmp_path / "not-a-store"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    with pytest.raises(StoreError, match="holds no sharedctx store or index"):
        index.merge([folder])
    assert os.listdir(folder) == ["notes.txt"]
    index.close()


def test_merge_lists_a_chunk_whose_value_file_is_gone(llm, tmp_path):
    shard_dir = tmp_path / "shard"
    shard = TreeStore(shard_dir, fingerprint=llm.fingerprint, signature=llm.config.lower_signature())
    shard.blobs.set_raw("chunk/big", b"\0" * 100_000)  # large: diskcache keeps it in a file of its own
    filename = shard.blobs._cache._sql("SELECT filename FROM Cache WHERE key = 'chunk/big'").fetchone()[0]
    shard.close()
    (shard_dir / filename).unlink()
    with ContextIndex(llm, tmp_path / "target") as index:
        report = index.merge([shard_dir])
    assert [(k, "missing" in r) for _, k, r in report.refused] == [("chunk/big", True)]


def test_prune_reclaims_value_files_left_by_a_killed_merge(llm, tmp_path, capsys):
    """SIGKILL between writing a value's file and recording it leaves the file behind; prune deletes it once it is
    old enough that no writer can still be about to record it."""
    store = tmp_path / "ix"
    ContextIndex(llm, store).close()
    blobs = BlobCache(store / "nodes")
    _, _, old, _ = blobs._cache._disk.store(b"\1" * 100_000, False)  # what a killed write leaves: a file, no row
    _, _, young, _ = blobs._cache._disk.store(b"\2" * 100_000, False)
    blobs.close()
    hour_ago = time.time() - 3600
    os.utime(store / "nodes" / old, (hour_ago, hour_ago))
    assert main(["index", "prune", "--store", str(store), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["orphan_files_removed"] == 1
    assert not (store / "nodes" / old).exists() and (store / "nodes" / young).exists()
    os.utime(store / "nodes" / young, (hour_ago, hour_ago))
    with ContextIndex(llm, store) as index:  # the library's prune too
        index.prune()
    assert not (store / "nodes" / young).exists()


def _garbage_manifest(directory: Path) -> None:
    blobs = BlobCache(directory, size_limit=None)
    blobs.set_raw("manifest", b"{not json")
    blobs.close()


def test_a_garbage_manifest_names_its_file_and_a_way_back(llm, tmp_path, capsys, caplog):
    shard, target = tmp_path / "shard", tmp_path / "target"
    for store in (shard, target):
        with ContextIndex(llm, store) as index:
            index.add_text(V1 if store == shard else V2, doc_id=store.name)
    _garbage_manifest(shard / "docs")
    assert main(["index", "merge", "--store", str(target), str(shard)]) == 2
    err = capsys.readouterr().err
    assert str(shard) in err and "manifest" in err and f"sharedctx index list --store {shard}" in err
    assert main(["index", "list", "--store", str(shard)]) == 0  # a writable opening writes it again from the node store's
    assert "wrote it again from the node store's manifest" in caplog.text
    capsys.readouterr()
    assert main(["index", "merge", "--store", str(target), str(shard)]) == 0
    capsys.readouterr()
    _garbage_manifest(target / "docs")  # the target's: written again the same way, and the merge goes on
    assert main(["index", "merge", "--store", str(target), str(shard), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["documents_present"] == 1
    _garbage_manifest(shard / "nodes")  # a node store's: named, and nothing merged
    _garbage_manifest(shard / "docs")
    assert main(["index", "merge", "--store", str(target), str(shard)]) == 2
    err = capsys.readouterr().err
    assert str(shard / "docs") in err and "restore" in err
    with ContextIndex(llm, target) as index:
        assert sorted(d.doc_id for d in index.documents()) == ["shard", "target"]
