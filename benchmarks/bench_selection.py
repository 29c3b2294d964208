"""Does the query pick the chunk that holds the answer? Chunk-selection recall of node keys, against BM25.

    python benchmarks/bench_selection.py --lengths 16384 32768 --trials 3      # default model, minutes
    python benchmarks/bench_selection.py --quick                             # tiny random model, seconds

The finding benchmark scores whole systems; this one isolates their first step. For each trial of the finding tasks
(passkey, RULER needles, variable tracking) it cuts the context into chunks of C tokens, scores every chunk against
the question and records the rank of the chunk that holds the (first) answer. Scorers:

- ``design``: the library's own selection (DESIGN section 1): a chunk's key is its last token's hidden state after
  layer 1 and the final norm; the query's is the last prompt token's (chat template) after layer 1, cosine.
  This is what `ContextIndex` ranks chunks by and what the ``query`` policy walks with.
- ``mean_l{L}``: mean over the chunk's tokens of the normed hidden states after layer ``L``, minus the mean over the
  document's chunks; the question's tokens alone (no template), same layer and centring; cosine. No training.
- ``maxleaf_l{L}``: as ``mean_l{L}`` over the chunk's 8 leaves (C/8 tokens each); a chunk scores its best leaf.
- ``lexical``: the library's ``lexical`` policy (`sharedctx.ops.scoring.BM25` over the chunks' text, the question's
  words), what `ContextIndex` ranks chunks by with ``policy="lexical"``.
- ``bm25``: BM25 from bm25s (English stop words) over the same texts, an outside reference for ``lexical``.

Recall@k = the fraction of trials whose answer chunk ranks in the top k (k = 1, 2 = the text mode's default
budget, 8 = the index's default ``top_k``). Writes benchmarks/results/selection.json and .png.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from _common import FILLER, add_model_args, data_file, load_llm, model_info, output_name, plt, run, write_json
from _tasks import TASK_NAMES, filler_tokens, make_task

KS = (1, 2, 8)


def hidden(llm, ids: torch.Tensor, layer: int) -> torch.Tensor:
    """Normed hidden states ``(B, T, H)`` after the first ``layer`` decoder layers, each row on its own (positions 0..T-1)."""
    from sharedctx.diagnostics import base_model_only

    inner = llm.base.model
    with torch.no_grad(), base_model_only():
        h = inner.embed_tokens(ids.to(llm.device))
        pos = torch.arange(ids.shape[1], device=llm.device)[None].expand(ids.shape[0], -1)
        emb = inner.rotary_emb(h, pos)
        for i in range(layer):
            out = inner.layers[i](h, attention_mask=None, position_ids=pos, position_embeddings=emb)
            h = out[0] if isinstance(out, tuple) else out
        return inner.norm(h).float()


def cosine(q: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    return torch.nn.functional.normalize(keys, dim=-1) @ torch.nn.functional.normalize(q, dim=-1)


def chunk_scores(llm, ids: torch.Tensor, question: str, chunk: int, layers: list[int], texts: list[str]) -> dict[str, np.ndarray]:
    """Every scorer's score for each full chunk of ``ids``."""
    tok = llm.tokenizer
    n = ids.numel() // chunk
    chunks = ids[: n * chunk].view(n, chunk)
    prompt = llm.prompt_ids(question)
    scores = {
        "design": cosine(llm.query_keys(prompt, [prompt.shape[1]])[0].float(), llm.encoder.node_keys(ids, [(i * chunk, (i + 1) * chunk) for i in range(n)])),
    }
    q_ids = torch.tensor(tok(question, add_special_tokens=False)["input_ids"])[None]
    leaf = chunk // 8
    for layer in layers:
        h = hidden(llm, chunks, layer)  # (n, C, H)
        q = hidden(llm, q_ids, layer)[0].mean(0)
        means = h.mean(1)
        center = means.mean(0)
        scores[f"mean_l{layer}"] = cosine(q - center, means - center)
        leaves = h[:, : 8 * leaf].reshape(n, 8, leaf, -1).mean(2)  # (n, 8, H)
        lc = leaves.reshape(-1, leaves.shape[-1]).mean(0)
        scores[f"maxleaf_l{layer}"] = cosine(q - lc, leaves - lc).max(dim=1).values
    from sharedctx.ops.scoring import BM25

    scores["lexical"] = BM25(texts).scores(question)
    try:
        import bm25s

        retriever = bm25s.BM25()
        retriever.index(bm25s.tokenize(texts, stopwords="en", show_progress=False), show_progress=False)
        docs, vals = retriever.retrieve(bm25s.tokenize([question], stopwords="en", show_progress=False), k=n, show_progress=False)
        bm = np.zeros(n)
        bm[docs[0]] = vals[0]
        scores["bm25"] = torch.tensor(bm)
    except ImportError:
        pass
    return {k: v.detach().cpu().numpy() for k, v in scores.items()}


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_args(ap, lengths=[16384, 32768])
    ap.add_argument("--tasks", nargs="+", default=None, choices=TASK_NAMES, help="default: passkey niah_single niah_multikey vt")
    ap.add_argument("--trials", type=int, default=3, help="trials per task and length (depths cycle)")
    ap.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.5, 0.9])
    ap.add_argument("--layers", type=int, nargs="+", default=[1, 4], help="hidden-state layers of the mean/maxleaf scorers")
    ap.add_argument("--filler", default=FILLER, help="haystack prose for the RULER tasks: a file under the corpus folder (--data), or a path")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.quick:
        args.lengths, args.trials = args.lengths or [512], 1
    tasks = args.tasks or ["passkey", "niah_single", "niah_multikey", "vt"]
    filler_path = data_file(args.filler, args)
    llm = load_llm(args)
    tok, chunk = llm.tokenizer, llm.config.chunk_size
    filler = filler_tokens(tok, filler_path.read_text(encoding="utf-8"))
    rng = np.random.default_rng(args.seed)
    trials, t_start = [], time.perf_counter()
    for length in args.lengths:
        for name in tasks:
            for t in range(args.trials):
                depth = args.depths[t % len(args.depths)]
                task = make_task(name, tok, rng, length=length, depth=depth, filler=filler)
                enc = tok(task.context, add_special_tokens=False, return_offsets_mapping=True)
                ids = torch.tensor(enc["input_ids"])
                n = ids.numel() // chunk
                at = task.context.find(task.answers[0])
                target = sum(1 for s, _ in enc["offset_mapping"] if s < at) // chunk
                if n < 2 or target >= n:
                    continue
                bounds = [enc["offset_mapping"][i * chunk][0] for i in range(n)] + [enc["offset_mapping"][n * chunk - 1][1]]
                texts = [task.context[bounds[i] : bounds[i + 1]] for i in range(n)]
                scores = chunk_scores(llm, ids, task.question, chunk, args.layers, texts)
                ranks = {k: int((s > s[target]).sum()) for k, s in scores.items()}
                trials.append({"length": length, "task": name, "depth": depth, "chunks": n, "answer_chunk": target, "ranks": ranks})
                print(f"{length:>7} {name:14s} d={depth:.2f} chunk {target:>3}/{n}  " + "  ".join(f"{k} {r}" for k, r in ranks.items()), flush=True)
    scorers = list(trials[0]["ranks"]) if trials else []
    summary = {
        s: {
            str(length): {
                **{f"recall@{k}": round(float(np.mean([t["ranks"][s] < k for t in trials if t["length"] == length])), 3) for k in KS},
                "mean_rank": round(float(np.mean([t["ranks"][s] for t in trials if t["length"] == length])), 2),
                "trials": sum(t["length"] == length for t in trials),
            }
            for length in args.lengths
            if any(t["length"] == length for t in trials)
        }
        for s in scorers
    }
    payload = {**model_info(llm), "tasks": tasks, "lengths": args.lengths, "chunk_size": chunk, "seconds": round(time.perf_counter() - t_start, 1),
               "summary": summary, "trials": trials}
    name = output_name("selection", args)
    path = write_json(name, payload, args.out)
    pyplot = plt()
    if pyplot is not None and summary:
        fig, ax = pyplot.subplots(figsize=(8, 4))
        width = 0.8 / max(1, len(args.lengths))
        for j, length in enumerate(args.lengths):
            vals = [summary[s].get(str(length), {}).get("recall@1", 0.0) for s in scorers]
            ax.bar(np.arange(len(scorers)) + j * width, vals, width, label=f"{length // 1024}K tokens")
        ax.set_xticks(np.arange(len(scorers)) + width * (len(args.lengths) - 1) / 2, scorers, rotation=20)
        ax.set_ylabel("recall@1 of the answer's chunk")
        ax.set_ylim(0, 1)
        ax.legend()
        ax.set_title(f"chunk selection, {len(trials)} trials ({', '.join(tasks)})", fontsize=9)
        fig.tight_layout()
        fig.savefig(path.with_suffix(".png"), dpi=120)
        pyplot.close(fig)
    print(f"wrote {path}")
    return payload


if __name__ == "__main__":
    run(main)
