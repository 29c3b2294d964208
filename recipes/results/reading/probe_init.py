"""Reading at initialisation: a fresh adapter whose gates are set by hand, no training (issue 18).

For each ``M:GATE[:NODE_KEEP[:POSITIONS[:FIRST]]]`` given, builds SmolLM2-135M-Instruct (the default model) with a new
adapter of ``injection_layers=M`` (the cross-attention blocks are copies of each layer's own attention, as at
training start), sets the gates of layers FIRST..M-1 to ``tanh(g) = GATE`` and those below FIRST to 0 (those layers
inject nothing: "only the upper layers read"; FIRST defaults to 0, every layer) and runs `sharedctx.training.reading.eval_reading` with the
protocol of this folder's arms (held-out `books/pride_and_prejudice.txt`, control `books/emma.txt`, 2 chunks of
1,024 context tokens, a 256-token window, 4 windows, 64-token copy spans, policy `right`). One JSON line per
configuration is appended to ``--out``.

    SHAREDCTX_DATA=../shared/data python recipes/results/reading/probe_init.py --out probe_init.jsonl 4:0.05 30:0.15
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from pathlib import Path

import torch

from sharedctx import SharedCtxConfig, SharedLLM
from sharedctx.training.reading import eval_reading


def probe(data: Path, m: int, gate: float, keep: int = 32, positions: str = "chunk", first: int = 0) -> dict:
    cfg = SharedCtxConfig(injection_layers=m, chunk_size=1024, tree_height=3, node_keep=keep, policy="right", positions=positions)
    llm = SharedLLM.from_pretrained(None, adapter=False, config=cfg)
    with torch.no_grad():
        for layer, block in enumerate(llm.injection):
            g = gate if layer >= first else 0.0
            block.gate.fill_(math.atanh(g) if llm.config.gate == "tanh" else g)
    tok = llm.tokenizer
    text = tok((data / "books/pride_and_prejudice.txt").read_text())["input_ids"]
    control = tok((data / "books/emma.txt").read_text())["input_ids"]
    t0 = time.time()
    r = eval_reading(llm, text, control, context_tokens=2048, window=256, n_windows=4, span=64)
    row = {"M": m, "gate": gate, "keep": keep, "positions": positions}
    if first:
        row["first"] = first
    return {
        **row, "s": round(time.time() - t0, 1),
        "reading": round(r["reading_gain_pct"], 2), "adapt": round(r["adaptation_pct"], 2), "copy": round(r["copy_gain_pct"], 2),
        "copy_by_level": {k: round(v, 2) for k, v in r["copy_gain_by_level_pct"].items()},
        "copy_ppl": {k: round(r["copy"]["all"][k], 2) for k in ("true_ppl", "control_ppl", "none_ppl")},
        "ppl": {k: round(v, 2) for k, v in r["ppl"].items()},
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("configs", nargs="+", help="M:GATE[:NODE_KEEP[:POSITIONS[:FIRST]]], e.g. 30:0.15, 16:0.5:128 or 30:0.15:32:chunk:16")
    ap.add_argument("--data", default=os.environ.get("SHAREDCTX_DATA", ""), help="corpus folder (default $SHAREDCTX_DATA)")
    ap.add_argument("--out", default="probe_init.jsonl")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    if not args.data:
        ap.error("give --data DIR or set SHAREDCTX_DATA (the folder holding books/pride_and_prejudice.txt and books/emma.txt)")
    torch.set_num_threads(args.threads)
    for spec in args.configs:
        parts = spec.split(":")
        row = probe(Path(args.data), int(parts[0]), float(parts[1]), *(p if i == 1 else int(p) for i, p in enumerate(parts[2:])))
        print(json.dumps(row), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
