"""ContextIndex build throughput and query latency, cold vs warm store, against full-attention prefill.

    python benchmarks/bench_index.py                        # default model; 8K, 32K, 128K tokens of Austen (--data)
    python benchmarks/bench_index.py --sizes 8192 32768     # fewer sizes
    python benchmarks/bench_index.py --quick                # tiny random model, 1K/2K tokens, seconds
    python benchmarks/bench_index.py --sizes 8192 --full-max 0 --concurrent 8 --name index_cpu_concurrent

For each size N, on one machine in one run:

- **build**: `ContextIndex.add` of N tokens into an empty store (every node of every chunk tree encoded and
  written to disk); throughput = N / build seconds.
- **cold query** = build + the first query (nothing was stored before the question came).
- **warm query**: the store is reopened from disk by a fresh `ContextIndex.load` and asked again; the best of
  ``--repeats`` queries.
- **full attention**: one prefill of the same N tokens + the question through the whole base model (no LM head
  beyond the last token), the cost of reading the text without sharedctx. Sizes above ``--full-max`` tokens are
  skipped and recorded as skipped; nothing is extrapolated.

Query latency is time to first token (retrieval + prefill of the question with injected states); totals with
``--new-tokens`` generated tokens are recorded too. Writes benchmarks/results/index_<device>.json and .png
(``index_quick.*`` for ``--quick``).
"""

from __future__ import annotations

import argparse
import gc
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from _common import RESULTS, add_data_arg, data_file, run, write_json

QUESTION = "Who is Mr. Darcy, and what does Elizabeth think of him at first?"
QUESTIONS = (
    QUESTION,
    "Where does Mr. Bingley take a house?",
    "How many daughters do Mr. and Mrs. Bennet have?",
    "What does Mr. Collins want from Elizabeth?",
    "Who is Charlotte Lucas?",
    "What happens at the ball at Netherfield?",
    "Why does Jane go to Netherfield?",
    "What is Mrs. Bennet's chief business in life?",
)
BOOKS = ("pride_and_prejudice.txt", "emma.txt", "mansfield_park.txt", "sense_and_sensibility.txt", "northanger_abbey.txt")


