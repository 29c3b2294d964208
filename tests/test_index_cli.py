"""`sharedctx index add|list|remove` and `sharedctx ask --store` on a tiny local model."""

from __future__ import annotations

import json

import pytest

from conftest import byte_tokenizer, tiny_model
from sharedctx.cli import main
from test_index import document

MODEL = ["--injection-layers", "2", "--chunk-size", "64", "--node-keep", "4"]


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    return str(tmp_path / "base")


def test_index_add_list_remove_and_ask(model_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"d{i}.txt").write_text(document(i, paragraphs=8))
    (docs / "blob.bin").write_bytes(b"\x00\x01" * 10)
    store = str(tmp_path / "store")
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, *MODEL, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["documents"] == 3 and first["chunks_encoded"] > 0 and first["chunks_reused"] + first["chunks_encoded"] == first["chunks"]
    assert len(first["skipped"]) == 1 and "binary" in first["skipped"][0]["reason"]
    # the store remembers its options: no need to repeat them
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, "--json"]) == 0
    second = json.loads(capsys.readouterr().out)
    assert second["chunks_encoded"] == 0 and second["chunks_reused"] == first["chunks"]

    assert main(["index", "list", "--store", store, "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    ids = [d["doc_id"] for d in listed["documents"]]
    assert len(ids) == 3 and listed["manifest"]["signature"]["chunk_size"] == 64

    assert main(["ask", "--store", store, "--model", model_dir, "--json", "--max-new-tokens", "4", "What colour is the lantern?"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"answer", "citations", "stats", "timings", "warning"}
    assert out["stats"]["chunks_encoded"] == 0 and out["stats"]["chunks_cached"] > 0 and out["stats"]["injected_states"] > 0
    c = out["citations"][0]
    assert (docs / c["doc_id"].split("/")[-1]).read_text()[c["char_start"] : c["char_end"]] == c["text"]

    assert main(["ask", "--store", store, "--model", model_dir, "--mode", "text", "--max-new-tokens", "3", "Which point?"]) == 0
    plain = capsys.readouterr()
    assert "sources:" in plain.out and "[1]" in plain.out and "injected states" in plain.err

    assert main(["index", "remove", "--store", store, ids[0]]) == 0
    assert "removed 1" in capsys.readouterr().out
    assert main(["index", "remove", "--store", store, ids[0]]) == 2
    assert "no documents" in capsys.readouterr().err
    main(["index", "list", "--store", store])
    assert "2 documents" in capsys.readouterr().out


def test_index_errors(model_dir, tmp_path, capsys):
    store = str(tmp_path / "store")
    assert main(["ask", "--store", store, "--model", model_dir, *MODEL, "q"]) == 2
    assert "holds no index" in capsys.readouterr().err
    doc = tmp_path / "a.txt"
    doc.write_text(document(0, paragraphs=3))
    assert main(["index", "add", "--store", store, str(doc), "--model", model_dir, *MODEL]) == 0
    capsys.readouterr()
    assert main(["index", "add", "--store", store, str(doc), "--model", model_dir, "--injection-layers", "2", "--chunk-size", "128"]) == 2
    assert "chunk_size" in capsys.readouterr().err


def test_lazy_index_add_then_ask(model_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"d{i}.txt").write_text(document(i, paragraphs=8))
    store = str(tmp_path / "lazy")
    lexical = [*MODEL, "--policy", "lexical"]
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, *lexical, "--lazy", "--json"]) == 0
    built = json.loads(capsys.readouterr().out)
    assert built["chunks_encoded"] == 0 and built["chunks_deferred"] == built["chunks"] > 0
    assert main(["ask", "--store", store, "--model", model_dir, "--policy", "lexical", "--mode", "text", "--json", "--max-new-tokens", "3", "Which point?"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["chunks_encoded"] == 0  # text mode reads no states
    assert main(["ask", "--store", store, "--model", model_dir, "--policy", "lexical", "--json", "--max-new-tokens", "3", "Which point?"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["chunks_encoded"] > 0  # latent: encoded on first use
    assert main(["index", "add", "--store", str(tmp_path / "new"), str(docs), "--model", model_dir, *MODEL, "--lazy", "--policy", "query"]) == 2
    assert "needs policy='lexical'" in capsys.readouterr().err


def test_lazy_store_remembers_its_policy_and_encode_mode(model_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "d0.txt").write_text(document(0, paragraphs=8))
    store = str(tmp_path / "lazy")
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, *MODEL, "--lazy", "--policy", "lexical"]) == 0
    capsys.readouterr()
    assert main(["index", "list", "--store", store, "--json"]) == 0
    manifest = json.loads(capsys.readouterr().out)["manifest"]
    assert (manifest["policy"], manifest["encode"]) == ("lexical", "lazy")
    # no --policy: the store's own (the model's would be 'query', which a lazy store cannot rank by)
    assert main(["ask", "--store", store, "--model", model_dir, "--json", "--max-new-tokens", "2", "Which point?"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["chunks_encoded"] > 0  # lazy: encoded on first latent use
    (docs / "d1.txt").write_text(document(1, paragraphs=8))
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, "--json"]) == 0  # still lazy
    assert json.loads(capsys.readouterr().out)["chunks_deferred"] > 0


def test_store_naming_a_file_or_a_foreign_directory_is_refused_before_loading(tmp_path, capsys):
    import os
    import stat

    doc = tmp_path / "a.txt"
    doc.write_text(document(0, paragraphs=2))
    no_model = str(tmp_path / "no-model")  # reaching the model would fail differently
    for argv in (["index", "add", "--store", str(doc), str(doc)], ["ask", "--store", str(doc), "q"], ["ask", "--store", str(doc), "--file", str(doc), "q"]):
        assert main([*argv, "--model", no_model]) == 2
        assert "is a file, not a directory" in capsys.readouterr().err
    home = tmp_path / "home"
    home.mkdir()
    (home / "notes.txt").write_text("mine")
    home.chmod(0o755)
    assert main(["index", "add", "--store", str(home), str(doc), "--model", no_model]) == 2
    assert "not empty and holds no sharedctx index" in capsys.readouterr().err
    assert os.listdir(home) == ["notes.txt"] and stat.S_IMODE(home.stat().st_mode) == 0o755


def test_unreadable_file_and_links_in_index_add(model_dir, tmp_path, capsys, monkeypatch):
    from test_index_inputs import unreadable

    docs, outside = tmp_path / "docs", tmp_path / "outside"
    docs.mkdir()
    outside.mkdir()
    for name in ("a.txt", "b.txt", "c.txt"):
        (docs / name).write_text(document(ord(name[0]), paragraphs=3))
    (outside / "passwd").write_text("root:x:0:0:root:/root:/bin/bash\n")
    (docs / "passwd").symlink_to(outside / "passwd")
    unreadable(monkeypatch, "b.txt")
    store = str(tmp_path / "store")
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, *MODEL]) == 1  # after adding the rest
    err = capsys.readouterr().err
    assert "b.txt: cannot be read" in err and "passwd: a symbolic link to" in err and "--follow-links" in err
    assert main(["index", "list", "--store", store]) == 0
    listed = capsys.readouterr().out
    assert "a.txt" in listed and "c.txt" in listed and "passwd" not in listed and "2 documents" in listed
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, "--follow-links", "--json"]) == 1
    added = [r["doc_id"] for r in json.loads(capsys.readouterr().out)["added"]]
    assert any(d.endswith("passwd") for d in added)


def test_index_prune(model_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(2):
        (docs / f"d{i}.txt").write_text(document(i, paragraphs=6))
    store = str(tmp_path / "store")
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, *MODEL]) == 0
    assert main(["index", "remove", "--store", store, str(docs / "d0.txt")]) == 0
    capsys.readouterr()
    assert main(["index", "prune", "--store", store, "--json"]) == 0
    first = json.loads(capsys.readouterr().out)
    assert first["chunks_removed"] > 0
    assert main(["index", "prune", "--store", store]) == 0
    assert "removed 0 chunks" in capsys.readouterr().out
    assert main(["ask", "--store", store, "--model", model_dir, "--json", "--max-new-tokens", "2", "Which point?"]) == 0
    assert json.loads(capsys.readouterr().out)["stats"]["chunks_encoded"] == 0  # what the kept document reads is there
    assert main(["index", "prune", "--store", str(tmp_path / "none")]) == 2
