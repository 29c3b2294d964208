"""The `sharedctx ask` command on a tiny local model."""

from __future__ import annotations

import json

import pytest

from conftest import byte_tokenizer, tiny_model
from sharedctx.cli import main


@pytest.fixture
def model_dir(tmp_path):
    model = tiny_model()
    model.save_pretrained(tmp_path / "base")
    byte_tokenizer().save_pretrained(tmp_path / "base")
    return tmp_path / "base"


def test_ask_json(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("The lantern of Harrow Point is green. " * 80)
    rc = main(["ask", "--file", str(doc), "--model", str(model_dir), "--injection-layers", "2", "--chunk-size", "512", "--json", "--max-new-tokens", "5", "What colour?"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) >= {"answer", "stats", "timings", "warning"}
    assert out["stats"]["chunks"] == 6 and out["stats"]["injected_states"] > 0
    assert out["stats"]["adapter"]["trained"] is False and "untrained" in out["warning"]
    assert out["timings"]["total_s"] > 0


def test_ask_refuses_bad_files(model_dir, tmp_path, capsys):
    binary = tmp_path / "blob.bin"
    binary.write_bytes(b"\x00\x01\x02" * 10)
    latin = tmp_path / "latin.txt"
    latin.write_bytes("caf\xe9".encode("latin-1"))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    for path, message in ((binary, "binary"), (latin, "UTF-8"), (empty, "no text"), (tmp_path / "nope.txt", "no such file")):
        assert main(["ask", "--file", str(path), "--model", str(model_dir), "q"]) == 2
        assert message in capsys.readouterr().err


def test_ask_plain_prints_untrained_note(model_dir, tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("short context")
    assert main(["ask", "--file", str(doc), "--model", str(model_dir), "--injection-layers", "2", "--max-new-tokens", "3", "q"]) == 0
    assert "untrained" in capsys.readouterr().err
    assert main(["ask", "--file", str(doc), "--model", str(model_dir), "q"]) == 2
    assert "injection_layers=4 exceeds" in capsys.readouterr().err
