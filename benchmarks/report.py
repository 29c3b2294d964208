"""Regenerate the README's results table from benchmarks/results/*.json.

    python benchmarks/report.py          # rewrites the block between the results markers in README.md
"""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
START, END = "<!-- results:start -->", "<!-- results:end -->"


def _machine(m: dict) -> str:
    where = m.get("cuda") or f"{m.get('cpu_count')}-core CPU ({m.get('processor')}), {m.get('torch_threads')} threads"
    return f"{where}, torch {m.get('torch')}"


def core_rows(data: dict) -> list[str]:
    q = data["query_first_token_s"]
    p = data["precompute"]
    n = data["document_tokens"]
    cmd = f"`python benchmarks/{data['command']}`"
    mach = _machine(data["machine"])
    return [
        f"| encode every node of a {n}-token document (lower model, {data['config']['injection_layers']} layers) | "
        f"{p['lower_tokens_per_s']:,.0f} lower-model tok/s ({p['seconds']:.1f} s) | {cmd} | {mach} |",
        f"| time to first token, precomputed tree ({data['injected_states']} injected states) | {q['precomputed_tree']:.2f} s | {cmd} | {mach} |",
        f"| time to first token, encoding on the fly | {q['on_the_fly']:.2f} s | {cmd} | {mach} |",
        f"| full-attention prefill of the same {n} tokens (baseline) | {q['full_attention_prefill']:.2f} s "
        f"({data['ratios']['full_attention_over_precomputed']:.1f}x the precomputed query) | {cmd} | {mach} |",
    ]


ROWS = {"core.json": core_rows}


def table() -> str:
    lines = ["| what | measured | command | machine |", "| --- | --- | --- | --- |"]
    found = False
    for name, fn in ROWS.items():
        path = RESULTS / name
        if path.is_file():
            lines += fn(json.loads(path.read_text()))
            found = True
    if not found:
        lines.append("| (no results yet) | | | |")
    return "\n".join(lines)


def main() -> None:
    readme = ROOT / "README.md"
    text = readme.read_text()
    block = f"{START}\n{table()}\n{END}"
    new = re.sub(re.escape(START) + ".*?" + re.escape(END), lambda _: block, text, flags=re.S)
    readme.write_text(new)
    print(block)


if __name__ == "__main__":
    main()