def tiny_llm():
    """A tiny random Llama with a byte-level tokenizer: exercises every code path in seconds, measures nothing real."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    from sharedctx import SharedCtxConfig, SharedLLM

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<pad>": 0, "<s>": 1, "<|im_end|>": 2, **{ch: 3 + i for i, ch in enumerate(alphabet)}}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="<|im_end|>")
    cfg = LlamaConfig(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                      num_key_value_heads=2, head_dim=16, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa").eval()
    return SharedLLM.from_model(model, fast, config=SharedCtxConfig(injection_layers=2, chunk_size=128, node_keep=8))


def corpus(n_tokens: int, tokenizer, args) -> str:
    """``n_tokens`` tokens of Austen (books of the corpus folder concatenated), cut where they are reached."""
    text = ""
    for name in BOOKS * 4:
        text += data_file(f"books/{name}", args).read_text(encoding="utf-8") + "\n\n"
        if len(text) > 6 * n_tokens:
            break
    lo, hi = 0, len(text)
    while lo < hi:  # shortest prefix with n_tokens tokens
        mid = (lo + hi) // 2
        if len(tokenizer(text[:mid], add_special_tokens=False)["input_ids"]) >= n_tokens:
            hi = mid
        else:
            lo = mid + 1
    return text[:lo]


def measure_lazy(llm, text: str, store: Path, args) -> dict:
    """A text-mode retriever index: ``encode="lazy"`` with the lexical policy stores text only, so building it costs
    tokenising; its text-mode query (spans of the best 2 chunks in the prompt) runs no lower-model pass."""
    from sharedctx.index import ContextIndex

    passes = llm.encoder.passes
    t0 = time.perf_counter()
    with ContextIndex(llm, store, top_k=2, policy="lexical", encode="lazy") as index:
        index.add_text(text, doc_id="doc")
        build_s = time.perf_counter() - t0
        ans = index.query(QUESTION, mode="text", max_new_tokens=args.new_tokens)
    return {
        "build_s": round(build_s, 3),
        "text_first_token_s": round(ans.timings["first_token_s"], 3),
        "text_prompt_tokens": ans.stats["prompt_tokens"],
        "lower_passes": llm.encoder.passes - passes,
        "answer": ans.text,
    }


def measure(llm, text: str, args) -> dict:
    from sharedctx.index import ContextIndex

    n_tokens = len(llm.tokenizer(text, add_special_tokens=False)["input_ids"])
    root = Path(tempfile.mkdtemp(prefix="bench-index-"))
    try:
        index = ContextIndex(llm, root / "store", top_k=args.top_k)
        passes = llm.encoder.passes
        t0 = time.perf_counter()
        built = index.add_text(text, doc_id="doc")
        build_s = time.perf_counter() - t0
        first = index.query(QUESTION, max_new_tokens=args.new_tokens)
        cold_first_token_s = build_s + first.timings["first_token_s"]
        cold_total_s = build_s + first.timings["total_s"]
        lower_passes = llm.encoder.passes - passes
        volume = index.store.stats["volume_bytes"]
        index.close()

        warm = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            reopened = ContextIndex.load(root / "store", llm, top_k=args.top_k)
            open_s = time.perf_counter() - t
            ans = reopened.query(QUESTION, max_new_tokens=args.new_tokens)
            assert ans.stats["chunks_encoded"] == 0, "a warm query encoded chunks"
            warm.append((open_s, ans))
            reopened.close()
        best = min(warm, key=lambda w: w[1].timings["first_token_s"])
        ans = best[1]
        concurrency = measure_concurrency(llm, root / "store", args) if args.concurrent and n_tokens <= min(args.sizes) + 64 else None
        lazy = measure_lazy(llm, text, root / "lazy", args) if args.lazy else None
    finally:
        shutil.rmtree(root, ignore_errors=True)

    row = {
        "tokens": n_tokens,
        "chunks": built.chunks,
        "mean_chunk_fill": round(n_tokens / (built.chunks * llm.config.chunk_size), 4),
        "lower_passes": lower_passes,
        "store_bytes": volume,
        "build_s": round(build_s, 3),
        "build_tokens_per_s": round(n_tokens / build_s, 1),
        "cold_first_token_s": round(cold_first_token_s, 3),
        "cold_total_s": round(cold_total_s, 3),
        "warm_open_s": round(best[0], 3),
        "warm_first_token_s": round(ans.timings["first_token_s"], 4),
        "warm_retrieve_s": round(ans.timings["retrieve_s"], 4),
        "warm_total_s": round(ans.timings["total_s"], 4),
        "warm_injected_states": ans.stats["injected_states"],
        "warm_chunks_selected": ans.stats["chunks_selected"],
        "generated_tokens": ans.stats["generated_tokens"],
        "answer": ans.text,
    }
    row["cold_over_warm_first_token"] = round(cold_first_token_s / ans.timings["first_token_s"], 1)
    if concurrency is not None:
        row["concurrent"] = concurrency
    if lazy is not None:
        row["lazy_text"] = {**lazy, "eager_build_s": round(build_s, 3), "build_speedup": round(build_s / lazy["build_s"], 1)}

    if n_tokens <= args.full_max:
        ids = llm.tokenizer(text + "\n\n" + QUESTION, add_special_tokens=False, return_tensors="pt")["input_ids"]
        if ids.shape[1] > llm.max_positions:
            row["full_attention_note"] = f"{ids.shape[1]} tokens exceed the model's trained window of {llm.max_positions}: timed anyway"
        gc.collect()
        with torch.no_grad():
            t = time.perf_counter()
            llm.base(input_ids=ids.to(llm.device), logits_to_keep=1, use_cache=False)
            full_s = time.perf_counter() - t
        row["full_attention_prefill_s"] = round(full_s, 3)
        row["full_over_warm_first_token"] = round(full_s / ans.timings["first_token_s"], 1)
    else:
        row["full_attention_prefill_s"] = None
        row["full_attention_note"] = f"skipped: {n_tokens} tokens > --full-max {args.full_max}"
    return row


def measure_concurrency(llm, store: Path, args) -> dict:
    """``--concurrent K`` different questions asked at once from K threads over a warm store: answered in batched
    forwards (``max_batch_queries=K``) against each thread running its own (``max_batch_queries=1``); same
    answers, wall time compared. Each mode runs twice and keeps its faster run."""
    from concurrent.futures import ThreadPoolExecutor

    from sharedctx.index import ContextIndex

    k = args.concurrent
    questions = [QUESTIONS[i % len(QUESTIONS)] for i in range(k)]
    out: dict = {"queries": k, "new_tokens": args.new_tokens}
    texts = {}
    for label, batch in (("separate", 1), ("batched", k)):
        best = None
        for _ in range(2):
            index = ContextIndex.load(store, llm, top_k=args.top_k, max_batch_queries=batch, batch_wait_s=0.05)
            with ThreadPoolExecutor(max_workers=k) as pool:
                t = time.perf_counter()
                answers = list(pool.map(lambda q: index.query(q, max_new_tokens=args.new_tokens), questions))
                wall = time.perf_counter() - t
            stats = index.batch_stats
            index.close()
            if best is None or wall < best[0]:
                best = (wall, answers, stats)
        wall, answers, stats = best
        texts[label] = [a.text for a in answers]
        out[label] = {
            "wall_s": round(wall, 3),
            "queries_per_s": round(k / wall, 3),
            "generated_tokens": sum(a.stats["generated_tokens"] for a in answers),
            "largest_batch": stats["largest"] if batch > 1 else 1,
        }
    out["batched_speedup"] = round(out["separate"]["wall_s"] / out["batched"]["wall_s"], 2)
    out["same_answers"] = texts["separate"] == texts["batched"]
    return out


def plot(rows: list[dict], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [r["tokens"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(xs, [r["cold_first_token_s"] for r in rows], "o-", label="cold store: build + first token")
    ax.plot(xs, [r["warm_first_token_s"] for r in rows], "o-", label="warm store: first token")
    full = [(r["tokens"], r["full_attention_prefill_s"]) for r in rows if r["full_attention_prefill_s"] is not None]
    if full:
        ax.plot(*zip(*full), "s--", label="full attention: prefill")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("document tokens")
    ax.set_ylabel("seconds (log)")
    ax.set_title(title, fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[8192, 32768, 131072])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--top-k", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=16)
    ap.add_argument("--full-max", type=int, default=32768, help="largest size timed with full attention")
    ap.add_argument("--concurrent", type=int, default=8, help="at the smallest size, this many questions at once, batched vs not (0: skip)")
    ap.add_argument("--lazy", action="store_true", help="also build a lazy lexical index (text only) and time a text-mode query")
    ap.add_argument("--device", default=None)
    ap.add_argument("--name", default=None, help="results file stem (default index_<device>; sizes already in it are kept)")
    ap.add_argument("--quick", action="store_true", help="tiny random model, 1K and 2K tokens (a smoke run)")
    add_data_arg(ap)
    args = ap.parse_args()
    data_file(f"books/{BOOKS[0]}", args)  # a missing corpus fails before the model loads
    torch.set_num_threads(args.threads)
    if args.quick:
        args.sizes, args.repeats, args.new_tokens, args.concurrent = [1024, 2048], 1, 4, min(args.concurrent, 4)
        llm = tiny_llm()
        name = "index_quick"
    else:
        from sharedctx import SharedLLM

        llm = SharedLLM.from_pretrained(device=args.device)
        name = args.name or f"index_{llm.device.type}"
    model = "tiny random Llama" if args.quick else "SmolLM2-135M-Instruct (default)"
    rows = []
    previous = RESULTS / f"{name}.json"
    if previous.is_file() and not args.quick:  # keep sizes measured by earlier runs (same model, same machine)
        import json

        old = json.loads(previous.read_text())
        if old.get("config") == llm.config.to_dict():
            rows = [r for r in old["results"] if r["tokens"] not in args.sizes]
            for r in rows:
                r.setdefault("command", old.get("command"))
                r.setdefault("load_average_1m", old.get("machine", {}).get("load_average_1m"))
    for n in args.sizes:
        row = measure(llm, corpus(n, llm.tokenizer, args), args)
        import os

        row["load_average_1m"] = round(os.getloadavg()[0], 2)
        row["command"] = " ".join(["bench_index.py"] + sys.argv[1:])
        rows.append(row)
        rows.sort(key=lambda r: r["tokens"])
        print({k: v for k, v in row.items() if k != "answer"}, flush=True)
        # written after every size, so a long run keeps what it measured
        path = write_json(name, {"model": model, "config": llm.config.to_dict(), "question": QUESTION, "threads": args.threads, "results": rows})
        plot(rows, RESULTS / f"{name}.png", f"ContextIndex, {model}, {llm.device.type}, {args.threads} threads")
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    run(main)
