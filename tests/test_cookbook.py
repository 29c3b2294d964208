"""The cookbook: every notebook is committed without outputs, says what it shows and needs and where to go next,
uses only public names, and runs top to bottom on the default model (slow; small inputs under
SHAREDCTX_COOKBOOK_SMALL=1, the same code)."""

from __future__ import annotations

import ast
import json
import os
import re
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
COOKBOOK = ROOT / "cookbook"
NOTEBOOKS = sorted(COOKBOOK.glob("[0-9][0-9]_*.ipynb"))
EXPECTED = ["01_quickstart", "02_llamaindex_query_engine", "03_langchain", "04_long_context", "05_train_your_adapter"]
PUBLIC = ("sharedctx", "langchain_sharedctx", "llama_index")


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    src = cell["source"]
    return src if isinstance(src, str) else "".join(src)


def test_the_cookbook_has_its_notebooks():
    assert [p.stem for p in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    for cell in _cells(path):
        if cell["cell_type"] == "code":
            assert cell["outputs"] == [] and cell["execution_count"] is None, (
                f"{path.name} holds outputs: the notebooks stay clean; `python cookbook/render.py` writes the rendered copy"
            )


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_says_what_it_shows_needs_and_where_next(path):
    cells = _cells(path)
    first, last = _source(cells[0]), _source(cells[-1])
    assert cells[0]["cell_type"] == "markdown" and "**What this shows.**" in first and "**What it needs.**" in first
    assert cells[-1]["cell_type"] == "markdown" and "## Where to go next" in last


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_public_api_only(path):
    for cell in _cells(path):
        if cell["cell_type"] != "code":
            continue
        src = _source(cell)
        tree = ast.parse(re.sub(r"^(\s*)await ", r"\1", src, flags=re.M))  # top-level await is a notebook's, not Python's
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(PUBLIC):
                assert not any(part.startswith("_") for part in node.module.split(".")), node.module
                assert not any(a.name.startswith("_") for a in node.names), [a.name for a in node.names]
            elif isinstance(node, ast.Attribute) and node.attr.startswith("_") and not node.attr.startswith("__"):
                pytest.fail(f"{path.name} uses a private name: .{node.attr}")


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_rendered_copy_exists(path):
    rendered = COOKBOOK / "rendered" / f"{path.stem}.md"
    assert rendered.is_file(), f"run `python cookbook/render.py {path.stem}` and commit {rendered.relative_to(ROOT)}"
    text = rendered.read_text()
    for image in re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text):
        assert (rendered.parent / image).is_file(), image
    for local in ("/work/", "/tmp/", "/root/", str(ROOT) + "/"):  # render.py writes outputs with portable paths
        assert local not in text, f"{rendered.name} names a machine path under {local}"


@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_runs_as_written(path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    monkeypatch.setenv("SHAREDCTX_COOKBOOK_SMALL", "1")  # shorter training and evaluation in 05; same code paths
    book = nbformat.read(path, as_version=4)
    t0 = time.perf_counter()
    # raises CellExecutionError, with the cell and its traceback, on the first error
    nbclient.NotebookClient(book, timeout=900, kernel_name="python3", resources={"metadata": {"path": str(COOKBOOK)}}).execute()
    print(f"{path.stem}: {time.perf_counter() - t0:.0f} s")
