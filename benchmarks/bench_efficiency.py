"""Efficiency against context length: time to first token, decode tokens/s, end-to-end latency and peak memory.

    python benchmarks/bench_efficiency.py --lengths 4096 8192 16384 32768     # default model, this machine (CPU or GPU)
    python benchmarks/bench_efficiency.py --quick                              # 1K and 2K tokens, a minute
    python benchmarks/bench_efficiency.py --device cuda --dtype bfloat16 --lengths 8192 16384 32768 65536 131072 --full-max 131072
                                                                               # the H200 (writes efficiency_gpu.json)

One RULER single-needle question in book prose per length, the same for every system, greedy, --max-new-tokens tokens. Systems: full attention
(up to --full-max tokens; past the model's trained window it is timed as a cost baseline only), streaming (4 sinks +
a recent window), chunk-and-embed RAG (MiniLM, top-k chunks), sharedctx cold (encode on the fly, every chunk injected)
and sharedctx with a warm store (a ContextIndex built once, reopened from disk, queried with every chunk injected;
the build is reported separately). Peak memory is the CUDA allocator's peak on a GPU, else the resident set
size sampled every 5 ms, above what the process held before the call. Ratios are of the same run.
Writes benchmarks/results/efficiency.json (efficiency_<gpu>.json on CUDA) and a PNG.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np
import torch

from _common import FILLER, PeakMemory, add_model_args, data_file, finish, load_llm, model_info, plt, run
from _systems import NotRun, make_system
from _tasks import filler_tokens, make_task, score

DEFAULT_SYSTEMS = ("full", "streaming", "rag_minilm", "bm25", "sharedctx_latent", "sharedctx_store", "sharedctx_text")


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[4096, 8192, 16384, 32768])
    ap.add_argument("--systems", nargs="+", default=list(DEFAULT_SYSTEMS))
    ap.add_argument("--repeats", type=int, default=1, help="best of this many runs per point")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    ap.add_argument("--full-max", type=int, default=16384, help="longest context full attention is run at (its cost grows as length^2)")
    ap.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    ap.add_argument("--dtype", default=None, help="e.g. bfloat16 on the GPU")
    ap.add_argument("--text-top-k", type=int, default=2, help="chunks (of C tokens) sharedctx text mode puts in the prompt (as bench_finding)")
    ap.add_argument("--filler", default=FILLER, help="haystack prose: a file under the corpus folder (--data), or a path")
    args = ap.parse_args(argv)
    args.lengths = args.lengths or ([1024, 2048] if args.quick else [4096, 8192, 16384, 32768])
    filler_path = data_file(args.filler, args)
    torch.set_num_threads(args.threads)
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")

    load_at_start = os.getloadavg()[0]
    llm = load_llm(args)
    if device != "cpu" or args.dtype:
        llm.to(device=device, dtype=getattr(torch, args.dtype) if args.dtype else None)
    systems, not_run = {}, {}
    for name in args.systems:
        try:
            opts = {"top_k": 10**6} if name == "sharedctx_store" else {"top_k": args.text_top_k} if name == "sharedctx_text" else {}
            systems[name] = make_system(name, llm, allow_past_window=True, **opts)
        except NotRun as exc:
            not_run[name] = str(exc)
    with open(filler_path, encoding="utf-8") as fh:  # book prose: repeated filler would let the store deduplicate chunks
        filler = filler_tokens(llm.tokenizer, fh.read())
    rows, skipped = [], {}
    for length in args.lengths:
        task = make_task("niah_single", llm.tokenizer, np.random.default_rng(args.seed + length), length=length, depth=0.5, filler=filler)
        for name, system in systems.items():
            if name == "full" and length > args.full_max:
                skipped.setdefault(name, {})[str(length)] = f"longer than --full-max {args.full_max}"
                continue
            best = None
            for _ in range(args.repeats):
                with PeakMemory(llm.device) as mem:
                    r = system(task.context, task.question, args.max_new_tokens)
                r["peak_memory_mb"] = round(mem.peak_mb, 1)
                if best is None or r["total_s"] < best["total_s"]:
                    best = r
            best.update(system=name, length=length, correct=score(task, best["answer"]))
            rows.append(best)
            print(f"{length:>6} {name:<17} ttft {best['first_token_s']:7.2f} s  total {best['total_s']:7.2f} s  "
                  f"peak {best['peak_memory_mb']:8.1f} MB  {best['answer'][:30]!r}", flush=True)
    result = {
        **model_info(llm),
        "load_average_at_start": round(load_at_start, 2),
        "device": str(llm.device), "dtype": str(llm.dtype), "lengths": args.lengths, "repeats": args.repeats,
        "max_new_tokens": args.max_new_tokens, "systems": list(systems), "not_run": not_run, "skipped": skipped,
        "notes": {
            "sharedctx_store": "ContextIndex built once (build_s), reopened, all chunks injected (top_k unbounded); times are the query only",
            "sharedctx_latent": "encode on the fly at query time (cold), all chunks injected",
            "sharedctx_text": f"ContextIndex built once (build_s; lazily, text only, under the lexical policy), reopened; the walk's chosen nodes' text from the best {args.text_top_k} chunks goes into the prompt; times are the query only",
            "streaming": "4 sinks + recent window re-encoded; the rolling pass over evicted tokens is not run, so its time is a lower bound",
            "full": f"past the model's trained window ({llm.max_positions}) it is timed as a cost baseline only",
            "correct": "whether the answer holds the needle's value; a short --max-new-tokens often stops before it, so "
                       "this is no accuracy figure (bench_finding.py measures finding)",
        },
        "table": {r["system"]: {} for r in rows},
        "rows": rows,
    }
    for r in rows:
        result["table"][r["system"]][str(r["length"])] = {k: r.get(k) for k in ("first_token_s", "total_s", "tokens_per_s", "peak_memory_mb", "build_s")}
    result["ratios"] = _ratios(result["table"])
    return finish("efficiency" if llm.device.type == "cpu" else "efficiency_gpu", result, args, _plot)


def _ratios(table: dict) -> dict:
    """Time to first token of each baseline over sharedctx's (warm store, cold, text mode), per length, same run."""
    out: dict = {}
    for ref in ("sharedctx_store", "sharedctx_latent", "sharedctx_text"):
        for name, per in table.items():
            if name.startswith("sharedctx"):
                continue
            for n, v in per.items():
                mine = table.get(ref, {}).get(n)
                if mine and mine["first_token_s"]:
                    out.setdefault(f"{name}_over_{ref}_ttft", {})[n] = round(v["first_token_s"] / mine["first_token_s"], 2)
    return out


def _plot(result: dict, path) -> None:
    pyplot = plt()
    if pyplot is None or not result["rows"]:
        return
    fig, axes = pyplot.subplots(1, 3, figsize=(12, 3.4))
    for name, per in result["table"].items():
        xs = [int(n) for n in per]
        for ax, key in zip(axes, ("first_token_s", "tokens_per_s", "peak_memory_mb")):
            ys = [per[n][key] if per[n][key] is not None else np.nan for n in per]
            ax.plot(xs, ys, marker="o", label=name)
    for ax, label in zip(axes, ("time to first token (s)", "decode tokens/s", "peak memory (MB)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context tokens")
        ax.set_ylabel(label)
    axes[0].set_yscale("log")
    axes[0].legend(fontsize=7)
    m = result["machine"]
    fig.suptitle(f"{m.get('cuda') or 'CPU, %s threads, load %s' % (m['torch_threads'], m.get('load_average_1m'))}", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    run(main)
