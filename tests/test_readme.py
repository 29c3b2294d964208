"""Every Python block of the README runs as written (with the default model: slow); the README stays a front door
whose links and headline figures hold."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BLOCKS = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]


def test_readme_has_quickstarts():
    text = "\n".join(BLOCKS)
    for needle in ("SharedLLM.from_pretrained()", "ContextIndex", "langchain_sharedctx", "llama_index.indices.sharedctx"):
        assert needle in text


def test_readme_stays_short():
    assert len(README.read_bytes()) < 20_000, "the README is the front door: move detail into docs/"


def _links(page: Path) -> list[str]:
    """The targets of a page's Markdown links and images, outside fenced code."""
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)
    return re.findall(r"!?\[[^\]]*\]\(([^)\s]+)\)", text)


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_files(page):
    for target in _links(page):
        if re.match(r"[a-z]+:", target) or target.startswith("#"):
            continue  # a URL or an anchor on the same page
        path = (page.parent / target.split("#")[0]).resolve()
        assert path.exists(), f"{page.relative_to(ROOT)} links to {target}, which does not exist"


def test_headline_figures_are_on_the_results_page():
    """Every decimal figure the README quotes as a headline result is one the generated results page holds."""
    section = README.read_text().split("## Headline results", 1)[1].split("\n## ", 1)[0]
    results = (ROOT / "docs" / "results.md").read_text()
    figures = re.findall(r"(?<![\w.])\d+\.\d+(?![\w])", section)
    assert len(figures) >= 20
    missing = sorted({f for f in figures if f not in results})
    assert not missing, f"README headline figures not in docs/results.md: {missing}"


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number):
    block = BLOCKS[number]
    for module in re.findall(r"^from (langchain_sharedctx|llama_index\.\w+\.sharedctx) import", block, flags=re.M):
        pytest.importorskip(module, reason=f"{module} is installed by `make test`")
    proc = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
