"""Bad input to ContextIndex: each is refused with a clear error or skipped and reported, never half-written."""

from __future__ import annotations

import os
import stat

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
    for text in ("", "   \n "):
        with pytest.raises(InputError, match="empty"):
            index.add_text(text)
    cases = [
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
    index.add_text(document(0))
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
    r = index.add_text(text, doc_id="long")
    assert r.tokens > 20_000 and r.chunks > 300
    assert max(seen) <= 4 and sum(seen) == r.chunks_encoded  # states held: one batch of chunks, not the document
    assert index.retrieve("What colour is the lantern of Orm point in section 5.3?")


def test_store_of_another_model_or_configuration_is_refused(llm, tmp_path):
    ContextIndex(llm, tmp_path / "ix").add_text(document(0), doc_id="a")
    with pytest.raises(StoreMismatchError, match="built by base model"):
        ContextIndex(make_llm(seed=1, **CFG), tmp_path / "ix")
    with pytest.raises(StoreMismatchError, match="chunk_size"):
        ContextIndex.load(tmp_path / "ix", make_llm(gates=1.0, **{**CFG, "chunk_size": 128}))
    # options that do not shape the stored states (policy, gates) are fine
    assert len(ContextIndex.load(tmp_path / "ix", make_llm(gates=0.5, **{**CFG, "policy": "right"}))) == 1


def test_full_disk_keeps_nothing_half_written(llm, tmp_path, monkeypatch):
    index = ContextIndex(llm, tmp_path / "ix", batch_chunks=2)
    index.add_text(document(0), doc_id="ok")
    real = index.store.put_chunk
    calls = {"n": 0}

    def filling(key, nodes, *, n_tokens):
        calls["n"] += 1
        if calls["n"] > 3:
            raise StoreFullError("no space left on device (simulated)")
        return real(key, nodes, n_tokens=n_tokens)

    monkeypatch.setattr(index.store, "put_chunk", filling)
    with pytest.raises(StoreFullError, match="no space left"):
        index.add_text(document(1), doc_id="too-big")
    assert [d.doc_id for d in index.documents()] == ["ok"]
    monkeypatch.undo()
    assert [d.doc_id for d in ContextIndex.load(tmp_path / "ix", llm).documents()] == ["ok"]
    r = index.add_text(document(1), doc_id="too-big")  # after freeing space: the chunks written before are reused
    assert r.chunks_reused >= 3 and r.chunks_encoded == r.chunks - r.chunks_reused


def test_path_like_strings_and_metadata(llm, tmp_path):
    path = tmp_path / "note.txt"
    path.write_text(document(2, paragraphs=3))
    index = ContextIndex(llm, tmp_path / "ix")
    r = index.add(str(path), metadata={"lang": "en"})
    assert r.doc_id == str(path.resolve()) and index.documents()[0].source == str(path.resolve())
    assert index.documents()[0].metadata == {"lang": "en"}
    assert index.add_text("not/a/file/just text").doc_id.startswith("text-")


def unreadable(monkeypatch, *names):
    """Make files of these names raise PermissionError when read (chmod 000 does not stop root, who runs CI)."""
    import pathlib

    real = pathlib.Path.read_bytes

    def read_bytes(self):
        if self.name in names:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(pathlib.Path, "read_bytes", read_bytes)


def test_unreadable_file_in_a_directory_is_listed_and_the_others_added(llm, tmp_path, monkeypatch):
    root = tmp_path / "docs"
    root.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (root / name).write_text(document(ord(name[0]), paragraphs=2))
    unreadable(monkeypatch, "b.txt")
    index = ContextIndex(llm, tmp_path / "ix")
    report = index.add_many([root], show_progress=False)
    assert sorted(r.doc_id.rsplit("/", 1)[-1] for r in report.added) == ["a.txt", "c.txt"]  # c comes after the bad one
    assert [(p.rsplit("/", 1)[-1], "cannot be read" in r) for p, r in report.failed] == [("b.txt", True)]
    assert report.to_dict()["failed"][0]["reason"].endswith("check its permissions")


def test_mistyped_path_is_an_error_and_text_goes_through_add_text(llm, tmp_path):
    index = ContextIndex(llm, tmp_path / "ix")
    with pytest.raises(InputError, match="harow_point.txt: no such file.*add_text"):
        index.add(str(tmp_path / "examples" / "harow_point.txt"))
    with pytest.raises(InputError, match="looks like text: use add_text"):
        index.add("The lantern is green.\nThe keeper is Ada.")
    with pytest.raises(InputError, match="add_text"):
        index.add(b"bytes")
    with pytest.raises(InputError, match="for a file, use add"):
        index.add_text(tmp_path)
    assert len(index) == 0  # nothing was indexed as text by mistake
    path = tmp_path / "harrow_point.txt"
    path.write_text(document(3, paragraphs=2))
    assert index.add(path, doc_id="harrow").doc_id == "harrow"  # a Path, or a str naming a file
    assert index.add(str(path)).doc_id == str(path.resolve())
    assert index.add_text(str(path)).doc_id.startswith("text-")  # text that happens to name a file stays text
    report = index.add_many([tmp_path / "missing.txt", path], show_progress=False)
    assert report.documents == 1 and "no such file" in report.skipped[0][1]


def test_links_leaving_the_folder_are_not_followed(llm, tmp_path):
    root, outside = tmp_path / "docs", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "inside.txt").write_text(document(1, paragraphs=2))
    (outside / "secret.txt").write_text(document(2, paragraphs=2))
    (root / "to_secret.txt").symlink_to(outside / "secret.txt")
    (root / "to_inside.txt").symlink_to(root / "inside.txt")  # stays inside: taken
    (root / "outside_dir").symlink_to(outside, target_is_directory=True)
    (root / "loop").symlink_to(root, target_is_directory=True)
    index = ContextIndex(llm, tmp_path / "ix")
    report = index.add_many([root], show_progress=False)
    names = sorted(r.doc_id.rsplit("/", 1)[-1] for r in report.added)
    assert names == ["inside.txt", "to_inside.txt"]
    assert len(report.skipped) == 1 and "outside" in report.skipped[0][1] and "--follow-links" in report.skipped[0][1]
    followed = ContextIndex(llm, tmp_path / "ix2").add_many([root], show_progress=False, follow_links=True)
    names = sorted(r.doc_id.split(str(root))[-1] for r in followed.added)
    assert names == ["/inside.txt", "/outside_dir/secret.txt", "/to_inside.txt", "/to_secret.txt"] and not followed.skipped


