"""The issue-25 shipping bar from `sharedctx eval ppl --control` JSON: per file, adapter / control / window alone,
reading gain (adapter vs control), harm (control vs window) and adapter vs window, with the bar's verdict.

    python recipes/results/reading/bar_table.py RESULT.json [--window-json WINDOW_ONLY.json]

The bar (at 8K and 16K, every file): adapter >= 2 % below the window alone and >= 2 % below the control, and the
control within 2 % of the window alone.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def pct(a: float, b: float) -> float:
    """``100 * (a / b - 1)``: negative when ``a`` is below ``b``."""
    return 100.0 * (a / b - 1.0)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("result")
    ap.add_argument("--window-json", help="window-alone figures from another run of the same stretches")
    args = ap.parse_args()
    rows = json.loads(Path(args.result).read_text())["results"]
    window = {}
    if args.window_json:
        window = {Path(r["file"]).name: r["modes"]["window"]["ppl"] for r in json.loads(Path(args.window_json).read_text())["results"]}
    print("| file | total | adapter | control | window alone | adapter vs control | control vs window (harm) | adapter vs window | bar |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        name = Path(r["file"]).name
        m = r["modes"]
        a, c = m["adapter"]["ppl"], m["control"]["ppl"]
        w = m["window"]["ppl"] if "window" in m else window[name]
        ok = pct(a, w) <= -2 and pct(a, c) <= -2 and abs(pct(c, w)) <= 2
        print(f"| {name} | {r['total_length']} ({r['context_tokens']} + {r['window']}) | {a:.2f} | {c:.2f} | {w:.2f} | "
              f"{pct(a, c):+.1f} % | {pct(c, w):+.1f} % | {pct(a, w):+.1f} % | {'met' if ok else 'not met'} |")


if __name__ == "__main__":
    main()
