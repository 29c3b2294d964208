"""Bad input to ContextIndex: each is refused with a clear error or skipped and reported, never half-written."""

from __future__ import annotations

import pytest

from conftest import make_llm
from sharedctx.errors import InputError
from sharedctx.index import ContextIndex
from sharedctx.index.store import StoreFullError, StoreMismatchError
from test_index import CFG, document


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def llm():
    return make_llm(gates=1.0, **CFG)


def test_empty_binary_and_non_utf8_refused(llm, tmp_path):
    index = ContextIndex(llm, tmp_path / "ix")
    (tmp_path / "blob.bin").write_bytes(b"\x7fELF\x00\x01" * 50)
    (tmp_path / "latin.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.txt").write_text(" \n\t\n")
    cases = [
        ("", "empty"),
        ("   \n ", "empty"),
        (tmp_path / "blob.bin", "binary"),
        (tmp_path / "latin.txt", "UTF-8"),
        (tmp_path / "empty.txt", "no text"),
        (tmp_path / "blank.txt", "no text"),
        (tmp_path / "missing.txt", "no such file"),
        (tmp_path, "is a directory"),
    ]
    for item, message in cases:
        with pytest.raises(InputError, match=message):
            index.add(item)
    with pytest.raises(InputError, match="holds no documents"):
        index.retrieve("anything?")
    index.add(document(0))
    with pytest.raises(InputError, match="question is empty"):
        index.query("  ")
    with pytest.raises(ValueError, match="mode"):
        index.query("q", mode="telepathy")
    assert len(index) == 1


def test_directory_of_thousands_of_files(llm, tmp_path):
    root = tmp_path / "corpus"
    for i in range(1000):
        sub = root / f"d{i % 10}"
        sub.mkdir(parents=True, exist_ok=True)
        if i % 10 == 7:
            (sub / f"f{i}.bin").write_bytes(bytes(range(256)))
        elif i % 10 == 8:
            (sub / f"f{i}.txt").write_bytes(b"\xff\xfe bad")
        else:
            (sub / f"f{i}.txt").write_text(f"Note {i % 30}. The lantern is {['red', 'green', 'blue'][i % 3]}.\n")
    (root / ".git").mkdir()
    (root / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    index = ContextIndex(llm, tmp_path / "ix")
    report = index.add_many([root], show_progress=False)
    assert report.documents == 800 and len(report.skipped) == 200
    assert {r.split(":")[-1].strip().split(" ")[0] for _, r in report.skipped} <= {"looks", "not"}
    assert all(".git" not in p for p, _ in report.skipped) and all(".git" not in r.doc_id for r in report.added)
    assert report.chunks == 800 and report.chunks_encoded == 24 and len(index) == 800  # 24 distinct texts
    again = index.add_many([str(root)], show_progress=False)
    assert again.chunks_encoded == 0 and all(r.unchanged for r in again.added)


def test_long_document_is_streamed_in_bounded_batches(llm, tmp_path, monkeypatch):
    index = ContextIndex(llm, tmp_path / "ix", batch_chunks=4)
    seen: list[int] = []
    real = llm.encoder.encode_chunks

    def spy(chunks):
        seen.append(len(chunks))
        return real(chunks)

    monkeypatch.setattr(llm.encoder, "encode_chunks", spy)
    text = "".join(document(s, paragraphs=60) for s in range(6))  # ~25K tokens, ~450 chunks
    r = index.add(text, doc_id="long")
    assert r.tokens > 20_000 and r.chunks > 300
    assert max(seen) <= 4 and sum(seen) == r.chunks_encoded  # states held: one batch of chunks, not the document
    assert index.retrieve("What colour is the lantern of Orm point in section 5.3?")


def test_store_of_another_model_or_configuration_is_refused(llm, tmp_path):
    ContextIndex(llm, tmp_path / "ix").add(document(0), doc_id="a")
    with pytest.raises(StoreMismatchError, match="built by base model"):
        ContextIndex(make_llm(seed=1, **CFG), tmp_path / "ix")
    with pytest.raises(StoreMismatchError, match="chunk_size"):
        ContextIndex.load(tmp_path / "ix", make_llm(gates=1.0, **{**CFG, "chunk_size": 128}))
    # options that do not shape the stored states (policy, gates) are fine
    assert len(ContextIndex.load(tmp_path / "ix", make_llm(gates=0.5, policy="right", **CFG))) == 1


def test_full_disk_keeps_nothing_half_written(llm, tmp_path, monkeypatch):
    index = ContextIndex(llm, tmp_path / "ix", batch_chunks=2)
    index.add(document(0), doc_id="ok")
    real = index.store.put_chunk
    calls = {"n": 0}

    def filling(key, nodes, *, n_tokens):
        calls["n"] += 1
        if calls["n"] > 3:
            raise StoreFullError("no space left on device (simulated)")
        return real(key, nodes, n_tokens=n_tokens)

    monkeypatch.setattr(index.store, "put_chunk", filling)
    with pytest.raises(StoreFullError, match="no space left"):
        index.add(document(1), doc_id="too-big")
    assert [d.doc_id for d in index.documents()] == ["ok"]
    monkeypatch.undo()
    assert [d.doc_id for d in ContextIndex.load(tmp_path / "ix", llm).documents()] == ["ok"]
    r = index.add(document(1), doc_id="too-big")  # after freeing space: the chunks written before are reused
    assert r.chunks_reused >= 3 and r.chunks_encoded == r.chunks - r.chunks_reused


def test_path_like_strings_and_metadata(llm, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text(document(2, paragraphs=3))
    index = ContextIndex(llm, tmp_path / "ix")
    r = index.add(str(path), metadata={"lang": "en"})
    assert r.doc_id == str(path.resolve()) and index.documents()[0].source == str(path.resolve())
    assert index.documents()[0].metadata == {"lang": "en"}
    assert index.add("not/a/file/just text").doc_id.startswith("text-")
