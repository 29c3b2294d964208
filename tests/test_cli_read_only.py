"""Reading an index that cannot be written, from the command line and from a serving process (issue 24): `index list`
and `ask --store` open it read-only (asked with --read-only, or when the directory is not writable) and write
nothing; a reader warns when a writer changes the index under its snapshot; `index list` output survives a reader
that goes away (`| head`) and document ids holding newlines. Each test failed on the code before issue 24."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import snapshot
from test_index_cli import MODEL, model_dir  # noqa: F401

from sharedctx.cli import main
from sharedctx.index import ContextIndex

KEEPER = "The lighthouse keeper writes in the logbook every evening before the lamp is lit. " * 6


def read_only_mount(monkeypatch, store: Path) -> None:
    """What a read-only directory does to a process (simulated: the tests run as root, whom chmod does not stop):
    `os.access` says it cannot be written, and every writable opening of its databases fails."""
    import diskcache

    import sharedctx.cli_index as cli_index

    inside = lambda p: Path(p).resolve().is_relative_to(store.resolve())  # noqa: E731
    access = os.access
    monkeypatch.setattr(cli_index.os, "access", lambda p, mode, **kw: False if inside(p) and mode & os.W_OK else access(p, mode, **kw))
    real = diskcache.Cache.__init__

    def refuse(self, directory=None, *args, **kwargs):
        if directory is not None and inside(directory):
            raise PermissionError(13, "Permission denied", directory)
        real(self, directory, *args, **kwargs)

    monkeypatch.setattr(diskcache.Cache, "__init__", refuse)


def test_list_and_ask_read_an_index_that_cannot_be_written(model_dir, tmp_path, capsys, monkeypatch):  # noqa: F811
    doc = tmp_path / "keeper.txt"
    doc.write_text(KEEPER)
    store = tmp_path / "ix"
    assert main(["index", "add", "--store", str(store), str(doc), "--model", model_dir, *MODEL]) == 0
    before = snapshot(store)
    read_only_mount(monkeypatch, store)
    capsys.readouterr()
    assert main(["index", "list", "--store", str(store), "--json"]) == 0
    out, err = capsys.readouterr()
    assert [d["doc_id"] for d in json.loads(out)["documents"]] == [str(doc)] and "reading it read-only" in err
    assert main(["ask", "--store", str(store), "--model", model_dir, "--json", "--max-new-tokens", "2", "Who keeps the logbook?"]) == 0
    assert json.loads(capsys.readouterr().out)["citations"]
    assert snapshot(store) == before


def test_read_only_flag_writes_nothing(model_dir, tmp_path, capsys):  # noqa: F811
    doc = tmp_path / "keeper.txt"
    doc.write_text(KEEPER)
    store = tmp_path / "ix"
    assert main(["index", "add", "--store", str(store), str(doc), "--model", model_dir, *MODEL]) == 0
    before = snapshot(store)
    assert main(["index", "list", "--store", str(store), "--read-only"]) == 0
    assert main(["ask", "--store", str(store), "--read-only", "--model", model_dir, "--max-new-tokens", "2", "Who?"]) == 0
    assert snapshot(store) == before
    assert main(["ask", "--store", str(store), "--read-only", "--file", str(doc), "--model", model_dir, "Who?"]) == 2
    assert "cannot add --file" in capsys.readouterr().err


def test_a_reader_warns_when_a_writer_changes_its_snapshot(llm, tmp_path, caplog, monkeypatch):
    from sharedctx.index import snapshot as snap

    monkeypatch.setattr(snap, "CHECK_EVERY_S", 0.0)
    store = tmp_path / "ix"
    with ContextIndex(llm, store) as index:
        index.add_text(KEEPER, doc_id="keeper")
    reader = ContextIndex.load(store, llm, read_only=True, max_batch_queries=1)
    reader.query("Who keeps the logbook?", max_new_tokens=1)
    assert "changed on disk" not in caplog.text
    with ContextIndex(llm, store) as writer:
        writer.add_text("The baker sells rye bread on the quay. " * 8, doc_id="baker")
    with caplog.at_level(logging.WARNING, logger="sharedctx"):
        reader.refresh()
        reader.query("Who keeps the logbook?", max_new_tokens=1)
    assert caplog.text.count("changed on disk since it was opened read-only") == 2  # docs and nodes, once each
    assert reader.table.changed
    reader.close()


def test_list_survives_a_closed_pipe_and_ids_with_newlines(llm, tmp_path, capsys):
    store = tmp_path / "ix"
    with ContextIndex(llm, store) as index:
        index.add_text(KEEPER, doc_id="two\nlines")
        index.add_text(KEEPER + "Again.", doc_id="tab\there")
    assert main(["index", "list", "--store", str(store)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3 and lines[0].startswith('"two\\nlines"\t') and lines[1].startswith('"tab\\there"\t')
    code = "import sys; from sharedctx.cli import main; sys.exit(main(sys.argv[1:]))"
    proc = subprocess.Popen([sys.executable, "-c", code, "index", "list", "--store", str(store), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    proc.stdout.close()  # the reader goes away before anything is written, as `| head` does after its lines
    err = proc.stderr.read().decode()
    proc.stderr.close()
    assert proc.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipeError" not in err, err
