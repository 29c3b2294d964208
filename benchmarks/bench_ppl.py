"""Perplexity against context length, the paper's protocol, on held-out books, TeX and code.

    python benchmarks/bench_ppl.py --lengths 8192 16384 32768 --windows 2           # default model
    python benchmarks/bench_ppl.py --quick                                          # 1K-token window, minutes

A stretch of N tokens is cut into context chunks and a window (--window tokens); the score is the perplexity of
the window's last --score-last tokens, pooled over --windows stretches per file (`sharedctx.evaluate.eval_ppl`,
the code `sharedctx eval ppl` runs). Modes: ``adapter`` (the context injected), ``control`` (an unrelated text
of the same kind and length injected: separates reading from adapting), ``window`` (the window alone), ``full``
(full attention over all N tokens, up to --full-max; past the trained window it is reported, flagged) and
``streaming`` (4 sinks + the window). Files: the three held out of training (sharedctx.data.DEFAULT_HOLDOUT).
Writes benchmarks/results/ppl.json and ppl.png (perplexity against N, one panel per file).

The held-out code file has about 100K tokens and the TeX file 36K. For code at 128K, ``--files stdlib:code`` reads
a longer held-out text: modules of the running Python's standard library that are not in the training data
(`sharedctx.data.STDLIB_TEXTS`; the JSON records the Python version and the text's SHA-256, since the modules change between
versions). Controls longer than one training file are files of the same kind joined in order (`CONTROLS`).
Files are read from the corpus folder: --data DIR, else $SHAREDCTX_DATA, else ../shared/data (--quick: the texts
shipped in benchmarks/data).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from _common import add_model_args, data_file, finish, load_llm, model_info, plt, run
from sharedctx.training.data import STDLIB_TEXTS, read_eval_text

#: held-out text -> unrelated texts of the same kind (the control), joined in order as far as a length needs
CONTROLS = {
    "books/pride_and_prejudice.txt": ("books/northanger_abbey.txt", "books/emma.txt"),
    "math/pari_usersch4.tex": ("math/pari_usersch3.tex",),
    "code/cpython_email.py.txt": ("code/cpython_json.py.txt", "code/cpython_asyncio.py.txt", "code/cpython_unittest.py.txt"),
    "stdlib:code": ("stdlib:code-control",),
}

def read_text(name: str, args) -> tuple[str, dict]:
    """The text of a file under the corpus folder (`_common.data_file`), a path, or a `sharedctx.data.STDLIB_TEXTS`
    name, with its source."""
    return read_eval_text(name if name in STDLIB_TEXTS else str(data_file(name, args)))


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[4096, 8192, 16384, 32768, 65536, 131072])
    ap.add_argument("--files", nargs="+", default=list(CONTROLS)[:3],
                    help="files under the corpus folder (--data), paths, or stdlib:code (default: the three held-out files)")
    ap.add_argument("--modes", nargs="+", default=["adapter", "control", "window", "full", "streaming"])
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--score-last", type=int, default=256)
    ap.add_argument("--windows", type=int, default=2, help="stretches per file and length")
    ap.add_argument("--full-max", type=int, default=16384, help="longest N full attention is run at")
    args = ap.parse_args(argv)
    if args.quick:
        args.window, args.windows, args.files = min(args.window, 512), 1, args.files[:1]
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 8192, 16384, 32768, 65536, 131072])
    for name in args.files:  # a missing text fails before the model loads
        if name not in STDLIB_TEXTS:
            data_file(name, args)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]

    from sharedctx.diagnostics import eval_ppl

    llm = load_llm(args)
    tok = llm.tokenizer

    sources: dict[str, dict] = {}

    def ids(name: str) -> np.ndarray:
        text, sources[name] = read_text(name, args)
        return np.asarray(tok(text, add_special_tokens=False)["input_ids"], dtype=np.int64)

    need = max(args.lengths)
    results, skipped = [], []
    start = time.perf_counter()
    for name in args.files:
        tokens = ids(name)
        ctrl, used = None, []
        if "control" in args.modes:
            for part in CONTROLS.get(name, ()):  # as many as the longest length needs
                piece = ids(part)
                ctrl = piece if ctrl is None else np.concatenate([ctrl, piece])
                used.append(part)
                if len(ctrl) >= need:
                    break
        control = " + ".join(used) or None
        for n in args.lengths:
            modes = [m for m in args.modes if not (m == "full" and n > args.full_max) and not (m == "control" and ctrl is None)]
            n_ctx = n - min(args.window, n)
            if len(tokens) < n or (ctrl is not None and len(ctrl) < n_ctx):
                why = f"{name} has {len(tokens)} tokens" if len(tokens) < n else f"its control {control} has {len(ctrl)} < {n_ctx} context tokens"
                skipped.append({"file": name, "length": n, "reason": why})
                continue
            r = eval_ppl(llm, tokens, total_length=n, window=min(args.window, n), score_last=args.score_last, n_windows=args.windows,
                         modes=modes, control_tokens=ctrl, sinks=4)
            r.update(file=name, control_file=control if "control" in modes else None,
                     full_past_trained_window=bool("full" in modes and llm.max_positions and n > llm.max_positions))
            results.append(r)
            cells = "  ".join(f"{m} {v['ppl']:.2f}" for m, v in r["modes"].items())
            print(f"{name} N={n}: {cells}", flush=True)
    result = {
        **model_info(llm),
        "load_average_at_start": round(load_at_start, 2),
        "protocol": {"window": args.window, "score_last": args.score_last, "windows_per_file": args.windows, "sinks": 4, "full_max": args.full_max},
        "lengths": args.lengths, "files": args.files, "modes": args.modes, "skipped": skipped, "sources": sources,
        "seconds": round(time.perf_counter() - start, 1),
        "results": results,
    }
    return finish("ppl", result, args, _plot)


def _plot(result: dict, path) -> None:
    pyplot = plt()
    if pyplot is None or not result["results"]:
        return
    files = list(dict.fromkeys(r["file"] for r in result["results"]))
    fig, axes = pyplot.subplots(1, len(files), figsize=(4 * len(files), 3.2), squeeze=False)
    for ax, f in zip(axes[0], files):
        rows = [r for r in result["results"] if r["file"] == f]
        for mode in result["modes"]:
            pts = [(r["total_length"], r["modes"][mode]["ppl"]) for r in rows if mode in r["modes"]]
            if pts:
                ax.plot(*zip(*pts), marker="o", label=mode)
        if result.get("max_positions"):
            ax.axvline(result["max_positions"], color="grey", ls=":", lw=1)
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_title(f, fontsize=8)
        ax.set_xlabel("total tokens (context + window)")
    axes[0][0].set_ylabel(f"PPL, last {result['protocol']['score_last']} tokens")
    axes[0][0].legend(fontsize=7)
    a = result["adapter"]
    fig.suptitle(f"adapter: {a['path'] or 'none (identity)'}{'' if a['trained'] else ' (untrained)'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
