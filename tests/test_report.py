"""benchmarks/report.py: docs/results.md is what the JSON gives, and no row names a machine-local path."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / "benchmarks"
SHIPPED = "sharedctx/adapters/smollm2-135m-instruct"

# an absolute path: "/" after the start, a blank, a backtick, a bracket, "=" or a quote, then a name
_ABSOLUTE = re.compile(r"(?:^|[\s`(\[='\"])(/[\w.~-]+)")
_MACHINE_ROOTS = {"tmp", "home", "root", "Users", "work", "var", "opt", "mnt", "usr", "private", "scratch", "data"}


@pytest.fixture(scope="module")
def report():
    sys.path.insert(0, str(BENCH))
    try:
        import report as module
    finally:
        sys.path.remove(str(BENCH))
    return module


def machine_local_paths(row: str) -> list[str]:
    """The absolute filesystem paths in a table row: those that start in a top-level folder of a machine (a URL's
    path, as in "url: /encodings/…", starts nowhere on disk and is not one)."""
    found = []
    for path in _ABSOLUTE.findall(row):
        top = path.strip("/").split("/")[0]
        if top in _MACHINE_ROOTS or (top and Path("/", top).exists()):
            found.append(path)
    return found


def test_results_page_is_generated_from_the_json(report):
    assert report.page() == (ROOT / "docs" / "results.md").read_text(), "run `python benchmarks/report.py`"


def test_no_row_names_a_machine_local_path(report):
    rows = [line for line in report.page().splitlines() if line.startswith("| ")]
    assert len(rows) > 50
    for row in rows:
        assert "/tmp" not in row and str(ROOT) not in row, row
        assert not machine_local_paths(row), row


def test_committed_results_name_no_machine_local_path():
    committed = [*(BENCH / "results").glob("*.json"), *(ROOT / "recipes" / "results").rglob("*.json*"),
                 *(ROOT / "sharedctx" / "adapters").rglob("*.json*")]
    for path in sorted(committed):
        text = path.read_text()
        assert str(ROOT) not in text and not machine_local_paths(text), f"{path.name}: write paths relative to the repository"


def test_benchmarks_write_portable_paths(tmp_path, monkeypatch):
    sys.path.insert(0, str(BENCH))
    try:
        from _common import portable_path
    finally:
        sys.path.remove(str(BENCH))
    monkeypatch.setenv("SHAREDCTX_HOME", str(tmp_path / "home"))
    assert portable_path(ROOT / SHIPPED) == SHIPPED
    assert portable_path(tmp_path / "home" / "models" / "m") == "$SHAREDCTX_HOME/models/m"
    assert portable_path("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert portable_path(None) is None and portable_path("") == ""


def test_every_benchmark_has_a_section(report):
    text = (ROOT / "docs" / "results.md").read_text()
    for prefix, (heading, _) in report.SECTIONS.items():
        if any(p for p in (BENCH / "results").glob(f"{prefix}*.json") if not p.stem.endswith("_quick")):
            assert f"## {heading}" in text
    assert set(report.SECTIONS) == set(report.ROWS)


def _ppl_json(adapter: dict | None, command: str) -> dict:
    return {
        "command": command,
        "machine": {"cpu_count": 2, "processor": "x86_64", "torch_threads": 1, "torch": "2.13.0+cpu"},
        "adapter": adapter,
        "results": [{"file": "books/a.txt", "score_last": 256, "total_length": 8192, "n_windows": 1,
                     "modes": {"adapter": {"ppl": 12.3456}, "window": {"ppl": 13.0}}}],
    }


def test_a_copied_adapter_is_named_by_the_shipped_one(report, tmp_path):
    sha = next(iter(report._shipped()))  # the shipped adapter's SHA-256
    data = _ppl_json({"path": "/tmp/elsewhere/copy", "sha256": sha, "trained": True},
                     "bench_ppl.py --adapter /tmp/elsewhere/copy --lengths 8192 --out /scratch/run/out")
    (tmp_path / "ppl.json").write_text(json.dumps(data))
    table = report.table(tmp_path)
    row = table.splitlines()[-1]
    assert f"; adapter {SHIPPED} |" in row and f"--adapter {SHIPPED} " in row
    assert "adapter 12.35, window 13.00" in row  # figures as the JSON holds them
    assert "--out <out>" in row and not machine_local_paths(row)


def test_an_adapter_that_is_not_shipped_is_named_by_its_hash(report, tmp_path):
    data = _ppl_json({"path": "/tmp/mine/adapter", "sha256": "abcd1234" + "0" * 56, "trained": True},
                     "bench_ppl.py --adapter /tmp/mine/adapter --lengths 8192")
    (tmp_path / "ppl.json").write_text(json.dumps(data))
    row = report.table(tmp_path).splitlines()[-1]
    assert "adapter not shipped (sha256 abcd1234…)" in row and "--adapter ADAPTER " in row
    assert "/tmp" not in row
    assert report.adapter_where(str(ROOT / SHIPPED), None) == SHIPPED  # inside the repository: relative


def test_check_mode_says_whether_the_page_is_current(report, monkeypatch, tmp_path, capsys):
    assert report.main(["--check"]) == 0
    monkeypatch.setattr(report, "PAGE", tmp_path / "results.md")
    monkeypatch.setattr(report, "ROOT", tmp_path)
    assert report.main(["--check"]) == 1
    assert "out of date" in capsys.readouterr().err
