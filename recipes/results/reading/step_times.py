"""Step time by task and window length from a training log (`train_log.jsonl`), for the reading table.

    python recipes/results/reading/step_times.py runs/reading-long-window/train_log.jsonl [--edges 512,1024,1536,2049]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("log")
    ap.add_argument("--edges", default="0,1024,1536,2049", help="window-length bucket edges (lower inclusive)")
    args = ap.parse_args()
    rows = [json.loads(line) for line in Path(args.log).read_text().splitlines() if line.strip()]
    edges = [int(e) for e in args.edges.split(",")]
    print(f"{len(rows)} steps, {rows[-1]['elapsed_s']} s of training, mean {np.mean([r['step_s'] for r in rows]):.1f} s a step")
    print("| task | window | steps | mean s a step | median | tokens a second |")
    print("| --- | --- | --- | --- | --- | --- |")
    for task in sorted({r["task"] for r in rows}):
        mine = [r for r in rows if r["task"] == task]
        buckets = [(lo, hi) for lo, hi in zip(edges, edges[1:])] if task != "reconstruction" else [(0, 1 << 30)]
        for lo, hi in buckets:
            sel = [r for r in mine if lo <= r.get("window", 0) < hi]
            if not sel:
                continue
            s = [r["step_s"] for r in sel]
            label = f"{min(r['window'] for r in sel)}-{max(r['window'] for r in sel)}"
            print(f"| {task} | {label} | {len(sel)} | {np.mean(s):.1f} | {np.median(s):.1f} | {np.mean([r['tok_per_s'] for r in sel]):.0f} |")


if __name__ == "__main__":
    main()
