"""Finding things in long contexts: passkey, RULER-style needles and variable tracking, against the peers.

    python benchmarks/bench_finding.py --lengths 4096 8192 16384 --trials 2       # default model, ~1 h on 2 CPU cores
    python benchmarks/bench_finding.py --quick                                    # 1K tokens, one trial, minutes

Every trial builds one context (the target at a depth from --depths, cycled over the trials) and asks every
system the same question with greedy decoding; a trial scores the fraction of the answers contained in the
output. Systems (see _systems.py): sharedctx latent (cold), sharedctx text (tree traversal as a retriever),
chunk-and-embed RAG with MiniLM, BM25, LongLLMLingua (where it runs offline), full attention (within the
model's trained window) and streaming (4 sinks + a recent window). Writes benchmarks/results/finding.json
with every trial, accuracy tables by system x task x length and system x length x depth, and finding.png
(heat maps of accuracy, length x depth, one per system).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections import defaultdict

import numpy as np
import torch

from _common import FILLER, add_model_args, data_file, load_llm, model_info, output_name, plt, run, write_json
from _systems import NotRun, make_system
from _tasks import TASK_NAMES, filler_tokens, make_task, score

DEFAULT_SYSTEMS = ("sharedctx_latent", "sharedctx_text", "rag_minilm", "bm25", "longllmlingua", "full", "streaming")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[4096, 8192, 16384, 32768])
    ap.add_argument("--tasks", nargs="+", default=None, choices=TASK_NAMES, help="default: all (passkey, niah_multikey, vt with --quick)")
    ap.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS))
    ap.add_argument("--trials", type=int, default=2, help="trials per task and length (depths cycle over tasks and trials)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--max-new-tokens", type=int, default=24)
    ap.add_argument("--top-k", type=int, default=8, help="chunks for RAG and BM25 (of --chunk-tokens each)")
    ap.add_argument("--chunk-tokens", type=int, default=256, help="RAG/BM25 chunk size in base-model tokens (MiniLM reads 256 word pieces)")
    ap.add_argument("--text-top-k", type=int, default=2, help="chunks (of C tokens) sharedctx text mode puts in the prompt")
    ap.add_argument("--stream-window", type=int, default=2048, help="streaming cache: 4 sinks + this many tokens in all")
    ap.add_argument("--filler", default=FILLER, help="haystack prose for the RULER tasks: a file under the corpus folder (--data), or a path")
    args = ap.parse_args(argv)
    if args.quick:
        args.trials, args.depths = 1, [0.5]
    args.lengths = args.lengths or ([1024] if args.quick else [4096, 8192, 16384, 32768])
    args.tasks = args.tasks or (["passkey", "niah_multikey", "vt"] if args.quick else list(TASK_NAMES))
    filler_path = data_file(args.filler, args)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)

    llm = load_llm(args)
    tok = llm.tokenizer
    with open(filler_path, encoding="utf-8") as fh:
        filler = filler_tokens(tok, fh.read())
    options = dict(top_k=args.top_k, chunk_tokens=args.chunk_tokens, overlap=args.chunk_tokens // 8, window=args.stream_window)
    systems, not_run = {}, {}
    for name in args.systems:
        try:
            opts = dict(options, top_k=args.text_top_k) if name == "sharedctx_text" else options
            systems[name] = make_system(name, llm, **opts)
        except NotRun as exc:
            not_run[name] = str(exc)
            print(f"not run: {name}: {exc}", flush=True)

    trials, skipped = [], defaultdict(dict)
    start = time.perf_counter()
    load_at_start = os.getloadavg()[0]

    def save() -> object:
        result = {
            **model_info(llm),
            "load_average_at_start": round(load_at_start, 2),
            "lengths": args.lengths, "tasks": args.tasks, "trials_per_task": args.trials, "depths": args.depths,
            "max_new_tokens": args.max_new_tokens, "systems": list(systems), "not_run": not_run, "skipped": dict(skipped),
            "options": {**options, "text_top_k": args.text_top_k, "filler": str(args.filler), "passkey_filler": "sharedctx.training.data repeated sentences",
                        "rag": "LlamaIndex vector-index recipe: token chunks with 1/8 overlap, MiniLM mean pooling, cosine top-k in document order, DEFAULT_TEXT_QA_PROMPT",
                        "streaming": "4 sink tokens + most recent tokens, re-encoded (no rolling pass over evicted tokens)"},
            "lengths_done": sorted({r["length"] for r in trials}),
            "accuracy": _table(trials, ("system", "task", "length")),
            "accuracy_by_system_length": _table(trials, ("system", "length")),
            "accuracy_by_depth": _table(trials, ("system", "length", "depth")),
            "mean_total_s": _table(trials, ("system", "length"), key="total_s"),
            "seconds": round(time.perf_counter() - start, 1),
            "trials": trials,
        }
        return write_json(output_name("finding", args), result, args.out)

    for length in args.lengths:
        rng = np.random.default_rng(args.seed + length)
        for ti, task_name in enumerate(args.tasks):
            for t in range(args.trials):
                depth = args.depths[(ti + t) % len(args.depths)]  # depths cycle over tasks and trials
                task = make_task(task_name, tok, rng, length=length, depth=depth, filler=filler)
                ctx_tokens = len(tok(task.context, add_special_tokens=False)["input_ids"])
                for name, system in systems.items():
                    try:
                        r = system(task.context, task.question, args.max_new_tokens)
                    except NotRun as exc:
                        skipped[name][str(length)] = str(exc)
                        continue
                    s = score(task, r["answer"])
                    trials.append({"system": name, "task": task_name, "length": length, "context_tokens": ctx_tokens, "depth": depth,
                                   "score": s, "answers": task.answers, **r})
                    print(f"{length:>6} {task_name:<16} d={depth:.2f} {name:<17} score {s:.2f}  {r['total_s']:6.1f} s  {r['answer'][:50]!r}", flush=True)
        save()  # after every length, so a long run leaves its finished lengths behind
    path = save()
    result = json.loads(path.read_text())
    _plot(result, path.with_suffix(".png"))
    print(f"wrote {path}")
    return result


def _table(rows: list[dict], keys: tuple[str, ...], key: str = "score") -> dict:
    """Nested ``{k1: {k2: ... mean}}`` of ``key`` over ``rows`` grouped by ``keys``."""
    groups: dict[tuple, list[float]] = defaultdict(list)
    for r in rows:
        groups[tuple(str(r[k]) for k in keys)].append(float(r[key]))
    out: dict = {}
    for ks, vals in groups.items():
        node = out
        for k in ks[:-1]:
            node = node.setdefault(k, {})
        node[ks[-1]] = round(sum(vals) / len(vals), 4)
    return out


def _plot(result: dict, path) -> None:
    pyplot = plt()
    if pyplot is None or not result["trials"]:
        return
    systems = [s for s in result["systems"] if s in result["accuracy_by_depth"]]
    lengths, depths = [str(n) for n in result["lengths"]], [str(d) for d in result["depths"]]
    fig, axes = pyplot.subplots(1, len(systems), figsize=(2.6 * len(systems), 2.8), squeeze=False)
    for ax, name in zip(axes[0], systems):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for j, n in enumerate(lengths):
            for i, d in enumerate(depths):
                grid[i, j] = result["accuracy_by_depth"][name].get(n, {}).get(d, np.nan)
        ax.imshow(grid, vmin=0, vmax=1, cmap="viridis", aspect="auto")
        for i in range(len(depths)):
            for j in range(len(lengths)):
                if not np.isnan(grid[i, j]):
                    ax.text(j, i, f"{grid[i, j]:.2f}", ha="center", va="center", color="w" if grid[i, j] < 0.6 else "k", fontsize=7)
        ax.set_title(name, fontsize=8)
        ax.set_xticks(range(len(lengths)), [f"{int(n) // 1024}K" for n in lengths], fontsize=7)
        ax.set_yticks(range(len(depths)), depths, fontsize=7)
        ax.set_xlabel("context tokens", fontsize=7)
    axes[0][0].set_ylabel("depth", fontsize=7)
    adapter = result["adapter"]
    fig.suptitle(f"accuracy over tasks {', '.join(result['tasks'])}; adapter {'trained' if adapter['trained'] else 'UNTRAINED (identity)'}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
