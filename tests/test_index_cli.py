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
    assert main(["index", "add", "--store", store, str(docs), "--model", model_dir, "--lazy"]) == 2  # the model's policy is 'query'
    assert "needs policy='lexical'" in capsys.readouterr().err
