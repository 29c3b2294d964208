"""Ablations of the paper (tree height, node_keep, M, policy, chunk positions) and of our additions (sampling
alignment, injected-state budgets, expanding both children), each on perplexity and on needle retrieval.

    python benchmarks/bench_ablations.py --lengths 8192 --trials 3      # default model and adapter
    python benchmarks/bench_ablations.py --quick                        # 1K tokens, one trial

Each variant changes one option of the adapter's configuration. Perplexity: `sharedctx.evaluate.eval_ppl`
(adapter mode; the window-only baseline once) on one held-out file. Needles: passkey and RULER single-needle
trials answered by the latent path (`SharedLLM.complete(context=...)`, every chunk injected), or, for the
budget and expand-both variants, by a `ContextIndex` (latent) with those options. A variant that changes M
cannot use an adapter trained for another M: it runs with the identity adapter and says so.
Writes benchmarks/results/ablations.json and ablations.png.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from _common import FILLER, add_model_args, data_file, finish, load_llm, model_info, plt, run
from _systems import SharedLatent, SharedStore
from _tasks import filler_tokens, make_task, score

#: (group, label, config changes, ContextIndex options or None for the plain latent path)
VARIANTS = [
    ("reference", "adapter config", {}, None),
    ("tree_height", "h=2", {"tree_height": 2}, None),
    ("tree_height", "h=4", {"tree_height": 4}, None),
    ("node_keep", "keep=16 (16x)", {"node_keep": 16}, None),
    ("node_keep", "keep=64 (4x)", {"node_keep": 64}, None),
    ("injection_layers", "M=2", {"injection_layers": 2}, None),
    ("injection_layers", "M=8", {"injection_layers": 8}, None),
    ("policy", "query", {"policy": "query"}, None),
    ("policy", "right", {"policy": "right"}, None),
    ("policy", "left", {"policy": "left"}, None),
    ("policy", "random", {"policy": "random"}, None),
    ("policy", "lexical", {"policy": "lexical"}, None),
    ("positions", "positions=none", {"positions": "none"}, None),
    ("sampling", "start-aligned", {"sampling": "start"}, None),
    ("budget", "top_k=2 chunks", {"policy": "query"}, {"top_k": 2}),
    ("budget", "max 512 states", {"policy": "query"}, {"top_k": 10**6, "max_injected_states": 512}),
    ("expand_both", "expand_margin=0.02", {"policy": "query"}, {"top_k": 10**6, "expand_margin": 0.02}),
]


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[8192])
    ap.add_argument("--file", default="books/pride_and_prejudice.txt", help="perplexity text: a file under the corpus folder (--data), or a path")
    ap.add_argument("--filler", default=FILLER, help="haystack prose for the needles: a file under the corpus folder, or a path")
    ap.add_argument("--window", type=int, default=4096)
    ap.add_argument("--windows", type=int, default=1)
    ap.add_argument("--trials", type=int, default=3, help="needle trials per task (depths 0.1-0.9)")
    ap.add_argument("--tasks", nargs="+", default=["passkey", "niah_single"])
    ap.add_argument("--only", nargs="+", default=None, help="groups to run (default all)")
    args = ap.parse_args(argv)
    if args.quick:
        args.window, args.trials = 512, 1
    args.lengths = args.lengths or ([1024] if args.quick else [8192])
    text_path, filler_path = data_file(args.file, args), data_file(args.filler, args)
    torch.set_num_threads(args.threads)
    load_at_start = os.getloadavg()[0]
    from sharedctx.diagnostics import eval_ppl

    length = args.lengths[0]
    rows, reference = [], None
    start = time.perf_counter()
    for group, label, changes, index_opts in VARIANTS:
        if args.only and group not in args.only and group != "reference":
            continue
        try:
            llm = load_llm(args, **changes)
        except ValueError as exc:  # e.g. M larger than the model's layers
            rows.append({"group": group, "label": label, "changes": changes, "not_run": str(exc)})
            print(f"{group:<17} {label:<20} not run: {exc}", flush=True)
            continue
        tok = llm.tokenizer
        with open(text_path, encoding="utf-8") as fh:
            text_ids = np.asarray(tok(fh.read(), add_special_tokens=False)["input_ids"], dtype=np.int64)
        row = {"group": group, "label": label, "changes": changes, "index_options": index_opts, **model_info(llm)}
        if index_opts is None:
            modes = ["adapter", "window"] if reference is None else ["adapter"]
            window = min(args.window, length // 2)
            r = eval_ppl(llm, text_ids, total_length=length, window=window, score_last=min(256, window // 2), n_windows=args.windows, modes=modes)
            row["ppl"] = r["modes"]["adapter"]["ppl"]
            if reference is None:
                reference = r["modes"]["window"]["ppl"]
        system = SharedLatent(llm) if index_opts is None else SharedStore(llm, **index_opts)
        with open(filler_path, encoding="utf-8") as fh:
            filler = filler_tokens(tok, fh.read())
        rng = np.random.default_rng(args.seed)
        scores = []
        for task_name in args.tasks:
            for t in range(args.trials):
                depth = 0.1 + 0.8 * t / max(1, args.trials - 1) if args.trials > 1 else 0.5
                task = make_task(task_name, tok, rng, length=length, depth=depth, filler=filler)
                out = system(task.context, task.question, 16)
                scores.append(score(task, out["answer"]))
        row["needle_accuracy"] = sum(scores) / len(scores)
        row["needle_trials"] = len(scores)
        rows.append(row)
        print(f"{group:<17} {label:<20} ppl {row.get('ppl', float('nan')):8.3f}  needles {row['needle_accuracy']:.2f}", flush=True)
        del llm
    result = {
        "load_average_at_start": round(load_at_start, 2),
        "length": length, "file": args.file, "window": min(args.window, length // 2), "score_last": min(256, min(args.window, length // 2) // 2), "windows": args.windows, "tasks": args.tasks, "trials": args.trials,
        "window_only_ppl": reference, "seconds": round(time.perf_counter() - start, 1), "rows": rows,
    }
    return finish("ablations", result, args, _plot)


def _plot(result: dict, path) -> None:
    pyplot = plt()
    if pyplot is None or not result["rows"]:
        return
    rows = [r for r in result["rows"] if "not_run" not in r]
    labels = [f"{r['group']}: {r['label']}" for r in rows]
    fig, axes = pyplot.subplots(1, 2, figsize=(11, 0.32 * len(rows) + 1.5), sharey=True)
    y = np.arange(len(rows))
    axes[0].barh(y, [r.get("ppl", np.nan) for r in rows], color="tab:blue")
    if result["window_only_ppl"]:
        axes[0].axvline(result["window_only_ppl"], color="k", ls=":", lw=1, label="window only")
        axes[0].legend(fontsize=7)
    axes[0].set_xlabel(f"PPL at {result['length']} tokens ({result['file']})")
    axes[1].barh(y, [r["needle_accuracy"] for r in rows], color="tab:green")
    axes[1].set_xlabel(f"needle accuracy ({', '.join(result['tasks'])})")
    axes[1].set_xlim(0, 1)
    axes[0].set_yticks(y, labels, fontsize=7)
    axes[0].invert_yaxis()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