def test_store_directory_is_new_empty_or_an_index(llm, tmp_path):
    from sharedctx.errors import StoreError

    afile = tmp_path / "afile"
    afile.write_text("not a directory")
    with pytest.raises(StoreError, match="is a file, not a directory"):
        ContextIndex(llm, afile)
    foreign = tmp_path / "home"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    foreign.chmod(0o755)
    with pytest.raises(StoreError, match="not empty and holds no sharedctx index"):
        ContextIndex(llm, foreign)
    assert sorted(os.listdir(foreign)) == ["notes.txt"] and stat.S_IMODE(foreign.stat().st_mode) == 0o755
    empty = tmp_path / "empty"
    empty.mkdir()
    empty.chmod(0o755)
    ContextIndex(llm, empty).add_text(document(0), doc_id="a")
    assert stat.S_IMODE(empty.stat().st_mode) == 0o755  # not ours: left as it is; what we make inside is private
    assert {stat.S_IMODE((empty / d).stat().st_mode) for d in ("docs", "nodes")} == {0o700}
    made = tmp_path / "new" / "index"
    ContextIndex(llm, made).close()
    assert stat.S_IMODE(made.stat().st_mode) == 0o700
    assert len(ContextIndex(llm, empty)) == 1  # an index is reopened


def test_index_remembers_its_policy_and_encode_mode(llm, tmp_path):
    assert llm.config.policy == "query"
    built = ContextIndex(llm, tmp_path / "ix", policy="lexical", encode="lazy")
    built.add_text(document(0), doc_id="a")
    built.close()
    again = ContextIndex(llm, tmp_path / "ix")
    assert (again.policy, again.encode) == ("lexical", "lazy")
    assert again.retrieve("What colour is the lantern?")
    asked = ContextIndex(llm, tmp_path / "ix", policy="query")  # told otherwise: used, and new documents get keys
    assert (asked.policy, asked.encode) == ("query", "eager")
    with pytest.raises(InputError, match="encode='lazy'"):
        asked.retrieve("What colour is the lantern?")
    assert (ContextIndex.load(tmp_path / "ix", llm).policy, ContextIndex(llm, tmp_path / "ix").encode) == ("lexical", "lazy")
    eager = ContextIndex(llm, tmp_path / "ix2", policy="right")
    eager.add_text(document(1), doc_id="b")
    assert (ContextIndex(llm, tmp_path / "ix2").policy, ContextIndex(llm, tmp_path / "ix2").encode) == ("right", "eager")
