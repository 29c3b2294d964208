"""Every Python block of the README runs as written (with the default model: slow)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKS = re.findall(r"```python\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)


def test_readme_has_quickstarts():
    text = "\n".join(BLOCKS)
    for needle in ("SharedLLM.from_pretrained()", "ContextIndex", "langchain_sharedctx", "llama_index.indices.sharedctx"):
        assert needle in text


@pytest.mark.slow
@pytest.mark.parametrize("number", range(len(BLOCKS)))
def test_readme_block_runs(number):
    block = BLOCKS[number]
    for module in re.findall(r"^from (langchain_sharedctx|llama_index\.\w+\.sharedctx) import", block, flags=re.M):
        pytest.importorskip(module, reason=f"{module} is installed by `make test`")
    proc = subprocess.run([sys.executable, "-c", block], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip()
