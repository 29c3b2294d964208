"""Training logs of arms that drew the same examples, side by side: mean loss by task and phase, gates at the end.

    python recipes/results/reading/compare_logs.py arm4=long_window_quiet.train_log.jsonl arm5=scalar_gate.train_log.jsonl \
        [--phases 1-30,31-60,61-95,96-130]

Arms 4, 5 and 7 share a seed and a schedule, so step ``s`` of each is the same example (task, window, context): the
script checks that and refuses logs whose steps differ. Losses are the logged, unscaled ones (quiet: KL to the frozen
base in nats a token; lm and reconstruction: NLL in nats a token).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np


def read_log(path: str) -> dict[int, dict]:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    return {r["step"]: r for r in rows}  # a resumed run may log a step twice: the last one counts


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("arms", nargs="+", help="NAME=train_log.jsonl")
    ap.add_argument("--phases", default="1-30,31-60,61-95,96-130", help="step ranges, inclusive")
    args = ap.parse_args()
    logs = {}
    for spec in args.arms:
        name, _, path = spec.partition("=")
        if not path:
            ap.error(f"give NAME=PATH, got {spec!r}")
        logs[name] = read_log(path)
    steps = sorted(set.intersection(*(set(log) for log in logs.values())))
    first = next(iter(logs.values()))
    for name, log in logs.items():
        for s in steps:
            a, b = first[s], log[s]
            if (a["task"], a.get("window"), a.get("context")) != (b["task"], b.get("window"), b.get("context")):
                raise SystemExit(f"step {s} differs: {a['task']}/{a.get('window')}/{a.get('context')} vs {name}'s "
                                 f"{b['task']}/{b.get('window')}/{b.get('context')}: these arms did not draw the same examples")
    phases = [tuple(int(x) for x in p.split("-")) for p in args.phases.split(",")]
    print(f"{len(steps)} common steps ({steps[0]}-{steps[-1]}), same examples in every arm")
    print("| task | " + " | ".join(f"steps {lo}-{hi}" for lo, hi in phases) + " |")
    print("| --- | " + " | ".join("---" for _ in phases) + " |")
    for task in sorted({first[s]["task"] for s in steps}):
        cells = []
        for lo, hi in phases:
            sel = [s for s in steps if lo <= s <= hi and first[s]["task"] == task]
            cells.append(" / ".join(f"{np.mean([logs[n][s]['loss'] for s in sel]):.3f}" if sel else "-" for n in logs))
        print(f"| {task} ({' / '.join(logs)}) | " + " | ".join(cells) + " |")
    last = steps[-1]
    for name, log in logs.items():
        g = np.array(log[last]["gates"])
        top = np.argsort(-np.abs(g))[:5]
        print(f"{name}: step {last}, {log[last]['elapsed_s']:.0f} s of training; gates {g.min():+.2f}..{g.max():+.2f}, "
              f"mean |g| {np.abs(g).mean():.3f}; largest in layers {', '.join(str(int(i)) for i in sorted(top))}")


if __name__ == "__main__":
    main()
