"""Which way of reading answers `make demo`'s question best on the shipped adapter: measure, then choose.

One command (the default model, greedy, the CLI's repetition guard on, one thread)::

    SHAREDCTX_HOME=.sharedctx-home python benchmarks/demo_choice.py

For each candidate (latent mode under the ``query``, ``lexical`` and ``right`` policies, as `sharedctx ask --file`
reads; ``text`` and ``hybrid`` modes through a lazy ``lexical`` `ContextIndex`, as `sharedctx ask --mode text`)
it records the answer, whether it holds the facts the document gives (``--expect``, all of them,
case-insensitive), what was injected and the time, and the CLI command that gives the same answer. The model is
loaded once; each candidate's policy is set on its config. Writes ``benchmarks/results/demo_choice.json``.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from _common import ROOT, write_json

QUESTION = "Who keeps the logbook of the Harrow Point light, and what colour is its lantern?"
FILE = "examples/harrow_point.txt"
#: (name, mode, policy): ``file`` reads the whole file as one context tree (`SharedLLM.stream`), the others a ContextIndex
CANDIDATES = [
    ("latent/query", "file", "query"),
    ("latent/lexical", "file", "lexical"),
    ("latent/right", "file", "right"),
    ("text/lexical", "text", "lexical"),
    ("hybrid/lexical", "hybrid", "lexical"),
]


def command(mode: str, policy: str, args) -> str:
    q = f'"{args.question}"'
    guard = f" --stop-on-repeat {args.stop_on_repeat}"
    if mode == "file":
        return f"sharedctx ask --file {args.file} --policy {policy}{guard} {q}"
    return f"sharedctx ask --file {args.file} --mode {mode} --policy {policy}{guard} {q}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--file", default=FILE)
    ap.add_argument("--question", default=QUESTION)
    ap.add_argument("--expect", nargs="+", default=["Ada Penhallow", "green"], help="facts a correct answer holds")
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--stop-on-repeat", type=int, default=8, help="the repetition guard (the CLI's default); 0 turns it off")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from sharedctx import SharedLLM
    from sharedctx.index import ContextIndex
    from sharedctx.diagnostics import read_document

    path = Path(args.file) if Path(args.file).is_absolute() else ROOT / args.file
    text = read_document(path)
    t0 = time.perf_counter()
    llm = SharedLLM.from_pretrained(None)
    load_s = time.perf_counter() - t0
    base_config = llm.config
    gen = dict(max_new_tokens=args.max_new_tokens, temperature=0.0, stop_on_repeat=args.stop_on_repeat)
    rows = []
    for name, mode, policy in CANDIDATES:
        llm.config = base_config.replace(policy=policy)
        stats: dict = {}
        t = time.perf_counter()
        if mode == "file":
            answer = "".join(llm.stream(args.question, context=text, stats=stats, **gen))
            spans = []
        else:
            with tempfile.TemporaryDirectory(prefix="sharedctx-demo-") as tmp:
                index = ContextIndex(llm, Path(tmp) / "index", policy=policy, encode="lazy")
                index.add_many([str(path)], show_progress=False)
                answer = "".join(index.stream(args.question, mode=mode, stats=stats, **gen))
                index.close()
            spans = [
                {"doc": Path(c.doc_id).name, "chars": [c.char_start, c.char_end], "score": round(float(c.score), 4)}
                for c in stats["citations"]
            ]
        total_s = time.perf_counter() - t
        found = {fact: fact.lower() in answer.lower() for fact in args.expect}
        rows.append({
            "name": name,
            "command": command(mode, policy, args),
            "answer": answer,
            "correct": all(found.values()),
            "facts_found": found,
            "generated_tokens": stats.get("generated_tokens"),
            "injected_states": stats.get("injected_states"),
            "chunks": stats.get("chunks") or stats.get("chunks_selected"),
            "cited_spans": spans,
            "total_s": round(total_s, 3),
        })
        print(f"{name:16s} correct={rows[-1]['correct']!s:5s} {total_s:6.2f} s  {answer!r}", flush=True)
    llm.config = base_config
    best = min(rows, key=lambda r: (not r["correct"], -sum(r["facts_found"].values()), r["total_s"]))
    out = write_json("demo_choice", {
        "question": args.question,
        "file": args.file,
        "expect": args.expect,
        "generation": {**gen, "threads": args.threads},
        "adapter": {"path": llm.adapter_path, "trained": llm.adapter_trained, "default_policy": base_config.policy},
        "load_s": round(load_s, 3),
        "candidates": rows,
        "best": best["name"],
        "rule": "correct first, then most expected facts, then fastest",
    }, args.out)
    print(f"best: {best['name']} -> {out}")


if __name__ == "__main__":
    main()
