"""The `sharedctx ask` command on a tiny local model."""

from __future__ import annotations

import json
import sys

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
    rc = main(["ask", "--file", str(doc), "--model", str(model_dir), "--injection-layers", "2", "--chunk-size", "512", "--json", "--max-new-tokens", "5", "--mode", "latent", "What colour?"])
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


def test_help_states_the_defaults_the_python_api_uses(capsys):
    from sharedctx.config import DEFAULT_MAX_NEW_TOKENS, DEFAULT_MODE, DEFAULT_POLICY, DEFAULT_STOP_ON_REPEAT
    from sharedctx.generation import SamplingOptions

    with pytest.raises(SystemExit):
        main(["ask", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"Default: {DEFAULT_POLICY} (not the policy an adapter was trained with" in text
    assert f"default {DEFAULT_MODE})" in text and DEFAULT_MODE == "hybrid" and DEFAULT_POLICY == "lexical"
    assert f"(default {DEFAULT_STOP_ON_REPEAT}, as the Python API" in text and f"(default {DEFAULT_MAX_NEW_TOKENS}, as the Python API)" in text
    options = SamplingOptions()
    assert (options.stop_on_repeat, options.max_new_tokens) == (DEFAULT_STOP_ON_REPEAT, DEFAULT_MAX_NEW_TOKENS)
    from sharedctx.cli import build_parser

    args = build_parser().parse_args(["ask", "q", "--file", "f"])
    assert (args.mode, args.policy, args.stop_on_repeat, args.max_new_tokens) == (DEFAULT_MODE, None, DEFAULT_STOP_ON_REPEAT, DEFAULT_MAX_NEW_TOKENS)


def test_ask_skips_an_unreadable_file_and_exits_nonzero(model_dir, tmp_path, capsys, monkeypatch):
    from test_index_inputs import unreadable

    good, bad = tmp_path / "good.txt", tmp_path / "bad.txt"
    good.write_text("The lantern of Harrow Point is green. " * 10)
    bad.write_text("secret")
    unreadable(monkeypatch, "bad.txt")
    argv = ["ask", "--file", str(bad), "--file", str(good), "--model", str(model_dir), "--injection-layers", "2", "--json", "--max-new-tokens", "2", "--mode", "latent"]
    assert main([*argv, "What colour?"]) == 1
    out = capsys.readouterr()
    assert json.loads(out.out)["stats"]["chunks"] == 1 and "bad.txt: cannot be read" in out.err
    assert main(["ask", "--file", str(bad), "--model", str(model_dir), "q"]) == 2  # nothing left to read
    assert "no text to read" in capsys.readouterr().err


def test_empty_question_refused_the_same_way_before_loading(tmp_path, capsys):
    doc = tmp_path / "doc.txt"
    doc.write_text("short context")
    missing_model = str(tmp_path / "no-model")  # the question is checked before the model is looked for
    for where in (["--file", str(doc)], ["--store", str(tmp_path / "ix")]):
        for question in ("", "  \n"):
            assert main(["ask", *where, "--model", missing_model, question]) == 2
            assert "question is empty" in capsys.readouterr().err


def test_long_ask_file_shows_progress_and_ctrl_c_exits_cleanly(model_dir, tmp_path, capsys, monkeypatch):
    from sharedctx.model import SharedLLM

    doc = tmp_path / "doc.txt"
    doc.write_text("The lantern of Harrow Point is green. " * 300)
    argv = ["ask", "--file", str(doc), "--model", str(model_dir), "--injection-layers", "2", "--chunk-size", "256", "--max-new-tokens", "2", "--mode", "latent", "q"]
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert main(argv) == 0
    err = capsys.readouterr().err
    assert "encoding nodes of 11,400 context tokens" in err and "tok/s" in err

    def interrupted(self, *a, **k):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(SharedLLM, "stream", interrupted)
    assert main(argv) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "sharedctx: interrupted" and "Traceback" not in err
